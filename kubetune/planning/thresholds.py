"""The planner's thresholds and defaults, in one place (``docs/planning.md`` explains each)."""

from __future__ import annotations

#: Dataset-size bands (training examples).
SMALL_DATA = 1_000
MEDIUM_DATA = 10_000
LARGE_DATA = 100_000
#: Inside the 10k-100k band, from here on half of the network is trained (Partial).
PARTIAL_FROM = 50_000
#: Partial fine-tuning trains this share of the decoder layers (rounded up) unless told.
PARTIAL_FRACTION = 0.5

#: LoRA rank per band; alpha is twice the rank (scale alpha/r = 2 at every rank).
LORA_RANK_SMALL = 8
LORA_RANK_MEDIUM = 16
LORA_RANK_HIGH = 64
#: Prefix tuning: virtual tokens (PEFT default prefix without reparameterisation).
PREFIX_TOKENS = 20

#: PEFT target modules per family: every linear layer of the blocks (QLoRA, Dettmers et
#: al. 2023: adapting all linear layers is what matches full fine-tuning quality).
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}

#: Default cap on the sequence length when the request gives none.
DEFAULT_MAX_SEQ_LENGTH = 4096
#: Sequence lengths are rounded up to a multiple of this.
SEQ_ALIGN = 64
#: Tokens per micro-batch we aim for before memory limits it; micro-batch is 1..8. On a GPU
#: the search starts larger (16k tokens, micro-batch up to 16) and halves without gradient
#: checkpointing down to the 4k-token size before it recomputes: on an H200 a 1.1B Llama ran
#: at 28.8% MFU with micro-batch 2 x 2,048 and 36.7% with 8 x 2,048 (bench/RESULTS.md).
TOKENS_PER_MICRO_BATCH = 4096
MAX_MICRO_BATCH = 8
TOKENS_PER_MICRO_BATCH_GPU = 16384
MAX_MICRO_BATCH_GPU = 16
#: Target effective (global) batch per band.
EFFECTIVE_BATCH = ((SMALL_DATA, 8), (MEDIUM_DATA, 16), (LARGE_DATA, 32))
EFFECTIVE_BATCH_LARGE = 64
#: Epochs = round(EPOCH_SCALE * sqrt(EPOCH_PIVOT / examples)), bounded.
EPOCH_SCALE = 3.0
EPOCH_PIVOT = 10_000
MIN_EPOCHS = 1
MAX_EPOCHS = 10
#: Warmup as a fraction of the real number of optimizer steps; none under MIN_WARMUP_RUN.
WARMUP_FRACTION = 0.05
MIN_WARMUP_RUN = 10
#: Evaluations per run (early stopping needs a curve, at least ~10 points).
TARGET_EVALUATIONS = 20
MAX_GRAD_NORM = 1.0
#: Full fine-tuning of models above this size uses a lower learning rate.
LARGE_MODEL_PARAMS = 20_000_000_000
DEFAULT_SAFETY_MARGIN = 0.10
