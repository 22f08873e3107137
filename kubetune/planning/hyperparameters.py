"""The hyperparameters: sequence length, batch, epochs and steps, warm-up, evaluation
interval, learning rate, regularisation and the method's own settings, each with its reason.

``training_steps`` is the one place that turns examples into optimizer steps; the planner,
the spec's overrides and the decisions at training start all use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kubetune.api.plan import Decision, HyperparametersPlan
from kubetune.planning.inputs import DatasetStats, PlanRequest, Resources
from kubetune.planning.methods import Method, MethodChoice, lora_target_modules
from kubetune.planning.model import ModelArch
from kubetune.planning.quantization import DOUBLE_QUANT, QUANT_TYPE
from kubetune.planning.thresholds import (
    DEFAULT_MAX_SEQ_LENGTH,
    EFFECTIVE_BATCH,
    EFFECTIVE_BATCH_LARGE,
    EPOCH_PIVOT,
    EPOCH_SCALE,
    LARGE_MODEL_PARAMS,
    LORA_RANK_SMALL,
    MAX_EPOCHS,
    MAX_GRAD_NORM,
    MAX_MICRO_BATCH,
    MAX_MICRO_BATCH_GPU,
    MEDIUM_DATA,
    MIN_EPOCHS,
    MIN_WARMUP_RUN,
    SEQ_ALIGN,
    SMALL_DATA,
    TARGET_EVALUATIONS,
    TOKENS_PER_MICRO_BATCH,
    TOKENS_PER_MICRO_BATCH_GPU,
    WARMUP_FRACTION,
)

#: The training hyperparameters of a plan: the plan document's own section.
Hyperparameters = HyperparametersPlan


def sequence_cap(arch: ModelArch, request: PlanRequest) -> int:
    """The longest sequence a plan may have: the model's positions, the requested
    ``maxSeqLength`` or the default, whichever is least. Examples longer than this are the
    ones the trainer would truncate."""
    return min(arch.max_positions, request.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)


def sequence_length(dataset: DatasetStats, arch: ModelArch, request: PlanRequest) -> int:
    """The longest example rounded up to a multiple of 64, capped by the model and request."""
    cap = sequence_cap(arch, request)
    aligned = math.ceil(dataset.max_tokens / SEQ_ALIGN) * SEQ_ALIGN
    return max(1, min(cap, aligned))


def target_effective_batch(examples: int) -> int:
    for limit, batch in EFFECTIVE_BATCH:
        if examples < limit:
            return min(batch, examples)
    return EFFECTIVE_BATCH_LARGE


def preferred_micro_batch(
    seq_len: int, examples: int, world_size: int, accelerator: str = "CPU"
) -> int:
    """About 4k tokens per micro-batch, 1..8, and no more than the batch target needs.

    On a GPU, about 16k tokens and 1..16: the largest micro-batch the memory search may
    start from (it halves from there; the 4k-token size is where recomputation begins).
    """
    gpu = accelerator == "GPU"
    tokens = TOKENS_PER_MICRO_BATCH_GPU if gpu else TOKENS_PER_MICRO_BATCH
    cap = MAX_MICRO_BATCH_GPU if gpu else MAX_MICRO_BATCH
    by_tokens = 1 << max(0, (tokens // seq_len).bit_length() - 1)
    by_target = max(1, target_effective_batch(examples) // world_size)
    return max(1, min(cap, by_tokens, by_target))


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
    if method.is_lora:
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


class TrainingSteps(NamedTuple):
    """Optimizer steps per epoch and in all."""

    steps_per_epoch: int
    total_steps: int


def training_steps(
    examples: int, micro_batch: int, accumulation: int, world_size: int, epochs: float
) -> TrainingSteps:
    """One optimizer step per ``micro_batch x world_size x accumulation`` examples (the
    last batch of an epoch may be short), at least one per epoch; ``epochs`` passes, the
    total rounded up and at least one step."""
    effective = max(1, micro_batch) * max(1, world_size) * max(1, accumulation)
    per_epoch = max(1, math.ceil(examples / effective))
    return TrainingSteps(per_epoch, total_steps_for(per_epoch, epochs))


def total_steps_for(steps_per_epoch: int, epochs: float) -> int:
    """The steps of ``epochs`` passes of ``steps_per_epoch`` steps: rounded up, at least one
    (for a plan whose steps per epoch are already known, as at training start)."""
    return max(1, math.ceil(steps_per_epoch * epochs))


def _epochs(request: PlanRequest, examples: int) -> tuple[int, str]:
    """The epoch count and its reason."""
    if request.epochs is not None:
        return request.epochs, f"Epochs: {request.epochs}, set by the request."
    epochs = epochs_for(examples)
    return epochs, (
        f"Epochs: {epochs} = round({EPOCH_SCALE:g} x sqrt({EPOCH_PIVOT:,} / {examples:,})) "
        f"bounded to {MIN_EPOCHS}-{MAX_EPOCHS}; small sets get more passes and early stopping "
        "ends the run when evaluation loss stops improving."
    )


def _learning_rate(request: PlanRequest, method: Method, arch: ModelArch) -> tuple[float, str]:
    """The learning rate and its reason."""
    if request.learning_rate is not None:
        lr = request.learning_rate
        return lr, f"Learning rate {lr:g}, set by the request."
    lr = learning_rate_for(method, arch, request.incremental)
    detail = " lowered because the base model is already fine-tuned" if request.incremental else ""
    return lr, (
        f"Learning rate {lr:g} for {method} on a "
        f"{arch.total_parameters / 1e9:.2f}B-parameter model{detail}, with a cosine decay."
    )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's hyperparameters as planned."""

    rank: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    use_dora: bool


def lora_settings(
    choice: MethodChoice, arch: ModelArch, request: PlanRequest, dropout: float
) -> tuple[LoraSettings, str]:
    """Rank (chosen), alpha (twice the rank), dropout (the plan's) and targets (every
    linear layer of the blocks) unless the request sets them, and the sentence."""
    rank = choice.lora_rank or LORA_RANK_SMALL
    lora = LoraSettings(
        rank=rank,
        alpha=request.lora_alpha or 2 * rank,
        dropout=dropout if request.lora_dropout is None else request.lora_dropout,
        target_modules=choice.lora_target_modules or lora_target_modules(arch),
        use_dora=choice.use_dora,
    )
    asked = [
        name
        for name, value in (
            ("alpha", request.lora_alpha),
            ("dropout", request.lora_dropout),
            ("target modules", request.lora_target_modules),
            ("DoRA", request.lora_use_dora or None),
        )
        if value is not None
    ]
    dropout_part = "" if request.lora_dropout is None else f", dropout {lora.dropout:g}"
    sentence = (
        f"{'DoRA' if lora.use_dora else 'LoRA'} rank {lora.rank}, alpha {lora.alpha}"
        f"{dropout_part} on "
        f"{', '.join(lora.target_modules)} ({arch.family})"
    )
    if request.lora_target_modules is None:
        sentence += ": every linear layer of the blocks"
    if asked:
        sentence += f"; {_and(asked)} set by the request"
    return lora, sentence + "."


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def build_hyperparameters(
    dataset: DatasetStats,
    arch: ModelArch,
    request: PlanRequest,
    resources: Resources,
    choice: MethodChoice,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
) -> tuple[Hyperparameters, list[Decision]]:
    """Hyperparameters for the chosen method and micro-batch, and the reasons."""
    n = dataset.example_count
    world = resources.world_size
    target = target_effective_batch(n)
    accumulation = max(1, round(target / (micro_batch * world)))
    effective = micro_batch * world * accumulation
    epochs, epochs_reason = _epochs(request, n)
    steps_per_epoch, total = training_steps(n, micro_batch, accumulation, world, epochs)
    reasons = [
        Decision(key="epochs", value=str(epochs), sentence=epochs_reason),
        Decision(
            key="batch",
            value=str(effective),
            sentence=f"Batch: micro-batch {micro_batch} x {world} GPU(s) x {accumulation} "
            f"accumulation step(s) = {effective} examples per step (target {target} for {n:,} "
            f"examples), {steps_per_epoch} step(s) per epoch, {total} steps in all.",
        ),
    ]
    warmup = warmup_steps_for(total)
    reasons.append(
        Decision(
            key="warmup",
            value=str(warmup),
            sentence=f"Warmup: {warmup} step(s), {WARMUP_FRACTION:.0%} of the run's {total} "
            "steps (a fixed 100-500 warmup would swallow a short run)."
            if warmup
            else f"Warmup: none, the run has only {total} steps.",
        )
    )
    eval_steps = eval_steps_for(total)
    reasons.append(
        Decision(
            key="evalSteps",
            value=str(eval_steps),
            sentence=f"Evaluation every {eval_steps} step(s): {total // eval_steps} evaluations, "
            "enough points for early stopping to see the validation curve turn.",
        )
    )
    lr, lr_reason = _learning_rate(request, choice.method, arch)
    reasons.append(Decision(key="learningRate", value=f"{lr:g}", sentence=lr_reason))
    weight_decay, dropout = regularisation_for(n)
    reasons.append(
        Decision(
            key="regularisation",
            sentence=f"Regularisation for {n:,} examples: weight decay {weight_decay:g}, "
            f"dropout {dropout:g}, gradient clipping at {MAX_GRAD_NORM:g}.",
        )
    )
    lora: LoraSettings | None = None
    if choice.method.is_lora:
        lora, lora_reason = lora_settings(choice, arch, request, dropout)
        reasons.append(Decision(key="lora", value=str(lora.rank), sentence=lora_reason))
    quantised = choice.method is Method.QLORA
    quantised_on_gpu = resources.accelerator == "GPU"
    compute_dtype = "bfloat16" if quantised_on_gpu else "float32"
    if quantised:
        reasons.append(
            Decision(
                key="quantization",
                value=QUANT_TYPE,
                sentence=f"QLoRA base: 4-bit {QUANT_TYPE.upper()} weights with double "
                f"quantisation (bitsandbytes), dequantised to {compute_dtype} for each matrix "
                f"multiply ({'bf16 on GPUs' if quantised_on_gpu else 'the CPU trains in fp32'}).",
            )
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
        lr_scheduler="cosine",
        lora_rank=None if lora is None else lora.rank,
        lora_alpha=None if lora is None else lora.alpha,
        lora_dropout=None if lora is None else lora.dropout,
        lora_target_modules=None if lora is None else list(lora.target_modules),
        lora_use_dora=None if lora is None else lora.use_dora,
        quant_type=QUANT_TYPE if quantised else None,
        double_quant=DOUBLE_QUANT if quantised else None,
        compute_dtype=compute_dtype if quantised else None,
        prefix_tokens=choice.prefix_tokens if choice.method is Method.PREFIX else None,
        trainable_layers=choice.trainable_layers if choice.method is Method.PARTIAL else None,
    )
    return hyper, reasons
