"""The planner: method by data size, memory fallback, ZeRO choice, hyperparameters."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kubetune.planning import (
    DatasetStats,
    Method,
    Offload,
    Plan,
    PlanRequest,
    Resources,
    lora_parameters,
    make_plan,
    model_state_bytes,
)
from kubetune.planning.hyperparameters import epochs_for
from kubetune.planning.search import activation_ladder
from kubetune.planning.thresholds import MAX_MICRO_BATCH_GPU
from tests.unit.specs import arch

pytestmark = pytest.mark.unit


def data(n: int, mean: int = 300, longest: int = 1000, **extra: Any) -> DatasetStats:
    return DatasetStats(example_count=n, token_count=n * mean, max_tokens=longest, **extra)


BIG = Resources(gpus_per_node=8, gpu_memory_gib=80)


# ---- method by dataset size --------------------------------------------------------------


@pytest.mark.parametrize(
    ("examples", "method", "rank"),
    [
        (50, Method.LORA, 8),
        (999, Method.LORA, 8),
        (1_000, Method.LORA, 16),
        (9_999, Method.LORA, 16),
        (10_000, Method.LORA, 64),
        (49_999, Method.LORA, 64),
        (50_000, Method.PARTIAL, None),
        (99_999, Method.PARTIAL, None),
        (100_000, Method.FULL, None),
        (2_000_000, Method.FULL, None),
    ],
)
def test_method_by_dataset_size(examples: int, method: Method, rank: int | None) -> None:
    plan = make_plan(data(examples), arch("llama-2-7b"), BIG)
    assert plan.fits
    assert plan.method is method
    assert plan.hyperparameters.lora_rank == rank
    assert any(f"{examples:,} examples" in r for r in plan.reasons)


def test_partial_trains_the_top_half() -> None:
    a = arch("llama-2-7b")
    plan = make_plan(data(60_000), a, BIG)
    assert plan.hyperparameters.trainable_layers == 16
    assert plan.trainable_parameters == 16 * a.layer_parameters + a.hidden_size


def test_lora_parameter_counts_match_peft() -> None:
    a = arch("llama-2-7b")
    # PEFT's print_trainable_parameters for Llama-2-7B, r=8: q/v only, and all linear layers.
    assert lora_parameters(a, 8, ("q_proj", "v_proj")) == 4_194_304
    assert lora_parameters(a, 8) == 19_988_480


# ---- memory: fallback, explicit methods, ZeRO ---------------------------------------------


def test_falls_back_down_the_list_when_memory_does_not_fit() -> None:
    plan = make_plan(data(200_000), arch("llama-2-7b"), Resources(1, 24))
    assert plan.fits
    assert plan.method is Method.LORA
    text = " ".join(plan.reasons)
    assert "Full does not fit on 1 x 24 GiB" in text
    assert "Falling back to Partial" in text
    assert "Partial (top 16 layers) does not fit" in text
    assert "Falling back to LoRA (rank 64)" in text
    assert plan.memory.per_gpu <= plan.memory.usable


@pytest.mark.parametrize(
    ("name", "method", "resources"),
    [
        ("llama-2-70b", Method.FULL, Resources(1, 80)),
        ("llama-2-13b", Method.PARTIAL, Resources(2, 24)),
        ("llama-3-70b", Method.LORA, Resources(1, 24)),
        ("llama-2-7b", Method.FULL, Resources(8, 16, cpu_memory_gib=64)),
    ],
)
def test_explicit_method_that_does_not_fit_is_reported(
    name: str, method: Method, resources: Resources
) -> None:
    plan = make_plan(data(200_000), arch(name), resources, PlanRequest(method=method))
    assert plan.method is method
    assert plan.fits is False
    assert plan.error is not None
    assert "does not fit" in plan.error
    assert plan.to_dict()["fits"] is False
    assert plan.memory.per_gpu > plan.memory.usable or not plan.memory.cpu_fits


def test_explicit_method_is_honoured_against_the_data_band() -> None:
    plan = make_plan(data(300), arch("gpt2"), BIG, PlanRequest(method=Method.FULL))
    assert plan.method is Method.FULL
    assert plan.fits
    assert any("requested explicitly" in r for r in plan.reasons)


def test_prefix_when_asked() -> None:
    request = PlanRequest(method=Method.PREFIX)
    plan = make_plan(data(300), arch("qwen2-0.5b"), Resources(1, 24), request)
    assert plan.method is Method.PREFIX
    hp = plan.hyperparameters.model_dump(by_alias=True)
    assert hp["prefixTokens"] == 20
    assert hp["loraRank"] is None
    assert plan.trainable_parameters == 20 * 24 * 2 * 128


@pytest.mark.parametrize(
    "name", ["gpt2", "opt-350m", "pythia-1b", "tinyllama-1.1b", "qwen2-0.5b", "llama-2-7b"]
)
@pytest.mark.parametrize("examples", [200, 5_000, 300_000])
def test_single_gpu_uses_zero_stage_0(name: str, examples: int) -> None:
    plan = make_plan(data(examples), arch(name), Resources(1, 80))
    assert plan.fits
    assert plan.zero_stage == 0
    assert plan.offload is Offload.NONE
    assert any("One GPU" in r for r in plan.reasons)


def test_single_gpu_offloads_only_when_needed_and_host_memory_is_known() -> None:
    request = PlanRequest(method=Method.FULL)
    without_host = make_plan(data(200_000), arch("llama-2-7b"), Resources(1, 80), request)
    assert not without_host.fits
    plan = make_plan(
        data(200_000), arch("llama-2-7b"), Resources(1, 80, cpu_memory_gib=512), request
    )
    assert plan.fits
    assert (plan.zero_stage, plan.offload) == (2, Offload.OPTIMIZER)
    assert any("ZeRO-Offload" in r for r in plan.reasons)


@pytest.mark.parametrize(
    ("name", "examples", "gpn", "nodes", "gpu_gib"),
    [
        ("llama-2-7b", 200_000, 8, 1, 80),
        ("llama-2-13b", 200_000, 8, 1, 80),
        ("llama-2-70b", 200_000, 8, 2, 80),
        ("llama-3-8b", 60_000, 4, 1, 40),
        ("mistral-7b", 5_000, 2, 1, 24),
    ],
)
def test_multi_gpu_chooses_the_smallest_stage_that_fits(
    name: str, examples: int, gpn: int, nodes: int, gpu_gib: float
) -> None:
    a = arch(name)
    plan = make_plan(data(examples), a, Resources(gpn, gpu_gib, nodes))
    assert plan.fits
    assert plan.offload is Offload.NONE
    usable = plan.memory.usable
    non_states = plan.memory.per_gpu - plan.memory.model_states
    frozen = a.total_parameters - plan.trainable_parameters
    if plan.method in (Method.LORA, Method.PREFIX):
        frozen = a.total_parameters
    for stage in range(plan.zero_stage):
        smaller = model_state_bytes(
            plan.trainable_parameters,
            frozen,
            a.largest_layer_parameters,
            stage,
            Offload.NONE,
            gpn,
            nodes,
        ).gpu
        # the overhead grows with the working set, so this under-estimates the smaller stage
        assert smaller + non_states > usable


def test_user_zero_stage_and_micro_batch_are_honoured() -> None:
    request = PlanRequest(zero_stage=3, micro_batch_size=1, gradient_checkpointing=True)
    plan = make_plan(data(5_000), arch("llama-2-7b"), BIG, request)
    assert plan.zero_stage == 3
    assert plan.hyperparameters.micro_batch_size == 1
    assert plan.hyperparameters.gradient_checkpointing is True


def test_invalid_request_combination_raises() -> None:
    with pytest.raises(ValueError, match="offload"):
        PlanRequest(zero_stage=0, offload=Offload.OPTIMIZER)


# ---- hyperparameters ---------------------------------------------------------------------

SWEEP = [
    (name, n, gpus)
    for name in ("gpt2", "tinyllama-1.1b", "llama-2-7b")
    for n in (1, 5, 37, 100, 999, 1_000, 4_321, 20_000, 75_000, 250_000)
    for gpus in (1, 8)
]


@pytest.mark.parametrize(("name", "examples", "gpus"), SWEEP)
def test_schedule_fits_the_real_number_of_steps(name: str, examples: int, gpus: int) -> None:
    plan = make_plan(data(examples, mean=200, longest=700), arch(name), Resources(gpus, 80))
    hp = plan.hyperparameters
    assert 1 <= hp.micro_batch_size <= MAX_MICRO_BATCH_GPU
    assert hp.effective_batch_size == hp.micro_batch_size * gpus * hp.gradient_accumulation_steps
    assert hp.total_steps == hp.steps_per_epoch * hp.epochs
    assert hp.warmup_steps <= 0.1 * hp.total_steps
    assert hp.total_steps // hp.eval_steps >= min(10, hp.total_steps)
    assert 1 <= hp.epochs <= 10
    assert 0.01 <= hp.weight_decay <= 0.05
    assert 0.1 <= hp.dropout <= 0.2
    assert hp.max_grad_norm == 1.0


def test_warmup_on_a_sixty_step_run() -> None:
    plan = make_plan(data(48, longest=500), arch("gpt2"), Resources(1, 24))
    hp = plan.hyperparameters
    assert hp.total_steps == 60
    assert hp.warmup_steps == 3
    assert hp.eval_steps == 3


def test_epochs_fall_with_dataset_size() -> None:
    sizes = [10, 100, 500, 1_000, 5_000, 10_000, 50_000, 1_000_000]
    epochs = [epochs_for(n) for n in sizes]
    assert epochs == sorted(epochs, reverse=True)
    assert epochs[0] == 10
    assert epochs[-1] == 1


@pytest.mark.parametrize(
    ("method", "incremental", "low", "high"),
    [
        (Method.FULL, False, 1e-5, 3e-5),
        (Method.PARTIAL, False, 1e-5, 3e-5),
        (Method.LORA, False, 1e-4, 3e-4),
        (Method.FULL, True, 1e-6, 5e-6),
        (Method.LORA, True, 5e-5, 1.5e-4),
    ],
)
def test_learning_rate_by_method(
    method: Method, incremental: bool, low: float, high: float
) -> None:
    request = PlanRequest(method=method, incremental=incremental)
    plan = make_plan(data(5_000), arch("tinyllama-1.1b"), BIG, request)
    assert low <= plan.hyperparameters.learning_rate <= high


def test_lora_learning_rate_is_about_ten_times_full() -> None:
    a = arch("llama-2-7b")
    lora = make_plan(data(5_000), a, BIG, PlanRequest(method=Method.LORA))
    full = make_plan(data(5_000), a, BIG, PlanRequest(method=Method.FULL))
    ratio = lora.hyperparameters.learning_rate / full.hyperparameters.learning_rate
    assert 5 <= ratio <= 20


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        (
            "llama-3-8b",
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        ("gpt2", ["c_attn", "c_proj", "c_fc"]),
        ("pythia-1b", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        ("opt-350m", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ],
)
def test_lora_targets_per_architecture(name: str, targets: list[str]) -> None:
    hp = make_plan(data(500), arch(name), BIG).to_dict()["hyperparameters"]
    assert hp["loraTargetModules"] == targets
    assert hp["loraAlpha"] == 2 * hp["loraRank"]
    assert 0.1 <= hp["loraDropout"] <= 0.2


def test_sequence_length_is_capped() -> None:
    plan = make_plan(data(500, longest=9_000), arch("gpt2"), BIG)
    assert plan.hyperparameters.sequence_length == 1024
    capped = make_plan(
        data(500, longest=9_000), arch("llama-3-8b"), BIG, PlanRequest(max_seq_length=2048)
    )
    assert capped.hyperparameters.sequence_length == 2048
    assert any("9,000 tokens" in w for w in capped.warnings)


# ---- warnings, reasons, JSON --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, "Only 500 training examples"),
        ({"duplicate_count": 25}, "25 duplicate training examples"),
        ({"leakage_count": 7}, "7 validation examples duplicate training examples"),
        ({"overlong_count": 3}, "3 of 500 training examples are longer than the planned"),
        ({"tokens_estimated": True}, "Token counts are estimated"),
    ],
)
def test_data_warnings(extra: dict[str, Any], fragment: str) -> None:
    plan = make_plan(data(500, **extra), arch("gpt2"), BIG)
    assert any(fragment in w for w in plan.warnings)


def test_clean_large_dataset_has_no_warnings() -> None:
    assert make_plan(data(20_000), arch("gpt2"), BIG).warnings == ()


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [k, *_keys(v)]]
    if isinstance(value, list):
        return [k for item in value for k in _keys(item)]
    return []


@pytest.mark.parametrize("examples", [500, 60_000, 200_000])
def test_to_dict_is_camel_case_json_with_the_required_fields(examples: int) -> None:
    plan = make_plan(data(examples), arch("mistral-7b"), BIG)
    out = json.loads(json.dumps(plan.to_dict()))
    assert {
        "method",
        "zeroStage",
        "offload",
        "trainableParameters",
        "totalParameters",
        "fits",
        "memory",
        "hyperparameters",
        "reasons",
        "warnings",
        "exampleCount",
        "tokenCount",
    } <= set(out)
    assert {"perGpuGiB", "modelStatesGiB", "activationsGiB", "overheadGiB", "gpuMemoryGiB"} <= set(
        out["memory"]
    )
    assert {
        "learningRate",
        "epochs",
        "microBatchSize",
        "gradientAccumulationSteps",
        "warmupSteps",
        "weightDecay",
        "maxGradNorm",
        "evalSteps",
        "totalSteps",
        "loraRank",
        "loraAlpha",
        "loraDropout",
        "loraTargetModules",
    } <= set(out["hyperparameters"])
    assert all(re.fullmatch(r"[a-z][A-Za-z]*", key) for key in _keys(out))
    assert out["method"] in {"Full", "Partial", "LoRA", "Prefix"}
    assert out["offload"] in {"None", "Optimizer", "OptimizerAndParameters"}
    assert out["exampleCount"] == examples
    assert out["totalParameters"] == 7_241_732_096


def test_reasons_carry_the_numbers() -> None:
    plan: Plan = make_plan(data(500), arch("llama-2-7b"), Resources(1, 24))
    memory = [r for r in plan.reasons if "per GPU" in r]
    assert memory
    assert "GiB" in memory[0]
    assert f"{plan.memory.per_gpu / 2**30:.1f} GiB" in memory[0]
    assert any("Warmup" in r and str(plan.hyperparameters.total_steps) in r for r in plan.reasons)


def test_cpu_accelerator_plans_local_processes() -> None:
    plan = make_plan(data(300), arch("gpt2"), Resources(2, 4, accelerator="CPU"))
    assert plan.fits
    assert any("per CPU" in r for r in plan.reasons)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"example_count": 0, "token_count": 0, "max_tokens": 1},
        {"example_count": 5, "token_count": 2, "max_tokens": 1},
        {"example_count": 5, "token_count": 50, "max_tokens": 10, "duplicate_count": -1},
    ],
)
def test_invalid_dataset_stats_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"examples|token|negative"):
        DatasetStats(**kwargs)


def test_invalid_resources_raise() -> None:
    with pytest.raises(ValueError, match="device"):
        Resources(gpus_per_node=0)


# ---- method by evidence (the alternative Auto switches to at training start) ----------------


def test_method_auto_with_an_adapter_carries_a_full_alternative_that_fits() -> None:
    from kubetune.planning import SURPRISING_DATA_RATIO, method_alternative

    dataset, model, request = data(300), arch("llama-2-7b"), PlanRequest()
    plan = make_plan(dataset, model, BIG, request)
    assert plan.method is Method.LORA
    full, why = method_alternative(dataset, model, BIG, request, plan)
    assert full is not None
    assert full.method is Method.FULL
    assert full.fits
    assert full.offload is Offload.NONE
    assert full.hyperparameters.learning_rate < plan.hyperparameters.learning_rate
    assert why is not None
    assert "switches to Full fine-tuning" in why
    assert f"at least {SURPRISING_DATA_RATIO:g}x" in why


def test_method_alternative_says_a_requested_learning_rate_trains_the_full_weights_too() -> None:
    from kubetune.planning import method_alternative

    dataset, model = data(300), arch("llama-2-7b")
    request = PlanRequest(learning_rate=3e-3)
    plan = make_plan(dataset, model, BIG, request)
    full, why = method_alternative(dataset, model, BIG, request, plan)
    assert full is not None
    assert why is not None
    assert full.hyperparameters.learning_rate == plan.hyperparameters.learning_rate == 3e-3
    assert "requested learning rate (0.003) trains the full weights too" in why
    _, unset = method_alternative(
        dataset, model, BIG, PlanRequest(), make_plan(dataset, model, BIG, PlanRequest())
    )
    assert unset is not None
    assert "requested learning rate" not in unset


def test_method_alternative_only_for_method_auto_and_only_when_full_fits() -> None:
    from kubetune.planning import method_alternative

    dataset, model = data(300), arch("llama-2-7b")
    requested = PlanRequest(method=Method.LORA)
    plan = make_plan(dataset, model, BIG, requested)
    assert method_alternative(dataset, model, BIG, requested, plan) == (None, None)
    small = Resources(gpus_per_node=1, gpu_memory_gib=24)
    plan = make_plan(dataset, model, small, PlanRequest())
    assert plan.method is Method.LORA
    assert plan.fits
    full, why = method_alternative(dataset, model, small, PlanRequest(), plan)
    assert full is None
    assert why is not None
    assert why.startswith("Method by evidence: stays LoRA")
    large = data(200_000)
    plan = make_plan(large, model, BIG, PlanRequest())
    assert plan.method is Method.FULL
    assert method_alternative(large, model, BIG, PlanRequest(), plan) == (None, None)


def test_on_a_gpu_the_plan_takes_the_largest_micro_batch_that_fits_without_recomputing() -> None:
    """16k tokens per micro-batch on a GPU (8 x 2,048), halving without gradient
    checkpointing down to the 4k-token size before it recomputes; the effective batch
    stays the data's target (accumulation shrinks), and a CPU plan keeps 4k tokens."""
    a = arch("tinyllama-1.1b")
    rows = data(100_000, mean=2000, longest=2048)
    big = make_plan(rows, a, Resources(1, 141), PlanRequest(method=Method.FULL))
    assert big.hyperparameters.micro_batch_size == 8
    assert not big.hyperparameters.gradient_checkpointing
    assert big.hyperparameters.effective_batch_size == 64
    small = make_plan(rows, a, Resources(1, 40), PlanRequest(method=Method.FULL))
    hp = small.hyperparameters
    assert (hp.micro_batch_size, hp.gradient_checkpointing) == (4, False), small.reasons
    assert hp.effective_batch_size == 64
    assert "Micro-batch lowered from 8 to 4 to fit" in " ".join(small.reasons)
    cpu = make_plan(rows, a, Resources(1, 200, accelerator="CPU"), PlanRequest(method=Method.FULL))
    assert cpu.hyperparameters.micro_batch_size == 2


def test_the_activation_ladder_halves_before_it_recomputes() -> None:
    assert activation_ladder(8, recompute_from=2) == (
        (8, False),
        (4, False),
        (2, False),
        (2, True),
        (1, True),
    )
    assert activation_ladder(4) == ((4, False), (4, True), (2, True), (1, True))
    assert activation_ladder(8, gradient_checkpointing=True, recompute_from=2) == (
        (8, True),
        (4, True),
        (2, True),
        (1, True),
    )
    assert activation_ladder(8, micro_batch=3, recompute_from=2) == ((3, False), (3, True))
    # A preferred size off the powers of two (the batch target's) still recomputes.
    assert activation_ladder(6, recompute_from=2) == ((6, False), (3, False), (1, False), (1, True))
