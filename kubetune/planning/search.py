"""The memory search: the ZeRO and activation ladders, and the first setting that fits."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.planning.inputs import PlanRequest, Resources
from kubetune.planning.memory import (
    GIB,
    MemoryEstimate,
    Offload,
    activation_bytes,
    estimate_memory,
    model_state_bytes,
)
from kubetune.planning.methods import (
    Method,
    MethodChoice,
    lora_input_bytes,
    lora_target_modules,
    trainable_and_frozen,
)
from kubetune.planning.model import ModelArch
from kubetune.planning.quantization import (
    QLORA_ZERO_STAGES,
    dora_activation_bytes,
    quantised_base_bytes,
    transient_weight_bytes,
)


def gib(value: int) -> str:
    """Bytes as GiB with one decimal, as the reasons print them."""
    return f"{value / GIB:.1f} GiB"


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
    recompute_from: int | None = None,
) -> tuple[tuple[int, bool], ...]:
    """(micro-batch, gradient checkpointing) settings, fastest first.

    The preferred micro-batch without checkpointing, halving without it down to
    ``recompute_from`` (the preferred size when not given), then that size with it, then
    halving the micro-batch down to 1 (with checkpointing unless the user turned it off).
    Halving a large micro-batch costs less speed than recomputing every layer (about a
    third more compute), down to the size where a GPU's matrix units are still busy.
    """
    sizes = [micro_batch] if micro_batch else _halvings(preferred_micro_batch)
    if gradient_checkpointing is not None:
        return tuple((mb, gradient_checkpointing) for mb in sizes)
    # Recompute from the largest size at or below recompute_from (a user's size: at once).
    limit = sizes[0] if micro_batch or not recompute_from else recompute_from
    floor = next((mb for mb in sizes if mb <= limit), sizes[-1])
    fast = [(mb, False) for mb in sizes if mb >= floor]
    return (*fast, *((mb, True) for mb in sizes if mb <= floor))


def _halvings(start: int) -> list[int]:
    sizes = [max(1, start)]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


@dataclass(frozen=True)
class Attempt:
    """One setting the search tried, and the memory it needs."""

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
        return f"{self.setting()}: {gib(self.memory.per_gpu)} per GPU"


@dataclass(frozen=True)
class SearchResult:
    """The setting that fits (``None`` if none does) and every setting tried, in order."""

    chosen: Attempt | None
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)

    @property
    def smallest(self) -> Attempt:
        return min(self.attempts, key=lambda a: (a.memory.per_gpu, a.memory.cpu_per_node))


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
    quantised = choice.method is Method.QLORA
    states = model_state_bytes(
        trainable=trainable,
        frozen=frozen,
        largest_layer=arch.largest_layer_parameters,
        stage=stage,
        offload=offload,
        gpus_per_node=resources.gpus_per_node,
        num_nodes=resources.num_nodes,
        zero_init=request.zero_init,
        frozen_bytes=quantised_base_bytes(arch) if quantised else None,
        # As the trainer (kubetune.trainer.setup.load_in_bf16): one GPU process at ZeRO-0
        # trains Full and Partial without DeepSpeed, fp32 weights under bf16 autocast.
        autocast_fp32=stage == 0
        and resources.world_size == 1
        and resources.accelerator == "GPU"
        and choice.method in (Method.FULL, Method.PARTIAL),
    )
    layers = choice.trainable_layers if choice.method is Method.PARTIAL else None
    adapter_bytes = 0
    if choice.method.is_lora:
        adapter_bytes = lora_input_bytes(arch, choice.lora_target_modules)
        if choice.use_dora:
            targets = choice.lora_target_modules or lora_target_modules(arch)
            adapter_bytes += dora_activation_bytes(arch, targets)
    activations = activation_bytes(
        arch,
        seq_len,
        micro_batch,
        checkpointing,
        layers_with_grad=layers,
        flash_attention=request.flash_attention,
        adapter_input_bytes=adapter_bytes,
    )
    if choice.method.is_lora:
        activations += transient_weight_bytes(arch, quantised, choice.use_dora)
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
    recompute_from: int | None = None,
) -> SearchResult:
    """The first setting that fits, in this order (cheapest in speed first):

    1. for each activation setting, the smallest of the stages that cost no extra
       communication (ZeRO-0/1/2; on one GPU only ZeRO-0);
    2. then ZeRO-3, then the offload settings, each through the activation settings.
    """
    offload_allowed = resources.cpu_memory_gib is not None
    ladder = zero_ladder(resources.world_size, request.zero_stage, request.offload, offload_allowed)
    if choice.method is Method.QLORA:  # 4-bit weights: plain data parallelism only
        ladder = tuple(z for z in ladder if z[0] in QLORA_ZERO_STAGES and z[1] is Offload.NONE)
    acts = activation_ladder(
        preferred_micro_batch,
        request.gradient_checkpointing,
        request.micro_batch_size,
        recompute_from,
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
