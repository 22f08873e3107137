"""The memory model: DeepSpeed's estimator formulas, monotonicity, activations."""

from __future__ import annotations

import dataclasses

import pytest

from kubetune.planning import (
    GIB,
    ModelArch,
    ModelStateBytes,
    Offload,
    activation_bytes,
    deepspeed_comparable_model_states,
    estimate_memory,
    layer_activation_bytes,
    model_state_bytes,
    overhead_bytes,
)
from tests.unit.specs import arch

pytestmark = pytest.mark.unit


# Reference values from DeepSpeed's own estimators, evaluated by hand so that agreement is
# checked without installing DeepSpeed (tests/trainer/test_planning_deepspeed.py calls the
# real functions). Source: deepspeedai/DeepSpeed master, read for this test:
#
# deepspeed/runtime/zero/stage_1_and_2.py, estimate_zero2_model_states_mem_needs (formula as
# changed by PR #5099, April 2024; in the >=0.15 releases the trainer extra requires):
#   N = num_nodes * num_gpus_per_node
#   cpu_offload:  gpu = 2*P;                 cpu = P * max(4*N, 16) * buf
#   otherwise:    gpu = 2*P + int(18*P / N); cpu = P * 4 * num_gpus_per_node * buf
#   returns (int(cpu), int(gpu))
#
# deepspeed/runtime/zero/stage3.py, estimate_zero3_model_states_mem_needs:
#   LL = 4 * largest_layer_params; g = 1 / num_nodes
#   offload optimizer + params: gpu = LL
#       cpu = P*18*g*buf (zero_init) else P*max(4*num_gpus_per_node, 18*g)*buf
#   offload optimizer only:     gpu = LL + int(2*P / N)
#       cpu = P*16*g*buf (zero_init) else P*max(4*num_gpus_per_node, 16*g)*buf
#   no offload:                 gpu = LL + int(18*P / N)
#       cpu = largest*4*num_gpus_per_node*buf (zero_init) else P*4*num_gpus_per_node*buf
#   returns (int(cpu), int(gpu), LL)
#
# with buf = additional_buffer_factor = 1.5.
DEEPSPEED_REFERENCE = [
    # (architecture, stage, offload, gpus/node, nodes, zero_init, ds_cpu, ds_gpu)
    # Llama-2-7B, ZeRO-2, 8 GPUs: gpu = 2P + int(18P/8), cpu = P*4*8*1.5
    ("llama-2-7b", 2, Offload.NONE, 8, 1, True, 323_443_949_568, 28_638_266_368),
    # Qwen2-0.5B, ZeRO-2 + optimizer offload, 8 GPUs: gpu = 2P, cpu = P*max(32, 16)*1.5
    ("qwen2-0.5b", 2, Offload.OPTIMIZER, 8, 1, True, 23_713_572_864, 988_065_536),
    # Llama-2-70B, ZeRO-3 + optimizer offload, 2 nodes x 8: gpu = 4L + int(2P/16),
    # cpu = P*16*(1/2)*1.5
    ("llama-2-70b", 3, Offload.OPTIMIZER, 8, 2, True, 827_719_778_304, 9_670_657_024),
    # GPT-2, ZeRO-3 + optimizer and parameter offload, 1 GPU, no zero.Init:
    # gpu = 4L, cpu = P*max(4, 18)*1.5
    ("gpt2", 3, Offload.OPTIMIZER_AND_PARAMETERS, 1, 1, False, 3_359_874_816, 154_389_504),
]


@pytest.mark.parametrize(
    ("name", "stage", "offload", "gpn", "nodes", "zero_init", "ds_cpu", "ds_gpu"),
    DEEPSPEED_REFERENCE,
)
def test_model_states_agree_with_deepspeed_reference(
    name: str,
    stage: int,
    offload: Offload,
    gpn: int,
    nodes: int,
    zero_init: bool,
    ds_cpu: int,
    ds_gpu: int,
) -> None:
    a = arch(name)
    ours = deepspeed_comparable_model_states(
        a.total_parameters, a.largest_layer_parameters, stage, offload, gpn, nodes, zero_init
    )
    assert abs(ours.gpu - ds_gpu) <= 0.05 * ds_gpu
    assert abs(ours.cpu - ds_cpu) <= 0.05 * ds_cpu


STAGE_ORDER = [
    [(0, Offload.NONE), (1, Offload.NONE), (2, Offload.NONE), (3, Offload.NONE)],
    [(1, Offload.OPTIMIZER), (2, Offload.OPTIMIZER), (3, Offload.OPTIMIZER)],
    [(2, Offload.NONE), (2, Offload.OPTIMIZER)],
    [(3, Offload.NONE), (3, Offload.OPTIMIZER), (3, Offload.OPTIMIZER_AND_PARAMETERS)],
]


@pytest.mark.parametrize("name", ["gpt2", "qwen2-0.5b", "llama-2-7b", "llama-3-70b"])
@pytest.mark.parametrize(("gpn", "nodes"), [(8, 1), (8, 2), (4, 1)])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_gpu_model_states_never_grow_with_stage_or_offload(
    name: str, gpn: int, nodes: int, method: str
) -> None:
    a = arch(name)
    p = a.total_parameters
    trainable, frozen = (p, 0) if method == "full" else (p // 200, p)
    for ladder in STAGE_ORDER:
        sizes = [
            model_state_bytes(
                trainable, frozen, a.largest_layer_parameters, stage, offload, gpn, nodes
            ).gpu
            for stage, offload in ladder
        ]
        assert sizes == sorted(sizes, reverse=True), (ladder, sizes)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_weights_are_partitioned_only_by_zero3(stage: int) -> None:
    frozen = 1_000_000_000
    states = model_state_bytes(0, frozen, 10_000_000, stage, Offload.NONE, gpus_per_node=8)
    assert states.gpu == 2 * frozen
    z3 = model_state_bytes(0, frozen, 10_000_000, 3, Offload.NONE, gpus_per_node=8)
    assert z3.gpu == 4 * 10_000_000 + 2 * frozen // 8


def test_single_gpu_full_is_twenty_bytes_per_parameter() -> None:
    # 2 bf16 weights + 2 bf16 grads + 4 fp32 grads + 12 fp32 master/m/v
    assert model_state_bytes(10**9, 0, 10**7, 0, Offload.NONE, 1).gpu == 20 * 10**9


def test_one_process_under_autocast_keeps_fp32_weights_grads_and_adam_only() -> None:
    """ZeRO-0 without DeepSpeed: fp32 weights, fp32 gradients, Adam's m and v (16 bytes);
    frozen weights stay fp32 (4). What the H200 measured: 20 bytes over-predicted by
    11-16%."""
    states = model_state_bytes(10**9, 10**8, 10**7, 0, Offload.NONE, 1, autocast_fp32=True)
    assert states.gpu == 16 * 10**9 + 4 * 10**8
    # Only ZeRO-0 trains that way; DeepSpeed's stages keep their accounting.
    z2 = model_state_bytes(10**9, 0, 10**7, 2, Offload.NONE, 1, autocast_fp32=True)
    assert z2.gpu == model_state_bytes(10**9, 0, 10**7, 2, Offload.NONE, 1).gpu


def test_the_plan_counts_autocast_for_one_gpu_process_and_deepspeed_for_several() -> None:
    from kubetune.planning import DatasetStats, Method, PlanRequest, Resources, make_plan

    a = arch("tinyllama-1.1b")
    rows = DatasetStats(10_000, 10_000 * 500, 1000)
    full = PlanRequest(method=Method.FULL, micro_batch_size=1, gradient_checkpointing=True)
    one = make_plan(rows, a, Resources(1, 141), full)
    assert (one.zero_stage, one.memory.model_states) == (0, 16 * a.total_parameters)
    eight = make_plan(rows, a, Resources(8, 141), dataclasses.replace(full, zero_stage=0))
    assert eight.memory.model_states == 20 * a.total_parameters


@pytest.mark.parametrize(
    ("stage", "offload"),
    [(0, Offload.OPTIMIZER), (2, Offload.OPTIMIZER_AND_PARAMETERS), (4, Offload.NONE)],
)
def test_invalid_zero_combinations_raise(stage: int, offload: Offload) -> None:
    with pytest.raises(ValueError, match=r"ZeRO|offload"):
        model_state_bytes(10, 0, 1, stage, offload, 1)


def _gpt_like(hidden: int = 1024, heads: int = 16) -> ModelArch:
    return ModelArch(
        name="gpt-like",
        family="gpt2",
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=24,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=50257,
        max_positions=2048,
        tie_word_embeddings=True,
        gated_mlp=False,
        norm="layer",
        qkv_bias=True,
        output_bias=True,
        mlp_bias=True,
        learned_positions=2048,
    )


@pytest.mark.parametrize(("seq", "batch"), [(512, 1), (1024, 4), (2048, 2)])
def test_layer_activations_match_korthikanti_for_gpt(seq: int, batch: int) -> None:
    # Korthikanti et al. 2022, eq. (2): s*b*h*(34 + 5*a*s/h) bytes per layer.
    a = _gpt_like()
    h, heads = a.hidden_size, a.num_heads
    expected = seq * batch * h * 34 + 5 * heads * seq * seq * batch
    assert layer_activation_bytes(a, seq, batch, flash_attention=False) == expected


def test_flash_attention_drops_the_quadratic_term() -> None:
    a = _gpt_like()
    fused = layer_activation_bytes(a, 2048, 1, flash_attention=True)
    eager = layer_activation_bytes(a, 2048, 1, flash_attention=False)
    assert fused < eager
    assert fused == 2048 * 1024 * 34 + 4 * 16 * 2048


@pytest.mark.parametrize("name", ["gpt2", "llama-2-7b", "llama-3-8b", "qwen2-0.5b"])
def test_activations_grow_with_batch_and_length_and_checkpointing_helps(name: str) -> None:
    a = arch(name)
    base = activation_bytes(a, 512, 1, gradient_checkpointing=False)
    assert activation_bytes(a, 512, 2, gradient_checkpointing=False) > base
    assert activation_bytes(a, 1024, 1, gradient_checkpointing=False) > base
    assert activation_bytes(a, 512, 1, gradient_checkpointing=True) < base
    fewer = activation_bytes(a, 512, 1, gradient_checkpointing=False, layers_with_grad=2)
    assert fewer < base


def test_checkpointing_keeps_layer_inputs_plus_one_layer() -> None:
    a = arch("llama-2-7b")
    s, b, h = 1024, 2, a.hidden_size
    full = activation_bytes(a, s, b, gradient_checkpointing=False)
    ckpt = activation_bytes(a, s, b, gradient_checkpointing=True)
    per_layer = layer_activation_bytes(a, s, b)
    assert full - ckpt == a.num_layers * per_layer - (a.num_layers * 2 * s * b * h + per_layer)


def test_overhead_is_context_plus_fraction() -> None:
    assert overhead_bytes(0) == 1 * GIB
    assert overhead_bytes(10 * GIB) == 2 * GIB
    assert overhead_bytes(0, accelerator="CPU") < overhead_bytes(0)


@pytest.mark.parametrize(
    ("states_gib", "act_gib", "capacity_gib", "fits"),
    [(58, 5, 80, True), (64, 2, 80, False), (10, 1, 16, True), (13, 1, 16, False)],
)
def test_fit_uses_the_safety_margin(
    states_gib: int, act_gib: int, capacity_gib: int, fits: bool
) -> None:
    est = estimate_memory(
        ModelStateBytes(gpu=states_gib * GIB, cpu=0),
        act_gib * GIB,
        gpu_memory=capacity_gib * GIB,
        safety_margin=0.10,
    )
    assert est.fits is fits
    assert est.per_gpu == est.model_states + est.activations + est.overhead
    assert set(est.to_dict()) >= {
        "perGpuGiB",
        "modelStatesGiB",
        "activationsGiB",
        "overheadGiB",
        "gpuMemoryGiB",
    }


def test_host_memory_limit_is_checked() -> None:
    est = estimate_memory(
        ModelStateBytes(gpu=GIB, cpu=200 * GIB),
        0,
        gpu_memory=80 * GIB,
        safety_margin=0.1,
        cpu_memory=100 * GIB,
    )
    assert est.gpu_fits
    assert not est.fits


def test_lora_keeps_a_copy_of_every_adapted_layer_input() -> None:
    from kubetune.planning.methods import lora_input_bytes

    a = arch("llama-2-7b")
    h, i = a.hidden_size, a.intermediate_size
    # q, k, v, gate, up read the hidden state; o reads the attention output; down reads I.
    assert lora_input_bytes(a) == 2 * (6 * h + i)
    assert lora_input_bytes(a, ["q_proj", "v_proj"]) == 2 * 2 * h
    s, b = 2048, 2
    plain = activation_bytes(a, s, b, gradient_checkpointing=False)
    lora = activation_bytes(
        a, s, b, gradient_checkpointing=False, adapter_input_bytes=lora_input_bytes(a)
    )
    assert lora - plain == a.num_layers * s * b * lora_input_bytes(a)
    # With recomputation only the recomputed layer holds them.
    gc_plain = activation_bytes(a, s, b, gradient_checkpointing=True)
    gc_lora = activation_bytes(
        a, s, b, gradient_checkpointing=True, adapter_input_bytes=lora_input_bytes(a)
    )
    assert gc_lora - gc_plain == s * b * lora_input_bytes(a)
