"""The planner: dataset + model + resources -> a Plan with the reasons behind it.

Pure functions only: no I/O, no torch. The rules and thresholds are documented in
``docs/planning.md``; every decision appends a sentence with its numbers to
``Plan.reasons``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from kubetune.planning.memory import (
    GIB,
    MemoryEstimate,
    Offload,
    activation_bytes,
    check_zero_config,
    estimate_memory,
    model_state_bytes,
)
from kubetune.planning.model import ModelArch


class Method(StrEnum):
    """Fine-tuning methods, as the API spells them."""

    FULL = "Full"
    PARTIAL = "Partial"
    LORA = "LoRA"
    PREFIX = "Prefix"


# ---- thresholds (docs/planning.md explains each) --------------------------------------------

#: Dataset-size bands (training examples).
SMALL_DATA = 1_000
MEDIUM_DATA = 10_000
LARGE_DATA = 100_000
#: Inside the 10k-100k band, from here on half of the network is trained (Partial).
PARTIAL_FROM = 50_000

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
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}

#: Default cap on the sequence length when the request gives none.
DEFAULT_MAX_SEQ_LENGTH = 4096
#: Sequence lengths are rounded up to a multiple of this.
SEQ_ALIGN = 64
#: Tokens per micro-batch we aim for before memory limits it; micro-batch is 1..8.
TOKENS_PER_MICRO_BATCH = 4096
MAX_MICRO_BATCH = 8
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


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStats:
    """What the prepare step measured on the training data.

    ``example_count`` and ``token_count`` are for the examples that will be trained on
    (after any held-out split); ``max_tokens`` is the longest one. ``duplicate_count`` counts
    repeated training examples, ``leakage_count`` validation examples that also occur in
    training, ``overlong_count`` examples longer than the length limit the data step used.
    ``tokens_estimated`` is true when tokens were estimated from the text (no tokenizer).
    """

    example_count: int
    token_count: int
    max_tokens: int
    validation_count: int = 0
    duplicate_count: int = 0
    leakage_count: int = 0
    overlong_count: int = 0
    tokens_estimated: bool = False

    def __post_init__(self) -> None:
        if self.example_count < 1:
            raise ValueError("the dataset has no training examples")
        if self.token_count < self.example_count or self.max_tokens < 1:
            raise ValueError("token counts must be positive (at least one token per example)")
        for name in ("validation_count", "duplicate_count", "leakage_count", "overlong_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def mean_tokens(self) -> float:
        return self.token_count / self.example_count


@dataclass(frozen=True)
class Resources:
    """The hardware: ``gpus_per_node`` devices of ``gpu_memory_gib`` on ``num_nodes`` nodes.

    ``cpu_memory_gib`` is host memory per node available to offload; when it is unknown the
    planner does not plan offload on its own. ``accelerator="CPU"`` plans local CPU
    processes, ``gpu_memory_gib`` then being each process's share of RAM.
    """

    gpus_per_node: int = 1
    gpu_memory_gib: float = 80.0
    num_nodes: int = 1
    cpu_memory_gib: float | None = None
    accelerator: Literal["GPU", "CPU"] = "GPU"

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.num_nodes < 1:
            raise ValueError("need at least one device on at least one node")
        if self.gpu_memory_gib <= 0:
            raise ValueError("device memory must be positive")
        if self.cpu_memory_gib is not None and self.cpu_memory_gib <= 0:
            raise ValueError("host memory must be positive")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; ``None`` means "decide"."""

    method: Method | None = None
    incremental: bool = False
    """The base model is already fine-tuned; this run updates it (lower learning rate)."""
    max_seq_length: int | None = None
    zero_stage: int | None = None
    offload: Offload | None = None
    gradient_checkpointing: bool | None = None
    micro_batch_size: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    flash_attention: bool = True
    zero_init: bool = True

    def __post_init__(self) -> None:
        if self.method is not None:
            object.__setattr__(self, "method", Method(self.method))
        if self.offload is not None:
            object.__setattr__(self, "offload", Offload(self.offload))
        if self.zero_stage is not None:
            check_zero_config(self.zero_stage, self.offload or Offload.NONE)
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= 512:
            raise ValueError("micro-batch size must be between 1 and 512")
        for name in ("max_seq_length", "epochs", "lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise ValueError("learning rate must be in (0, 1)")
        if not 0 <= self.safety_margin < 1:
            raise ValueError("safety margin must be in [0, 1)")


# ---- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyperparameters:
    learning_rate: float
    epochs: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_steps: int
    weight_decay: float
    dropout: float
    max_grad_norm: float
    sequence_length: int
    gradient_checkpointing: bool
    lr_scheduler: str = "cosine"
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    prefix_tokens: int | None = None
    trainable_layers: int | None = None

    @property
    def evaluations(self) -> int:
        return self.total_steps // self.eval_steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "learningRate": self.learning_rate,
            "epochs": self.epochs,
            "microBatchSize": self.micro_batch_size,
            "gradientAccumulationSteps": self.gradient_accumulation_steps,
            "effectiveBatchSize": self.effective_batch_size,
            "stepsPerEpoch": self.steps_per_epoch,
            "totalSteps": self.total_steps,
            "warmupSteps": self.warmup_steps,
            "evalSteps": self.eval_steps,
            "weightDecay": self.weight_decay,
            "dropout": self.dropout,
            "maxGradNorm": self.max_grad_norm,
            "sequenceLength": self.sequence_length,
            "gradientCheckpointing": self.gradient_checkpointing,
            "lrScheduler": self.lr_scheduler,
            "loraRank": self.lora_rank,
            "loraAlpha": self.lora_alpha,
            "loraDropout": self.lora_dropout,
            "loraTargetModules": (
                None if self.lora_target_modules is None else list(self.lora_target_modules)
            ),
            "prefixTokens": self.prefix_tokens,
            "trainableLayers": self.trainable_layers,
        }


@dataclass(frozen=True)
class Plan:
    method: Method
    zero_stage: int
    offload: Offload
    trainable_parameters: int
    total_parameters: int
    fits: bool
    memory: MemoryEstimate
    hyperparameters: Hyperparameters
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    example_count: int
    token_count: int
    token_count_estimated: bool
    model_name: str
    model_family: str
    num_nodes: int
    gpus_per_node: int
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plan as camelCase JSON-ready data (``status.plan``, ``plan.json``)."""
        return {
            "method": str(self.method),
            "zeroStage": self.zero_stage,
            "offload": str(self.offload),
            "trainableParameters": self.trainable_parameters,
            "totalParameters": self.total_parameters,
            "fits": self.fits,
            "error": self.error,
            "model": {"name": self.model_name, "family": self.model_family},
            "numNodes": self.num_nodes,
            "gpusPerNode": self.gpus_per_node,
            "memory": self.memory.to_dict(),
            "hyperparameters": self.hyperparameters.to_dict(),
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "exampleCount": self.example_count,
            "tokenCount": self.token_count,
            "tokenCountEstimated": self.token_count_estimated,
        }


# ---- methods and their trainable parameters -------------------------------------------------


@dataclass(frozen=True)
class MethodChoice:
    """A method with its size knobs (LoRA rank, prefix tokens, trained layers)."""

    method: Method
    lora_rank: int | None = None
    prefix_tokens: int | None = None
    trainable_layers: int | None = None

    def describe(self) -> str:
        if self.method is Method.LORA:
            return f"LoRA (rank {self.lora_rank})"
        if self.method is Method.PREFIX:
            return f"Prefix ({self.prefix_tokens} virtual tokens)"
        if self.method is Method.PARTIAL:
            return f"Partial (top {self.trainable_layers} layers)"
        return "Full"


def lora_target_modules(arch: ModelArch) -> tuple[str, ...]:
    return LORA_TARGET_MODULES[arch.family]


def lora_parameters(arch: ModelArch, rank: int, targets: Iterable[str] | None = None) -> int:
    """LoRA adds ``rank * (in + out)`` parameters to every targeted linear layer."""
    wanted = set(lora_target_modules(arch) if targets is None else targets)
    per_layer = sum(
        rank * (lin.in_features + lin.out_features)
        for lin in arch.layer_linears
        if lin.name.rsplit(".", 1)[-1] in wanted
    )
    return per_layer * arch.num_layers


def lora_input_bytes(arch: ModelArch, targets: Iterable[str] | None = None) -> int:
    """Bytes per token and layer that LoRA keeps besides the base layer: the (dropout)
    copy of every adapted linear layer's input, in bf16."""
    wanted = set(lora_target_modules(arch) if targets is None else targets)
    return 2 * sum(
        lin.in_features for lin in arch.layer_linears if lin.name.rsplit(".", 1)[-1] in wanted
    )


def prefix_parameters(arch: ModelArch, tokens: int) -> int:
    """Prefix tuning: a key and a value vector per virtual token, layer and KV head."""
    return tokens * arch.num_layers * 2 * arch.kv_dim


def partial_parameters(arch: ModelArch, layers: int) -> int:
    """Partial fine-tuning trains the top ``layers`` decoder layers and the final norm."""
    final_norm = arch.norm_parameters if arch.final_norm else 0
    return layers * arch.layer_parameters + final_norm


def trainable_and_frozen(arch: ModelArch, choice: MethodChoice) -> tuple[int, int]:
    """(trainable, frozen) parameters; adapters are extra, the base stays frozen."""
    total = arch.total_parameters
    if choice.method is Method.FULL:
        return total, 0
    if choice.method is Method.PARTIAL:
        trainable = partial_parameters(arch, choice.trainable_layers or 0)
        return trainable, total - trainable
    if choice.method is Method.LORA:
        return lora_parameters(arch, choice.lora_rank or LORA_RANK_SMALL), total
    return prefix_parameters(arch, choice.prefix_tokens or PREFIX_TOKENS), total


def _band_rank(examples: int) -> int:
    if examples < SMALL_DATA:
        return LORA_RANK_SMALL
    if examples < MEDIUM_DATA:
        return LORA_RANK_MEDIUM
    return LORA_RANK_HIGH


def _choice(method: Method, arch: ModelArch, examples: int, rank: int | None) -> MethodChoice:
    if method is Method.LORA:
        return MethodChoice(method, lora_rank=rank or _band_rank(examples))
    if method is Method.PREFIX:
        return MethodChoice(method, prefix_tokens=PREFIX_TOKENS)
    if method is Method.PARTIAL:
        return MethodChoice(method, trainable_layers=math.ceil(arch.num_layers / 2))
    return MethodChoice(method)


def candidate_methods(
    examples: int, arch: ModelArch, rank: int | None = None
) -> tuple[tuple[MethodChoice, ...], str]:
    """Methods in order of preference for a dataset size, and the sentence saying why."""
    n = f"{examples:,}"
    if examples < SMALL_DATA:
        why = (
            f"{n} examples is under {SMALL_DATA:,}: LoRA with a small rank, because full "
            "fine-tuning memorises a dataset this small within a few epochs"
        )
        methods: tuple[Method, ...] = (Method.LORA,)
    elif examples < MEDIUM_DATA:
        why = f"{n} examples is in the {SMALL_DATA:,}-{MEDIUM_DATA:,} band: LoRA with a larger rank"
        methods = (Method.LORA,)
    elif examples < PARTIAL_FROM:
        why = (
            f"{n} examples is in the {MEDIUM_DATA:,}-{PARTIAL_FROM:,} part of the "
            f"{MEDIUM_DATA:,}-{LARGE_DATA:,} band: LoRA with a high rank"
        )
        methods = (Method.LORA,)
    elif examples < LARGE_DATA:
        why = (
            f"{n} examples is in the {PARTIAL_FROM:,}-{LARGE_DATA:,} part of the "
            f"{MEDIUM_DATA:,}-{LARGE_DATA:,} band: enough data to train the top half of "
            "the network (Partial), with high-rank LoRA as the fallback"
        )
        methods = (Method.PARTIAL, Method.LORA)
    else:
        why = (
            f"{n} examples is over {LARGE_DATA:,}: full fine-tuning is viable, with "
            "Partial and high-rank LoRA as the fallbacks"
        )
        methods = (Method.FULL, Method.PARTIAL, Method.LORA)
    return tuple(_choice(m, arch, examples, rank) for m in methods), why


# ---- ZeRO / activation search ---------------------------------------------------------------

_ALL_ZERO: tuple[tuple[int, Offload], ...] = (
    (0, Offload.NONE),
    (1, Offload.NONE),
    (2, Offload.NONE),
    (3, Offload.NONE),
    (1, Offload.OPTIMIZER),
    (2, Offload.OPTIMIZER),
    (3, Offload.OPTIMIZER),
    (3, Offload.OPTIMIZER_AND_PARAMETERS),
)


def zero_ladder(
    world_size: int,
    stage: int | None = None,
    offload: Offload | None = None,
    offload_allowed: bool = True,
) -> tuple[tuple[int, Offload], ...]:
    """(stage, offload) settings to try, cheapest in speed first.

    Several GPUs: ZeRO-0, 1, 2, 3 without offload, then optimizer offload at ZeRO-2 and 3,
    then optimizer and parameter offload at ZeRO-3. One GPU: nothing to partition across,
    so ZeRO-0; if that does not fit, ZeRO-Offload, which DeepSpeed runs only with a ZeRO
    stage: optimizer offload at stage 2 (partition count 1, so nothing is partitioned),
    then optimizer and parameter offload at stage 3. User choices filter the ladder.
    """
    if stage is not None or offload is not None:
        return tuple(
            (s, o)
            for s, o in _ALL_ZERO
            if (stage is None or s == stage) and (offload is None or o == offload)
        )
    if world_size == 1:
        ladder: tuple[tuple[int, Offload], ...] = (
            (0, Offload.NONE),
            (2, Offload.OPTIMIZER),
            (3, Offload.OPTIMIZER_AND_PARAMETERS),
        )
    else:
        ladder = (
            (0, Offload.NONE),
            (1, Offload.NONE),
            (2, Offload.NONE),
            (3, Offload.NONE),
            (2, Offload.OPTIMIZER),
            (3, Offload.OPTIMIZER),
            (3, Offload.OPTIMIZER_AND_PARAMETERS),
        )
    if not offload_allowed:
        ladder = tuple(step for step in ladder if step[1] is Offload.NONE)
    return ladder


def activation_ladder(
    preferred_micro_batch: int,
    gradient_checkpointing: bool | None = None,
    micro_batch: int | None = None,
) -> tuple[tuple[int, bool], ...]:
    """(micro-batch, gradient checkpointing) settings, fastest first.

    The preferred micro-batch without checkpointing, then with it, then halving the
    micro-batch down to 1 (with checkpointing unless the user turned it off).
    """
    sizes = [micro_batch] if micro_batch else _halvings(preferred_micro_batch)
    if gradient_checkpointing is not None:
        return tuple((mb, gradient_checkpointing) for mb in sizes)
    return ((sizes[0], False), *((mb, True) for mb in sizes))


def _halvings(start: int) -> list[int]:
    sizes = [max(1, start)]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


@dataclass(frozen=True)
class Attempt:
    stage: int
    offload: Offload
    micro_batch: int
    gradient_checkpointing: bool
    memory: MemoryEstimate

    def setting(self) -> str:
        gc = "with" if self.gradient_checkpointing else "without"
        offload = "no offload" if self.offload is Offload.NONE else f"{self.offload} offload"
        return (
            f"ZeRO-{self.stage}, {offload}, micro-batch {self.micro_batch}, {gc} gradient "
            "checkpointing"
        )

    def describe(self) -> str:
        return f"{self.setting()}: {_gib(self.memory.per_gpu)} per GPU"


@dataclass(frozen=True)
class SearchResult:
    chosen: Attempt | None
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)

    @property
    def smallest(self) -> Attempt:
        return min(self.attempts, key=lambda a: (a.memory.per_gpu, a.memory.cpu_per_node))


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _attempt(
    arch: ModelArch,
    choice: MethodChoice,
    resources: Resources,
    request: PlanRequest,
    seq_len: int,
    stage: int,
    offload: Offload,
    micro_batch: int,
    checkpointing: bool,
) -> Attempt:
    trainable, frozen = trainable_and_frozen(arch, choice)
    states = model_state_bytes(
        trainable=trainable,
        frozen=frozen,
        largest_layer=arch.largest_layer_parameters,
        stage=stage,
        offload=offload,
        gpus_per_node=resources.gpus_per_node,
        num_nodes=resources.num_nodes,
        zero_init=request.zero_init,
    )
    layers = choice.trainable_layers if choice.method is Method.PARTIAL else None
    activations = activation_bytes(
        arch,
        seq_len,
        micro_batch,
        checkpointing,
        layers_with_grad=layers,
        flash_attention=request.flash_attention,
        adapter_input_bytes=lora_input_bytes(arch) if choice.method is Method.LORA else 0,
    )
    cpu = None if resources.cpu_memory_gib is None else int(resources.cpu_memory_gib * GIB)
    memory = estimate_memory(
        states,
        activations,
        gpu_memory=int(resources.gpu_memory_gib * GIB),
        safety_margin=request.safety_margin,
        cpu_memory=cpu,
        accelerator=resources.accelerator,
    )
    return Attempt(stage, offload, micro_batch, checkpointing, memory)


def search_memory(
    arch: ModelArch,
    choice: MethodChoice,
    resources: Resources,
    request: PlanRequest,
    seq_len: int,
    preferred_micro_batch: int,
) -> SearchResult:
    """The first setting that fits, in this order (cheapest in speed first):

    1. for each activation setting, the smallest of the stages that cost no extra
       communication (ZeRO-0/1/2; on one GPU only ZeRO-0);
    2. then ZeRO-3, then the offload settings, each through the activation settings.
    """
    offload_allowed = resources.cpu_memory_gib is not None
    ladder = zero_ladder(resources.world_size, request.zero_stage, request.offload, offload_allowed)
    acts = activation_ladder(
        preferred_micro_batch, request.gradient_checkpointing, request.micro_batch_size
    )
    free = [z for z in ladder if z[0] <= 2 and z[1] is Offload.NONE]
    costly = [z for z in ladder if z not in free]
    order = [(z, a) for a in acts for z in free] + [(z, a) for z in costly for a in acts]
    attempts: list[Attempt] = []
    for (stage, offload), (mb, gc) in order:
        attempt = _attempt(arch, choice, resources, request, seq_len, stage, offload, mb, gc)
        attempts.append(attempt)
        if attempt.memory.fits:
            return SearchResult(attempt, tuple(attempts))
    return SearchResult(None, tuple(attempts))


# ---- hyperparameters --------------------------------------------------------------------------


def sequence_length(dataset: DatasetStats, arch: ModelArch, request: PlanRequest) -> int:
    """The longest example rounded up to a multiple of 64, capped by the model and request."""
    cap = min(arch.max_positions, request.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
    aligned = math.ceil(dataset.max_tokens / SEQ_ALIGN) * SEQ_ALIGN
    return max(1, min(cap, aligned))


def target_effective_batch(examples: int) -> int:
    for limit, batch in EFFECTIVE_BATCH:
        if examples < limit:
            return min(batch, examples)
    return EFFECTIVE_BATCH_LARGE


def preferred_micro_batch(seq_len: int, examples: int, world_size: int) -> int:
    """About 4k tokens per micro-batch, 1..8, and no more than the batch target needs."""
    by_tokens = 1 << max(0, (TOKENS_PER_MICRO_BATCH // seq_len).bit_length() - 1)
    by_target = max(1, target_effective_batch(examples) // world_size)
    return max(1, min(MAX_MICRO_BATCH, by_tokens, by_target))


def epochs_for(examples: int) -> int:
    """More epochs for small sets (early stopping guards them), bounded to 1..10."""
    raw = round(EPOCH_SCALE * math.sqrt(EPOCH_PIVOT / examples))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, raw))


def learning_rate_for(method: Method, arch: ModelArch, incremental: bool) -> float:
    """Full ~2e-5, LoRA ~10x that; lower for huge models and for already-tuned models."""
    large = arch.total_parameters > LARGE_MODEL_PARAMS
    if method in (Method.FULL, Method.PARTIAL):
        if incremental:
            return 2e-6 if large else 5e-6
        return 1e-5 if large else 2e-5
    if method is Method.LORA:
        base = 1e-4 if large else 2e-4  # QLoRA: 2e-4 for 7B/13B, 1e-4 for 33B/65B
        return base / 2 if incremental else base
    return 5e-3 if incremental else 1e-2  # prefix tuning (PEFT examples use 1e-2)


def regularisation_for(examples: int) -> tuple[float, float]:
    """(weight decay, dropout): stronger for smaller data."""
    if examples < SMALL_DATA:
        return 0.05, 0.2
    if examples < MEDIUM_DATA:
        return 0.03, 0.15
    return 0.01, 0.1


def warmup_steps_for(total_steps: int) -> int:
    """5% of the real number of steps; none for runs under 10 steps."""
    if total_steps < MIN_WARMUP_RUN:
        return 0
    return max(1, round(WARMUP_FRACTION * total_steps))


def eval_steps_for(total_steps: int) -> int:
    """About 20 evaluations per run (at least 10 whenever the run has 10 steps)."""
    return max(1, total_steps // TARGET_EVALUATIONS)


def build_hyperparameters(
    dataset: DatasetStats,
    arch: ModelArch,
    request: PlanRequest,
    resources: Resources,
    choice: MethodChoice,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
) -> tuple[Hyperparameters, list[str]]:
    """Hyperparameters for the chosen method and micro-batch, and the reasons."""
    n = dataset.example_count
    world = resources.world_size
    reasons: list[str] = []
    target = target_effective_batch(n)
    accumulation = max(1, round(target / (micro_batch * world)))
    effective = micro_batch * world * accumulation
    steps_per_epoch = math.ceil(n / effective)
    if request.epochs is not None:
        epochs = request.epochs
        reasons.append(f"Epochs: {epochs}, set by the request.")
    else:
        epochs = epochs_for(n)
        reasons.append(
            f"Epochs: {epochs} = round({EPOCH_SCALE:g} x sqrt({EPOCH_PIVOT:,} / {n:,})) bounded "
            f"to {MIN_EPOCHS}-{MAX_EPOCHS}; small sets get more passes and early stopping "
            "ends the run when evaluation loss stops improving."
        )
    total = steps_per_epoch * epochs
    reasons.append(
        f"Batch: micro-batch {micro_batch} x {world} GPU(s) x {accumulation} accumulation "
        f"step(s) = {effective} examples per step (target {target} for {n:,} examples), "
        f"{steps_per_epoch} step(s) per epoch, {total} steps in all."
    )
    warmup = warmup_steps_for(total)
    reasons.append(
        f"Warmup: {warmup} step(s), {WARMUP_FRACTION:.0%} of the run's {total} steps "
        "(a fixed 100-500 warmup would swallow a short run)."
        if warmup
        else f"Warmup: none, the run has only {total} steps."
    )
    eval_steps = eval_steps_for(total)
    reasons.append(
        f"Evaluation every {eval_steps} step(s): {total // eval_steps} evaluations, enough "
        "points for early stopping to see the validation curve turn."
    )
    if request.learning_rate is not None:
        lr = request.learning_rate
        reasons.append(f"Learning rate {lr:g}, set by the request.")
    else:
        lr = learning_rate_for(choice.method, arch, request.incremental)
        detail = (
            " lowered because the base model is already fine-tuned" if request.incremental else ""
        )
        reasons.append(
            f"Learning rate {lr:g} for {choice.method} on a "
            f"{arch.total_parameters / 1e9:.2f}B-parameter model{detail}, with a cosine decay."
        )
    weight_decay, dropout = regularisation_for(n)
    reasons.append(
        f"Regularisation for {n:,} examples: weight decay {weight_decay:g}, dropout "
        f"{dropout:g}, gradient clipping at {MAX_GRAD_NORM:g}."
    )
    is_lora = choice.method is Method.LORA
    targets = lora_target_modules(arch) if is_lora else None
    if is_lora and choice.lora_rank is not None:
        reasons.append(
            f"LoRA rank {choice.lora_rank}, alpha {2 * choice.lora_rank} on "
            f"{', '.join(targets or ())} ({arch.family}): every linear layer of the blocks."
        )
    hyper = Hyperparameters(
        learning_rate=lr,
        epochs=epochs,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=effective,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        eval_steps=eval_steps,
        weight_decay=weight_decay,
        dropout=dropout,
        max_grad_norm=MAX_GRAD_NORM,
        sequence_length=seq_len,
        gradient_checkpointing=checkpointing,
        lora_rank=choice.lora_rank if is_lora else None,
        lora_alpha=2 * choice.lora_rank if is_lora and choice.lora_rank else None,
        lora_dropout=dropout if is_lora else None,
        lora_target_modules=targets,
        prefix_tokens=choice.prefix_tokens if choice.method is Method.PREFIX else None,
        trainable_layers=choice.trainable_layers if choice.method is Method.PARTIAL else None,
    )
    return hyper, reasons


# ---- warnings ---------------------------------------------------------------------------------


def data_warnings(dataset: DatasetStats, seq_len: int) -> list[str]:
    n = dataset.example_count
    warnings: list[str] = []
    if n < SMALL_DATA:
        warnings.append(
            f"Only {n:,} training examples (under {SMALL_DATA:,}): expect overfitting and "
            "memorisation; early stopping (with the eval-loss, loss-gap and perplexity checks) is "
            "the safeguard."
        )
    if dataset.duplicate_count:
        warnings.append(
            f"{dataset.duplicate_count:,} duplicate training examples "
            f"({dataset.duplicate_count / n:.1%}): duplicates are memorised first; "
            "deduplicate the data."
        )
    if dataset.leakage_count:
        warnings.append(
            f"{dataset.leakage_count:,} validation examples also occur in the training data: "
            "evaluation loss will look better than it is and early stopping will act late."
        )
    if dataset.overlong_count:
        warnings.append(
            f"{dataset.overlong_count:,} examples are longer than the length limit and will "
            "be truncated."
        )
    if dataset.max_tokens > seq_len:
        warnings.append(
            f"The longest example has {dataset.max_tokens:,} tokens, more than the planned "
            f"sequence length of {seq_len:,}: longer examples are truncated."
        )
    if dataset.tokens_estimated:
        warnings.append(
            "Token counts are estimated from the text (no tokenizer was available): sequence "
            "length, steps and memory may be off; plan again with the tokenizer to be sure."
        )
    return warnings


# ---- the planner ------------------------------------------------------------------------------


def _memory_sentence(choice: MethodChoice, attempt: Attempt, resources: Resources) -> str:
    mem = attempt.memory
    return (
        f"{choice.describe()} needs {_gib(mem.per_gpu)} per GPU (model states "
        f"{_gib(mem.model_states)}, activations {_gib(mem.activations)}, overhead "
        f"{_gib(mem.overhead)}) with ZeRO-{attempt.stage}, offload {attempt.offload}, "
        f"micro-batch {attempt.micro_batch}; {_gib(mem.usable)} of "
        f"{resources.gpu_memory_gib:g} GiB is usable per {resources.accelerator} with a "
        f"{(mem.gpu_memory - mem.usable) / mem.gpu_memory:.0%} margin."
    )


def _failure_sentence(choice: MethodChoice, result: SearchResult, resources: Resources) -> str:
    best = result.smallest
    sentence = (
        f"{choice.describe()} does not fit on {resources.world_size} x "
        f"{resources.gpu_memory_gib:g} GiB: its smallest setting ({best.describe()}) exceeds "
        f"the {_gib(best.memory.usable)} usable"
    )
    if not best.memory.cpu_fits and best.memory.cpu_memory is not None:
        sentence += (
            f" or needs {_gib(best.memory.cpu_per_node)} of host memory per node "
            f"(have {_gib(best.memory.cpu_memory)})"
        )
    if resources.cpu_memory_gib is None:
        sentence += "; offload was not considered because host memory was not given"
    return sentence + "."


def _zero_sentences(attempt: Attempt, result: SearchResult, resources: Resources) -> list[str]:
    world = resources.world_size
    sentences: list[str] = []
    if world == 1:
        rule = (
            "One GPU: nothing to partition, so no ZeRO partitioning (stage 0)"
            if attempt.offload is Offload.NONE
            else f"One GPU: ZeRO-0 does not fit, so ZeRO-Offload ({attempt.offload}), "
            f"which DeepSpeed runs as stage {attempt.stage} with a partition count of 1"
        )
        sentences.append(rule + ".")
    else:
        smaller = [
            a
            for a in result.attempts
            if a is not attempt
            and a.micro_batch == attempt.micro_batch
            and a.gradient_checkpointing == attempt.gradient_checkpointing
        ]
        tried = "; ".join(
            f"ZeRO-{a.stage}/{a.offload} needs {_gib(a.memory.per_gpu)}" for a in smaller
        )
        lead = f"{world} GPUs: the smallest ZeRO stage that fits is {attempt.stage}"
        if attempt.offload is not Offload.NONE:
            lead += f" with {attempt.offload} offload"
        sentences.append(lead + (f" ({tried})." if tried else "."))
    if attempt.offload is not Offload.NONE:
        sentences.append(
            f"Offload keeps {_gib(attempt.memory.cpu_per_node)} in host memory per node."
        )
    return sentences


def _activation_sentences(
    attempt: Attempt, result: SearchResult, preferred: int, request: PlanRequest
) -> list[str]:
    sentences: list[str] = []
    if request.gradient_checkpointing is not None:
        state = "on" if attempt.gradient_checkpointing else "off"
        sentences.append(f"Gradient checkpointing is {state}, set by the request.")
    elif attempt.gradient_checkpointing:
        without = [
            a
            for a in result.attempts
            if not a.gradient_checkpointing
            and (a.stage, a.offload) == (attempt.stage, attempt.offload)
        ]
        detail = (
            f": without it ZeRO-{without[0].stage} at micro-batch {without[0].micro_batch} "
            f"needs {_gib(without[0].memory.per_gpu)} per GPU"
            if without
            else ""
        )
        sentences.append(
            f"Gradient checkpointing is on{detail} (it recomputes activations in backward, "
            "about a third more compute)."
        )
    if request.micro_batch_size is None and attempt.micro_batch < preferred:
        sentences.append(
            f"Micro-batch lowered from {preferred} to {attempt.micro_batch} to fit; "
            "gradient accumulation keeps the effective batch."
        )
    return sentences


def make_plan(
    dataset: DatasetStats,
    model: ModelArch,
    resources: Resources,
    request: PlanRequest | None = None,
) -> Plan:
    """Choose method, ZeRO stage, offload and hyperparameters; explain every choice."""
    request = request or PlanRequest()
    reasons: list[str] = []
    n = dataset.example_count
    seq_len = sequence_length(dataset, model, request)
    estimated = " (estimated)" if dataset.tokens_estimated else ""
    reasons.append(
        f"Data: {n:,} training examples, {dataset.token_count:,} tokens{estimated} "
        f"(mean {dataset.mean_tokens:,.0f}, longest {dataset.max_tokens:,})."
    )
    reasons.append(
        f"Model: {model.name} ({model.family}), {model.total_parameters:,} parameters, "
        f"{model.num_layers} layers, hidden size {model.hidden_size}, "
        f"{model.num_heads} heads ({model.num_kv_heads} KV heads), vocabulary {model.vocab_size:,}."
    )
    reasons.append(
        f"Sequence length {seq_len:,}: the longest example rounded up to {SEQ_ALIGN}, capped at "
        f"{min(model.max_positions, request.max_seq_length or DEFAULT_MAX_SEQ_LENGTH):,}."
    )
    if request.method is not None:
        candidates: tuple[MethodChoice, ...] = (
            _choice(request.method, model, n, request.lora_rank),
        )
        reasons.append(f"Method {request.method} was requested explicitly and is honoured.")
    else:
        candidates, why = candidate_methods(n, model, request.lora_rank)
        reasons.append(f"Method by data size: {why}.")

    mb_pref = preferred_micro_batch(seq_len, n, resources.world_size)
    chosen: tuple[MethodChoice, Attempt] | None = None
    last: tuple[MethodChoice, SearchResult] | None = None
    for index, choice in enumerate(candidates):
        result = search_memory(model, choice, resources, request, seq_len, mb_pref)
        last = (choice, result)
        if result.chosen is not None:
            chosen = (choice, result.chosen)
            reasons.append(_memory_sentence(choice, result.chosen, resources))
            reasons.extend(_zero_sentences(result.chosen, result, resources))
            reasons.extend(_activation_sentences(result.chosen, result, mb_pref, request))
            break
        failure = _failure_sentence(choice, result, resources)
        if index + 1 < len(candidates):
            failure += f" Falling back to {candidates[index + 1].describe()}."
        reasons.append(failure)

    assert last is not None  # candidates is never empty
    error: str | None = None
    if chosen is None:
        choice, result = last
        attempt = result.smallest
        what = (
            "The requested method does not fit" if request.method is not None else "No method fits"
        )
        error = (
            f"{what}: {choice.describe()} needs at least "
            f"{_gib(attempt.memory.per_gpu)} per GPU ({attempt.setting()}) but "
            f"{_gib(attempt.memory.usable)} is usable on each of {resources.world_size} "
            f"x {resources.gpu_memory_gib:g} GiB"
            + (
                f", and {_gib(attempt.memory.cpu_per_node)} of host memory per node for the "
                f"offload but has {_gib(attempt.memory.cpu_memory)}"
                if not attempt.memory.cpu_fits and attempt.memory.cpu_memory is not None
                else ""
            )
            + "; add GPUs, use larger GPUs, shorten the sequences"
            + (", give host memory for offload" if resources.cpu_memory_gib is None else "")
            + (" or choose LoRA." if choice.method is not Method.LORA else ".")
        )
        reasons.append(error)
    else:
        choice, attempt = chosen

    hyper, hyper_reasons = build_hyperparameters(
        dataset,
        model,
        request,
        resources,
        choice,
        seq_len,
        attempt.micro_batch,
        attempt.gradient_checkpointing,
    )
    reasons.extend(hyper_reasons)
    trainable, _ = trainable_and_frozen(model, choice)
    reasons.append(
        f"Trainable parameters: {trainable:,} of {model.total_parameters:,} "
        f"({trainable / model.total_parameters:.2%})."
    )
    return Plan(
        method=choice.method,
        zero_stage=attempt.stage,
        offload=attempt.offload,
        trainable_parameters=trainable,
        total_parameters=model.total_parameters,
        fits=chosen is not None,
        memory=attempt.memory,
        hyperparameters=hyper,
        reasons=tuple(reasons),
        warnings=tuple(data_warnings(dataset, seq_len)),
        example_count=n,
        token_count=dataset.token_count,
        token_count_estimated=dataset.tokens_estimated,
        model_name=model.name,
        model_family=model.family,
        num_nodes=resources.num_nodes,
        gpus_per_node=resources.gpus_per_node,
        error=error,
    )


#: Method Auto switches from its adapter to full fine-tuning at training start when the base
#: model's perplexity on the training targets is at least this many times its perplexity on
#: general text (kubetune.remedies.plan.RISK_RATIO is the same figure): in docs/evidence.md
#: rank-8 LoRA learned such data 7x less well than full fine-tuning, and full fine-tuning
#: with replay kept forgetting low.
SURPRISING_DATA_RATIO = 1.5


def method_alternative(
    dataset: DatasetStats,
    model: ModelArch,
    resources: Resources,
    request: PlanRequest,
    plan: Plan,
) -> tuple[Plan | None, str | None]:
    """For method Auto with an adapter chosen by data size: the full fine-tuning plan the
    trainer switches to when the base model finds the data surprising, if it fits the same
    pods (no offload, so no other host-memory request), with the sentence for the reasons."""
    if request.method is not None or not plan.fits:
        return None, None
    if plan.method not in (Method.LORA, Method.PREFIX):
        return None, None
    full = make_plan(dataset, model, resources, replace(request, method=Method.FULL))
    condition = (
        "when, at training start, the base model's perplexity on the training targets is "
        f"at least {SURPRISING_DATA_RATIO:g}x its perplexity on general text"
    )
    if not full.fits or full.offload is not Offload.NONE:
        setting = f"ZeRO-{full.zero_stage}" + (
            "" if full.offload is Offload.NONE else f", offload {full.offload}"
        )
        return None, (
            f"Method by evidence: stays {plan.method} even {condition}: full fine-tuning "
            f"would need {_gib(full.memory.per_gpu)} per GPU ({setting}, fits: "
            f"{'yes' if full.fits else 'no'}) and the switch keeps to these GPUs without "
            "offload."
        )
    rate = (
        ""
        if request.learning_rate is None
        else f" The requested learning rate ({request.learning_rate:g}) trains the full "
        "weights too; they usually want a lower one than an adapter (3x lower on kubetune's "
        "benchmark model, about 10x in the literature): set spec.method.type to tune a rate "
        "for one method."
    )
    return full, (
        f"Method by evidence: switches to Full fine-tuning (ZeRO-{full.zero_stage}, "
        f"{_gib(full.memory.per_gpu)} per GPU, fits) {condition}: adapters learn such data "
        "far less than full fine-tuning (docs/evidence.md), and replay (remedies Auto) "
        f"limits the forgetting.{rate}"
    )


def format_plan(plan: Plan) -> str:
    """A short human-readable rendering (for ``kubetune plan -o table``)."""
    hp = plan.hyperparameters
    mem = plan.memory.to_dict()
    rows = [
        ("Method", str(plan.method)),
        ("Fits", "yes" if plan.fits else f"NO: {plan.error}"),
        ("ZeRO stage / offload", f"{plan.zero_stage} / {plan.offload}"),
        (
            "Parameters",
            f"{plan.trainable_parameters:,} trainable of {plan.total_parameters:,}",
        ),
        (
            "Memory per GPU",
            f"{mem['perGpuGiB']} GiB of {mem['gpuMemoryGiB']} GiB (model states "
            f"{mem['modelStatesGiB']}, activations {mem['activationsGiB']}, overhead "
            f"{mem['overheadGiB']})",
        ),
        ("Learning rate", f"{hp.learning_rate:g}"),
        ("Epochs / steps", f"{hp.epochs} / {hp.total_steps}"),
        (
            "Batch",
            f"{hp.micro_batch_size} x {hp.gradient_accumulation_steps} accumulation "
            f"= {hp.effective_batch_size}",
        ),
        ("Warmup / eval every", f"{hp.warmup_steps} / {hp.eval_steps} steps"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += ["", "Reasons:"] + [f"  - {r}" for r in plan.reasons]
    if plan.warnings:
        lines += ["", "Warnings:"] + [f"  - {w}" for w in plan.warnings]
    return "\n".join(lines)
