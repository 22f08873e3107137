"""The sentences of a plan: the inputs it was made from, the memory search's outcome,
the fallback and failure, and the warnings about the data."""

from __future__ import annotations

from kubetune.planning.inputs import DatasetStats, PlanRequest, Resources
from kubetune.planning.memory import FROZEN_BYTES, Offload
from kubetune.planning.methods import MethodChoice
from kubetune.planning.model import ModelArch
from kubetune.planning.quantization import quantised_base_bytes
from kubetune.planning.search import Attempt, SearchResult, gib
from kubetune.planning.thresholds import DEFAULT_MAX_SEQ_LENGTH, SEQ_ALIGN, SMALL_DATA


def input_sentences(
    dataset: DatasetStats, model: ModelArch, request: PlanRequest, seq_len: int
) -> list[str]:
    """What the plan starts from: the data, the model and the sequence length."""
    estimated = " (estimated)" if dataset.tokens_estimated else ""
    cap = min(model.max_positions, request.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
    return [
        f"Data: {dataset.example_count:,} training examples, {dataset.token_count:,} "
        f"tokens{estimated} (mean {dataset.mean_tokens:,.0f}, longest {dataset.max_tokens:,})."
        + (f" {dataset.quality_note}" if dataset.quality_note else ""),
        f"Model: {model.name} ({model.family}), {model.total_parameters:,} parameters, "
        f"{model.num_layers} layers, hidden size {model.hidden_size}, "
        f"{model.num_heads} heads ({model.num_kv_heads} KV heads), vocabulary "
        f"{model.vocab_size:,}.",
        f"Sequence length {seq_len:,}: the longest example rounded up to {SEQ_ALIGN}, capped "
        f"at {cap:,}.",
    ]


def data_warnings(dataset: DatasetStats, seq_len: int) -> list[str]:
    """What in the data deserves a warning: little of it, duplicates, leakage, overlong
    or truncated examples, estimated token counts."""
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
            f"{dataset.duplicate_count:,} duplicate training examples kept "
            f"({dataset.duplicate_count / n:.1%}): duplicates are memorised first; set "
            "spec.dataset.deduplicate.exact and .near to true (the defaults) to remove them."
        )
    if dataset.leakage_count:
        warnings.append(
            f"{dataset.leakage_count:,} validation examples duplicate training examples "
            "(exactly or nearly; the plan's data.leakage decision names some): evaluation "
            "loss will look better than it is and early stopping will act late."
        )
    if dataset.overlong_count:
        first = f" (the first: {dataset.overlong_example})" if dataset.overlong_example else ""
        warnings.append(
            f"{dataset.overlong_count:,} of {n:,} training examples are longer than the "
            f"planned sequence length of {seq_len:,} tokens and will be truncated, cutting "
            f"their completions{first}; set spec.dataset.overlongRows: Drop to leave them out "
            "or raise spec.dataset.maxSeqLength."
        )
    elif dataset.max_tokens > seq_len:
        warnings.append(
            f"The longest example has {dataset.max_tokens:,} tokens, more than the planned "
            f"sequence length of {seq_len:,}: longer examples are truncated."
        )
    if dataset.tokens_estimated:
        warnings.append(
            "Token counts are estimated from the text "
            f"({dataset.estimate_reason or 'no tokenizer was available'}): sequence "
            "length, steps and memory may be off; plan again with the tokenizer to be sure."
        )
    return warnings


def memory_sentence(choice: MethodChoice, attempt: Attempt, resources: Resources) -> str:
    mem = attempt.memory
    return (
        f"{choice.describe()} needs {gib(mem.per_gpu)} per GPU (model states "
        f"{gib(mem.model_states)}, activations {gib(mem.activations)}, overhead "
        f"{gib(mem.overhead)}) with ZeRO-{attempt.stage}, offload {attempt.offload}, "
        f"micro-batch {attempt.micro_batch}; {gib(mem.usable)} of "
        f"{resources.gpu_memory_gib:g} GiB is usable per {resources.accelerator} with a "
        f"{(mem.gpu_memory - mem.usable) / mem.gpu_memory:.0%} margin."
    )


def quantised_sentence(
    model: ModelArch,
    lora: MethodChoice,
    lora_result: SearchResult,
    attempt: Attempt,
    resources: Resources,
) -> str:
    """Why Auto planned QLoRA: LoRA's smallest need against the usable memory, the base
    model's bytes in 4 bits against bf16, and QLoRA's need."""
    best = lora_result.smallest
    return (
        f"QLoRA because {lora.describe()} does not fit: its smallest setting needs "
        f"{gib(best.memory.per_gpu)} per GPU and {gib(best.memory.usable)} is usable on each of "
        f"{resources.world_size} x {resources.gpu_memory_gib:g} GiB; quantised to 4-bit NF4 "
        "with double-quantised constants (the rest in fp32), the base model's weights take "
        f"{gib(quantised_base_bytes(model))} instead of "
        f"{gib(FROZEN_BYTES * model.total_parameters)} in bf16, and QLoRA needs "
        f"{gib(attempt.memory.per_gpu)} per GPU, which fits."
    )


def failure_sentence(choice: MethodChoice, result: SearchResult, resources: Resources) -> str:
    best = result.smallest
    sentence = (
        f"{choice.describe()} does not fit on {resources.world_size} x "
        f"{resources.gpu_memory_gib:g} GiB: its smallest setting ({best.describe()}) exceeds "
        f"the {gib(best.memory.usable)} usable"
    )
    if not best.memory.cpu_fits and best.memory.cpu_memory is not None:
        sentence += (
            f" or needs {gib(best.memory.cpu_per_node)} of host memory per node "
            f"(have {gib(best.memory.cpu_memory)})"
        )
    if resources.cpu_memory_gib is None:
        sentence += "; offload was not considered because host memory was not given"
    return sentence + "."


def zero_sentences(attempt: Attempt, result: SearchResult, resources: Resources) -> list[str]:
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
            f"ZeRO-{a.stage}/{a.offload} needs {gib(a.memory.per_gpu)}" for a in smaller
        )
        lead = f"{world} GPUs: the smallest ZeRO stage that fits is {attempt.stage}"
        if attempt.offload is not Offload.NONE:
            lead += f" with {attempt.offload} offload"
        sentences.append(lead + (f" ({tried})." if tried else "."))
    if attempt.offload is not Offload.NONE:
        sentences.append(
            f"Offload keeps {gib(attempt.memory.cpu_per_node)} in host memory per node."
        )
    return sentences


def activation_sentences(
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
            f": without it ZeRO-{without[-1].stage} at micro-batch {without[-1].micro_batch} "
            f"needs {gib(without[-1].memory.per_gpu)} per GPU"
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


def no_fit_error(
    choice: MethodChoice, attempt: Attempt, resources: Resources, requested: bool
) -> str:
    """Why nothing fits, with the smallest setting's needs and what would help."""
    what = "The requested method does not fit" if requested else "No method fits"
    mem = attempt.memory
    host = (
        f", and {gib(mem.cpu_per_node)} of host memory per node for the "
        f"offload but has {gib(mem.cpu_memory)}"
        if not mem.cpu_fits and mem.cpu_memory is not None
        else ""
    )
    return (
        f"{what}: {choice.describe()} needs at least {gib(mem.per_gpu)} per GPU "
        f"({attempt.setting()}) but {gib(mem.usable)} is usable on each of "
        f"{resources.world_size} x {resources.gpu_memory_gib:g} GiB{host}"
        "; add GPUs, use larger GPUs, shorten the sequences"
        + (", give host memory for offload" if resources.cpu_memory_gib is None else "")
        + (" or choose LoRA." if not choice.method.is_lora else ".")
    )
