"""QLoRA's quantised base model: what its weights cost, what its compute adds, and where it
cannot run (``docs/planning.md``, "QLoRA").

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314),
section 3: NF4 stores each weight in 4 bits with one absmax constant per block of 64 weights;
double quantisation stores those constants as 8-bit floats with one fp32 constant per 256 of
them, ``8/64 + 32/(64*256) = 0.127`` bits per parameter instead of ``32/64 = 0.5``.

What bitsandbytes quantises is what transformers' ``replace_with_bnb_linear`` converts: the
``nn.Linear`` (and GPT-2's ``Conv1D``) modules of the decoder layers; the LM head is kept in
full precision (``get_keys_to_not_convert``), and peft's ``prepare_model_for_kbit_training``
casts every parameter that is not 4-bit (embeddings, norms, biases, the LM head) to fp32.
In the forward and backward pass bitsandbytes dequantises one layer's weight at a time to the
compute dtype (``bitsandbytes.functional.dequantize_4bit`` in ``MatMul4Bit``).

DoRA (Liu et al. 2024, arXiv:2402.09353) as peft implements it (``DoraLinearLayer`` in
``peft/tuners/lora/dora.py``): a trained magnitude per output feature of every adapted layer;
each forward materialises the (dequantised) base weight plus ``B @ A`` to take its column
norms, and keeps the base layer's output for the magnitude's gradient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kubetune.planning.memory import Offload
from kubetune.planning.model import ModelArch

#: NF4: bits per quantised weight.
NF4_BITS = 4
#: Weights per absmax constant (bitsandbytes' ``blocksize`` for 4-bit, 64).
QUANT_BLOCK = 64
#: Double quantisation: 8-bit constants with one fp32 constant per 256 of them.
DOUBLE_QUANT_BLOCK = 256
#: Bits per quantised weight for its quantisation constants, double-quantised: 0.127.
CONSTANT_BITS = 8 / QUANT_BLOCK + 32 / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK)
#: Bytes per parameter that stays unquantised (fp32 after prepare_model_for_kbit_training).
UNQUANTISED_BYTES = 4
#: Bytes per element of the compute dtype the weights are dequantised to (bf16).
COMPUTE_BYTES = 2
#: QLoRA's settings, as the plan and the trainer's BitsAndBytesConfig name them.
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
#: The ZeRO stages kubetune runs QLoRA with (plain data parallelism over the GPUs).
QLORA_ZERO_STAGES = (0,)
#: The first bitsandbytes release with the native CPU 4-bit path (bitsandbytes PRs #1602,
#: "Add simple op implementations for CPU", and #1628, "Enable CPU/XPU native and ipex path",
#: April-May 2025, NF4 only); 0.50.2 is what the tests train through on the CPU.
BITSANDBYTES_CPU_VERSION = (0, 46)
#: The oldest bitsandbytes that kubetune's trainer uses for QLoRA on GPUs.
BITSANDBYTES_MIN_VERSION = (0, 45)


def quantised_parameters(arch: ModelArch) -> int:
    """The weights bitsandbytes stores in 4 bits: the linear layers' weight matrices of every
    decoder layer (their biases stay unquantised)."""
    per_layer = sum(lin.in_features * lin.out_features for lin in arch.layer_linears)
    return per_layer * arch.num_layers


def quantised_base_bytes(arch: ModelArch) -> int:
    """Bytes of the frozen base model under QLoRA: the 4-bit weights with their
    double-quantised constants, and every other parameter in fp32."""
    quantised = quantised_parameters(arch)
    rest = arch.total_parameters - quantised
    return int(quantised * (NF4_BITS + CONSTANT_BITS) / 8) + UNQUANTISED_BYTES * rest


def _adapted(arch: ModelArch, targets: Iterable[str]) -> list[tuple[int, int]]:
    wanted = set(targets)
    return [
        (lin.in_features, lin.out_features)
        for lin in arch.layer_linears
        if lin.name.rsplit(".", 1)[-1] in wanted
    ]


def transient_weight_bytes(arch: ModelArch, quantised: bool, dora: bool) -> int:
    """The transient bytes one linear layer's compute adds, for its largest weight matrix in
    the compute dtype: the dequantised 4-bit weight (QLoRA), and with DoRA ``B @ A`` and the
    sum whose column norms it takes. LoRA without DoRA on a bf16 base adds nothing."""
    copies = (1 if quantised else 0) + (2 if dora else 0)
    largest = max((lin.in_features * lin.out_features for lin in arch.layer_linears), default=0)
    return copies * COMPUTE_BYTES * largest


def dora_parameters(arch: ModelArch, targets: Iterable[str]) -> int:
    """DoRA's magnitude vectors: one value per output feature of every adapted layer."""
    return sum(out for _, out in _adapted(arch, targets)) * arch.num_layers


def dora_activation_bytes(arch: ModelArch, targets: Iterable[str]) -> int:
    """Bytes per token and layer DoRA keeps on top of LoRA: each adapted layer's base output
    (bf16), which the magnitude's gradient needs."""
    return COMPUTE_BYTES * sum(out for _, out in _adapted(arch, targets))


def qlora_setting_problem(
    zero_stage: int | None, offload: Offload | None
) -> tuple[str, str] | None:
    """(field, message) when the request asks for a ZeRO setting kubetune does not run QLoRA
    with; ``None`` when the setting is fine or left to the planner."""
    if zero_stage is not None and zero_stage not in QLORA_ZERO_STAGES:
        why = (
            "ZeRO-3 would partition the 4-bit weights, which needs bitsandbytes' "
            "bnb_4bit_quant_storage and a quantised zero.Init load that kubetune does not set up"
            if zero_stage == 3
            else f"ZeRO-{zero_stage} would partition only the LoRA states, a few hundred MiB "
            "at most, and kubetune does not run DeepSpeed over a 4-bit model"
        )
        return (
            "spec.deepspeed.zeroStage",
            f"method QLoRA runs with ZeRO-0 (data parallel) only: {why}; set zeroStage "
            "to 0 or Auto, or choose LoRA",
        )
    if offload is not None and offload is not Offload.NONE:
        return (
            "spec.deepspeed.offload",
            f"method QLoRA does not offload (offload {offload} needs a ZeRO stage, and QLoRA "
            "runs with ZeRO-0): set offload to None or Auto, or choose LoRA",
        )
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version ("0.50.2" -> (0, 50, 2), "0.48.0.dev0" ->
    (0, 48, 0))."""
    parts: list[int] = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(part):  # "2rc1": the release's numbers end here
            break
    return tuple(parts)


def bitsandbytes_problem(version: str | None, accelerator: str) -> str | None:
    """Why QLoRA cannot run with this bitsandbytes (``None``: not installed) on this
    accelerator ("GPU" or "CPU"), or ``None`` when it can."""
    if version is None:
        return (
            "method QLoRA needs bitsandbytes, which is not installed in the trainer's "
            "environment (pip install 'kubetune[trainer]')"
        )
    have = version_tuple(version)
    if have < BITSANDBYTES_MIN_VERSION:
        need = ".".join(map(str, BITSANDBYTES_MIN_VERSION))
        return f"method QLoRA needs bitsandbytes >= {need}; {version} is installed"
    if accelerator == "CPU" and have < BITSANDBYTES_CPU_VERSION:
        need = ".".join(map(str, BITSANDBYTES_CPU_VERSION))
        return (
            f"method QLoRA on the CPU needs bitsandbytes >= {need} (its CPU 4-bit path); "
            f"{version} is installed: upgrade it, train on GPUs, or choose LoRA"
        )
    return None
