"""Per-GPU memory model: model states, activations and runtime overhead.

Model states follow the byte accounting of DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage_1_and_2.py``
and ``estimate_zero3_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage3.py``,
DeepSpeed >= 0.14.1, after PR #5099), extended to ZeRO-0/1, to frozen base weights (PEFT)
and to a per-component breakdown. Per trainable parameter, mixed-precision Adam keeps:

* 2 bytes of bf16 weights and 2 bytes of bf16 gradients,
* 4 bytes of fp32 gradients (the partition the ZeRO optimizer reduces into and steps on),
* 12 bytes of fp32 master weights plus Adam's m and v,

that is 20 bytes, of which ZeRO-1 partitions the 16 optimizer-side bytes, ZeRO-2 also the
bf16 gradients (18 bytes), and ZeRO-3 keeps 18 bytes per parameter in partitioned form plus
the gathered bf16 weights and gradients of the largest layer (4 bytes x its parameters).
Frozen weights cost 2 bytes (bf16) and are partitioned only by ZeRO-3.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4.1: ``s*b*h*(34 + 5*a*s/h)`` bytes per
layer, generalised to grouped-query attention, gated MLPs and fused attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kubetune.planning.model import ModelArch

GIB = 1024**3

#: Bytes per trainable parameter, DeepSpeed's accounting (see the module docstring).
BF16_WEIGHT_BYTES = 2
BF16_GRAD_BYTES = 2
FP32_GRAD_BYTES = 4
ADAM_STATE_BYTES = 12  # fp32 master weights + m + v
TRAINABLE_BYTES = BF16_WEIGHT_BYTES + BF16_GRAD_BYTES + FP32_GRAD_BYTES + ADAM_STATE_BYTES
#: Bytes per frozen parameter (bf16 weights only).
FROZEN_BYTES = 2
#: One process without DeepSpeed (ZeRO-0, Full or Partial): the model trains in fp32 under
#: bf16 autocast, so a trainable parameter keeps fp32 weights, fp32 gradients and Adam's m
#: and v (16 bytes, no bf16 copy: autocast casts each layer's weights per use), and a frozen
#: one its fp32 weights. Measured on an H200 (bench/RESULTS.md, 2026-11-28): the 20-byte
#: figure over-predicted a 1.1B and a 3.4B Llama's peak by 11-16%.
AUTOCAST_TRAINABLE_BYTES = 4 + 4 + 8
AUTOCAST_FROZEN_BYTES = 4
#: fp32 weights a process materialises on the host while loading the model.
FP32_LOAD_BYTES = 4
#: DeepSpeed's ``additional_buffer_factor`` default for host memory (pinned buffers etc.).
CPU_BUFFER_FACTOR = 1.5

#: Runtime overhead per GPU: CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers take
#: 0.5-1 GiB on current GPUs (PyTorch "CUDA semantics: memory management" notes; measured
#: ~0.5 GiB for the context alone on A100/H100); we reserve 1 GiB.
CUDA_CONTEXT_BYTES = 1 * GIB
#: On a CPU "accelerator" (local mode, DS_ACCELERATOR=cpu) there is no device context.
CPU_CONTEXT_BYTES = GIB // 4
#: The caching allocator's fragmentation: reserved but unusable memory, ~10% of the
#: allocated working set in practice (PyTorch memory snapshots of transformer training).
FRAGMENTATION_FRACTION = 0.10

#: Bytes per logit element: the bf16 logits, their fp32 upcast for the loss, and the fp32
#: log-softmax the cross-entropy keeps for backward.
LOGIT_BYTES = 2 + 4 + 4


class Offload(StrEnum):
    """What ZeRO-Offload moves to host memory."""

    NONE = "None"
    OPTIMIZER = "Optimizer"
    OPTIMIZER_AND_PARAMETERS = "OptimizerAndParameters"


#: Offload options from least to most host memory.
OFFLOAD_ORDER: tuple[Offload, ...] = (
    Offload.NONE,
    Offload.OPTIMIZER,
    Offload.OPTIMIZER_AND_PARAMETERS,
)


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state memory: ``gpu`` bytes per GPU, ``cpu`` bytes of host memory per node."""

    gpu: int
    cpu: int


def check_zero_config(stage: int, offload: Offload) -> None:
    """Reject combinations DeepSpeed does not run."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if offload is Offload.OPTIMIZER and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if offload is Offload.OPTIMIZER_AND_PARAMETERS and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")


def model_state_bytes(
    trainable: int,
    frozen: int,
    largest_layer: int,
    stage: int,
    offload: Offload,
    gpus_per_node: int,
    num_nodes: int = 1,
    zero_init: bool = True,
    cpu_buffer_factor: float = CPU_BUFFER_FACTOR,
    frozen_bytes: int | None = None,
    autocast_fp32: bool = False,
) -> ModelStateBytes:
    """Model-state bytes per GPU and per node's host memory.

    ``autocast_fp32``: ZeRO-0 in one process without DeepSpeed, where the weights stay fp32
    and bf16 autocast computes (:data:`AUTOCAST_TRAINABLE_BYTES`).

    ``trainable`` parameters carry mixed-precision Adam states, ``frozen`` ones only bf16
    weights; ``largest_layer`` is the largest module ZeRO-3 gathers at once; ``zero_init``
    means the model is built partitioned (``deepspeed.zero.Init``), which only matters at
    ZeRO-3 (it is what the Hugging Face integration does there).

    ``frozen_bytes`` replaces the frozen weights' ``2 x frozen`` bytes when they are stored
    otherwise (QLoRA's 4-bit base, ``planning.quantization.quantised_base_bytes``); such a
    model is quantised tensor by tensor while it loads (transformers loads quantised models
    with ``low_cpu_mem_usage``), so its host memory is one bf16 layer per local rank.
    """
    check_zero_config(stage, offload)
    if gpus_per_node < 1 or num_nodes < 1:
        raise ValueError("need at least one GPU on at least one node")
    n = gpus_per_node * num_nodes
    t, f = trainable, frozen
    frozen_total = FROZEN_BYTES * f if frozen_bytes is None else frozen_bytes
    gathered = (BF16_WEIGHT_BYTES + BF16_GRAD_BYTES) * largest_layer
    partitioned_z3 = TRAINABLE_BYTES - BF16_GRAD_BYTES  # 18: no persistent bf16 grad copy
    optimizer_side = FP32_GRAD_BYTES + ADAM_STATE_BYTES  # 16: what optimizer offload moves

    if offload is Offload.NONE:
        if stage == 0 and autocast_fp32 and frozen_bytes is None:
            gpu = AUTOCAST_TRAINABLE_BYTES * t + AUTOCAST_FROZEN_BYTES * f
        elif stage == 0:
            gpu = TRAINABLE_BYTES * t + frozen_total
        elif stage == 1:
            gpu = (BF16_WEIGHT_BYTES + BF16_GRAD_BYTES) * t + int(optimizer_side * t / n)
            gpu += frozen_total
        elif stage == 2:
            gpu = BF16_WEIGHT_BYTES * t + int((TRAINABLE_BYTES - BF16_WEIGHT_BYTES) * t / n)
            gpu += frozen_total
        else:
            gpu = gathered + int(partitioned_z3 * t / n) + int(frozen_total / n)
        host_steady = 0.0
    elif offload is Offload.OPTIMIZER:
        if stage == 1:
            gpu = (BF16_WEIGHT_BYTES + BF16_GRAD_BYTES) * t + frozen_total
        elif stage == 2:
            gpu = BF16_WEIGHT_BYTES * t + frozen_total
        else:
            gpu = gathered + int(BF16_WEIGHT_BYTES * t / n) + int(frozen_total / n)
        host_steady = optimizer_side * t / num_nodes
    else:
        gpu = gathered
        host_steady = (partitioned_z3 * t + frozen_total) / num_nodes

    # Host memory: every local rank materialises the fp32 model while loading it, unless
    # ZeRO-3's zero.Init builds it partitioned, when only one layer per rank is transient
    # and is freed before any offloaded state exists.
    if frozen_bytes is not None:
        host_load = float(BF16_WEIGHT_BYTES * largest_layer * gpus_per_node)
    elif stage == 3 and zero_init:
        host_load = 0.0 if host_steady else float(FP32_LOAD_BYTES * largest_layer * gpus_per_node)
    else:
        host_load = float(FP32_LOAD_BYTES * (t + f) * gpus_per_node)
    cpu = int(max(host_load, host_steady) * cpu_buffer_factor)
    return ModelStateBytes(gpu=int(gpu), cpu=cpu)


def deepspeed_comparable_model_states(
    total_params: int,
    largest_layer_params: int,
    stage: int,
    offload: Offload,
    num_gpus_per_node: int,
    num_nodes: int = 1,
    zero_init: bool = True,
    additional_buffer_factor: float = CPU_BUFFER_FACTOR,
) -> ModelStateBytes:
    """Our figure for the inputs DeepSpeed's estimators take (full fine-tuning).

    Compare with ``estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node,
    num_nodes, cpu_offload, additional_buffer_factor)`` for stage 2 and
    ``estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, ...)`` for
    stage 3; both return ``(cpu_bytes, gpu_bytes[, ...])``.
    """
    return model_state_bytes(
        trainable=total_params,
        frozen=0,
        largest_layer=largest_layer_params,
        stage=stage,
        offload=offload,
        gpus_per_node=num_gpus_per_node,
        num_nodes=num_nodes,
        zero_init=zero_init,
        cpu_buffer_factor=additional_buffer_factor,
    )


# ---- activations ---------------------------------------------------------------------------


def layer_activation_bytes(
    arch: ModelArch, seq_len: int, micro_batch: int, flash_attention: bool = True
) -> int:
    """Activations one decoder layer keeps for backward, in bytes (bf16, no recomputation).

    Korthikanti et al. 2022, eq. (1)-(2): attention ``11*s*b*h + 5*a*s^2*b``, MLP
    ``19*s*b*h``, two norms ``4*s*b*h``. Generalised: Q/K/V widths use the real (GQA)
    head counts, the MLP terms use the real intermediate size (a gated MLP keeps the gate,
    up, activation and product tensors: ``8*s*b*I``), and a fused attention kernel
    (FlashAttention/SDPA, the Hugging Face default) keeps no ``s x s`` score matrices, only
    the fp32 log-sum-exp per head (``4*a*s*b``), as in the paper's selective recomputation.
    """
    s, b, h, i = seq_len, micro_batch, arch.hidden_size, arch.intermediate_size
    q, kv, a = arch.q_dim, arch.kv_dim, arch.num_heads
    sb = s * b
    # qkv input 2h, Q 2q, K 2kv, V 2kv, output-projection input 2q, dropout mask h
    attention = sb * (3 * h + 4 * q + 4 * kv)
    attention += 4 * a * sb if flash_attention else 5 * a * s * sb
    # fc1 input 2h + dropout mask h; plain: activation input 2I + fc2 input 2I
    mlp = sb * (3 * h + (8 if arch.gated_mlp else 4) * i)
    norms = 4 * sb * h
    return attention + mlp + norms


def activation_bytes(
    arch: ModelArch,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    layers_with_grad: int | None = None,
    flash_attention: bool = True,
    adapter_input_bytes: int = 0,
) -> int:
    """Peak activation bytes per GPU for one micro-batch.

    ``adapter_input_bytes`` is what adapters keep per token and layer on top of the base
    layer: PEFT's LoRA applies its dropout to each adapted linear layer's input and keeps
    that copy for the backward pass of A (2 bytes per input feature, bf16); measured on an
    H200 (bench/RESULTS.md) it is 25-50% of a LoRA run's activations.

    ``layers_with_grad`` is how many (top) layers backward runs through: all of them for
    Full, LoRA and Prefix, only the trained ones for Partial. With gradient checkpointing
    each such layer keeps only its bf16 input (``2*s*b*h``, the paper's full recomputation)
    and one layer's activations are live again while it is recomputed. The LM head's
    logits (``s*b*V``, :data:`LOGIT_BYTES` each) are kept either way.
    """
    if seq_len < 1 or micro_batch < 1:
        raise ValueError("sequence length and micro-batch must be positive")
    layers = arch.num_layers if layers_with_grad is None else layers_with_grad
    sb = seq_len * micro_batch
    per_layer = layer_activation_bytes(arch, seq_len, micro_batch, flash_attention)
    per_layer += adapter_input_bytes * sb
    if gradient_checkpointing:
        body = layers * 2 * sb * arch.hidden_size + (per_layer if layers else 0)
    else:
        body = layers * per_layer
    final_norm_input = 2 * sb * arch.hidden_size
    logits = LOGIT_BYTES * sb * arch.vocab_size
    return body + final_norm_input + logits


def overhead_bytes(working_set: int, accelerator: str = "GPU") -> int:
    """Runtime overhead: a device context constant plus allocator fragmentation."""
    context = CUDA_CONTEXT_BYTES if accelerator == "GPU" else CPU_CONTEXT_BYTES
    return context + int(FRAGMENTATION_FRACTION * working_set)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory in bytes, its breakdown, and whether it fits."""

    model_states: int
    activations: int
    overhead: int
    gpu_memory: int
    usable: int
    cpu_per_node: int
    cpu_memory: int | None = None

    @property
    def per_gpu(self) -> int:
        return self.model_states + self.activations + self.overhead

    @property
    def gpu_fits(self) -> bool:
        return self.per_gpu <= self.usable

    @property
    def cpu_fits(self) -> bool:
        return self.cpu_memory is None or self.cpu_per_node <= self.cpu_memory

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.cpu_fits

    def to_dict(self) -> dict[str, float | None]:
        def gib(value: int) -> float:
            return round(value / GIB, 2)

        return {
            "perGpuGiB": gib(self.per_gpu),
            "modelStatesGiB": gib(self.model_states),
            "activationsGiB": gib(self.activations),
            "overheadGiB": gib(self.overhead),
            "gpuMemoryGiB": gib(self.gpu_memory),
            "usableGiB": gib(self.usable),
            "cpuPerNodeGiB": gib(self.cpu_per_node),
            "cpuMemoryGiB": None if self.cpu_memory is None else gib(self.cpu_memory),
        }


def estimate_memory(
    states: ModelStateBytes,
    activations: int,
    gpu_memory: int,
    safety_margin: float,
    cpu_memory: int | None = None,
    accelerator: str = "GPU",
) -> MemoryEstimate:
    """Combine model states and activations with overhead against a device's capacity."""
    if not 0.0 <= safety_margin < 1.0:
        raise ValueError(f"safety margin must be in [0, 1), got {safety_margin}")
    return MemoryEstimate(
        model_states=states.gpu,
        activations=activations,
        overhead=overhead_bytes(states.gpu + activations, accelerator),
        gpu_memory=gpu_memory,
        usable=int(gpu_memory * (1.0 - safety_margin)),
        cpu_per_node=states.cpu,
        cpu_memory=cpu_memory,
    )
