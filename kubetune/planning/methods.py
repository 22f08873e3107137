"""The fine-tuning methods, their size knobs and their trainable parameters, and the
methods to try for a dataset size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from kubetune.planning.model import ModelArch
from kubetune.planning.quantization import dora_parameters
from kubetune.planning.thresholds import (
    LARGE_DATA,
    LORA_RANK_HIGH,
    LORA_RANK_MEDIUM,
    LORA_RANK_SMALL,
    LORA_TARGET_MODULES,
    MEDIUM_DATA,
    PARTIAL_FRACTION,
    PARTIAL_FROM,
    PREFIX_TOKENS,
    SMALL_DATA,
)


class Method(StrEnum):
    """Fine-tuning methods, as the API spells them."""

    FULL = "Full"
    PARTIAL = "Partial"
    LORA = "LoRA"
    QLORA = "QLoRA"
    PREFIX = "Prefix"

    @property
    def is_lora(self) -> bool:
        """LoRA adapters, on a bf16 (LoRA) or a 4-bit (QLoRA) base."""
        return self in (Method.LORA, Method.QLORA)


@dataclass(frozen=True)
class MethodSettings:
    """The size knobs the user set for each method (``spec.method.lora/prefix/partial``);
    ``None`` means "decide". ``partial_layers`` and ``partial_fraction`` exclude each other."""

    lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_use_dora: bool = False
    prefix_tokens: int | None = None
    partial_layers: int | None = None
    partial_fraction: float | None = None


@dataclass(frozen=True)
class MethodChoice:
    """A method with its size knobs (LoRA rank and targets, prefix tokens, trained layers)."""

    method: Method
    lora_rank: int | None = None
    prefix_tokens: int | None = None
    trainable_layers: int | None = None
    lora_target_modules: tuple[str, ...] | None = None
    """The LoRA targets; ``None`` means the family's default (every linear layer)."""
    use_dora: bool = False
    """DoRA: the LoRA adapters also train a magnitude per output feature."""

    def describe(self) -> str:
        if self.method.is_lora:
            dora = ", DoRA" if self.use_dora else ""
            base = ", 4-bit NF4 base" if self.method is Method.QLORA else ""
            return f"{self.method} (rank {self.lora_rank}{dora}{base})"
        if self.method is Method.PREFIX:
            return f"Prefix ({self.prefix_tokens} virtual tokens)"
        if self.method is Method.PARTIAL:
            return f"Partial (top {self.trainable_layers} layers)"
        return "Full"


# ---- LoRA targets ------------------------------------------------------------------------------


def lora_target_modules(arch: ModelArch) -> tuple[str, ...]:
    """The family's default LoRA targets: every linear layer of the blocks. For a family
    outside the table, the linear layers its safetensors headers name, else the Llama-like
    names its shapes are assumed to have (``ModelArch.layer_linears`` either way)."""
    return LORA_TARGET_MODULES.get(arch.family) or lora_module_names(arch)


def lora_module_names(arch: ModelArch) -> tuple[str, ...]:
    """The names LoRA can target in a decoder layer (each linear's last module name)."""
    return tuple(dict.fromkeys(lin.name.rsplit(".", 1)[-1] for lin in arch.layer_linears))


def lora_targets(arch: ModelArch, requested: Iterable[str] | None) -> tuple[str, ...]:
    """The requested LoRA targets (in order, without repeats), or the family's default when
    none are requested. Raises ValueError naming the valid names for an unknown one."""
    wanted = tuple(dict.fromkeys(requested or ()))
    if not wanted:
        return lora_target_modules(arch)
    if not arch.in_table and not arch.header_linears:
        # A family outside the table with no safetensors headers read: its layer names are
        # a guess, so the requested names go to the trainer, where peft matches them.
        return wanted
    valid = lora_module_names(arch)
    unknown = [name for name in wanted if name not in valid]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear layer "
            f"of a {arch.family} decoder layer; valid names: {', '.join(valid)}"
        )
    return wanted


def _targeted(arch: ModelArch, targets: Iterable[str] | None) -> list[int]:
    """Indices of the layer's linears that LoRA adapts."""
    wanted = set(lora_target_modules(arch) if targets is None else targets)
    return [i for i, lin in enumerate(arch.layer_linears) if lin.name.rsplit(".", 1)[-1] in wanted]


# ---- trainable parameters ----------------------------------------------------------------------


def lora_parameters(arch: ModelArch, rank: int, targets: Iterable[str] | None = None) -> int:
    """LoRA adds ``rank * (in + out)`` parameters to every targeted linear layer."""
    linears = arch.layer_linears
    per_layer = sum(
        rank * (linears[i].in_features + linears[i].out_features) for i in _targeted(arch, targets)
    )
    return per_layer * arch.num_layers


def lora_input_bytes(arch: ModelArch, targets: Iterable[str] | None = None) -> int:
    """Bytes per token and layer that LoRA keeps besides the base layer: the (dropout)
    copy of every adapted linear layer's input, in bf16."""
    linears = arch.layer_linears
    return 2 * sum(linears[i].in_features for i in _targeted(arch, targets))


def prefix_parameters(arch: ModelArch, tokens: int) -> int:
    """Prefix tuning: a key and a value vector per virtual token, layer and KV head."""
    return tokens * arch.num_layers * 2 * arch.kv_dim


def partial_layer_count(
    arch: ModelArch, layers: int | None = None, fraction: float | None = None
) -> int:
    """The decoder layers Partial trains: ``layers`` as given, else ``fraction`` of the
    model's layers rounded up (the top half by default). Raises ValueError when more
    layers are asked for than the model has."""
    if layers is not None:
        if not 1 <= layers <= arch.num_layers:
            raise ValueError(
                f"{layers} trainable layers asked for, but {arch.name or arch.family} has "
                f"{arch.num_layers} decoder layers"
            )
        return layers
    share = PARTIAL_FRACTION if fraction is None else fraction
    # Rounded first so that 0.3 x 10 is 3 layers, not 4.
    return max(1, min(arch.num_layers, math.ceil(round(share * arch.num_layers, 9))))


def partial_parameters(arch: ModelArch, layers: int) -> int:
    """Partial fine-tuning trains the top ``layers`` decoder layers and the final norm."""
    return layers * arch.layer_parameters + arch.final_norm_parameters


def trainable_and_frozen(arch: ModelArch, choice: MethodChoice) -> tuple[int, int]:
    """(trainable, frozen) parameters; adapters are extra, the base stays frozen."""
    total = arch.total_parameters
    if choice.method is Method.FULL:
        return total, 0
    if choice.method is Method.PARTIAL:
        trainable = partial_parameters(arch, choice.trainable_layers or 0)
        return trainable, total - trainable
    if choice.method.is_lora:
        rank = choice.lora_rank or LORA_RANK_SMALL
        trainable = lora_parameters(arch, rank, choice.lora_target_modules)
        if choice.use_dora:
            trainable += dora_parameters(
                arch, choice.lora_target_modules or lora_target_modules(arch)
            )
        return trainable, total
    return prefix_parameters(arch, choice.prefix_tokens or PREFIX_TOKENS), total


# ---- methods by data size ----------------------------------------------------------------------


def band_rank(examples: int) -> int:
    """The LoRA rank for a dataset size."""
    if examples < SMALL_DATA:
        return LORA_RANK_SMALL
    if examples < MEDIUM_DATA:
        return LORA_RANK_MEDIUM
    return LORA_RANK_HIGH


def method_choice(
    method: Method, arch: ModelArch, examples: int, settings: MethodSettings | None = None
) -> MethodChoice:
    """``method`` with its knobs: the user's settings, else the planner's defaults."""
    s = settings or MethodSettings()
    if method.is_lora:
        return MethodChoice(
            method,
            lora_rank=s.lora_rank or band_rank(examples),
            lora_target_modules=lora_targets(arch, s.lora_target_modules),
            use_dora=s.lora_use_dora,
        )
    if method is Method.PREFIX:
        return MethodChoice(method, prefix_tokens=s.prefix_tokens or PREFIX_TOKENS)
    if method is Method.PARTIAL:
        layers = partial_layer_count(arch, s.partial_layers, s.partial_fraction)
        return MethodChoice(method, trainable_layers=layers)
    return MethodChoice(method)


def _partial_part(arch: ModelArch, settings: MethodSettings) -> str:
    """What Partial trains, in words: "the top half" unless the user said otherwise."""
    if settings.partial_layers is None and settings.partial_fraction is None:
        return "the top half of the network"
    layers = partial_layer_count(arch, settings.partial_layers, settings.partial_fraction)
    return f"the top {layers} of the network's {arch.num_layers} layers"


def candidate_methods(
    examples: int, arch: ModelArch, settings: MethodSettings | None = None
) -> tuple[tuple[MethodChoice, ...], str]:
    """Methods in order of preference for a dataset size, and the sentence saying why."""
    s = settings or MethodSettings()
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
            f"{MEDIUM_DATA:,}-{LARGE_DATA:,} band: enough data to train "
            f"{_partial_part(arch, s)} (Partial), with high-rank LoRA as the fallback"
        )
        methods = (Method.PARTIAL, Method.LORA)
    else:
        why = (
            f"{n} examples is over {LARGE_DATA:,}: full fine-tuning is viable, with "
            "Partial and high-rank LoRA as the fallbacks"
        )
        methods = (Method.FULL, Method.PARTIAL, Method.LORA)
    return tuple(method_choice(m, arch, examples, s) for m in methods), why
