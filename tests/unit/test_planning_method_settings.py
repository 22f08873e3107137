"""The spec's method settings reach the plan: Partial's trainableLayers and fraction, LoRA's
alpha, dropout and target modules, Prefix's virtual tokens change the planned
hyperparameters, trainable parameters and memory; settings the model cannot take are an
InvalidSpec naming the field. Also the one step arithmetic the planner and the spec's
overrides share."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.planning import (
    DatasetStats,
    Method,
    PlanRequest,
    Resources,
    bundled_architectures,
    lora_parameters,
    make_plan,
)
from kubetune.planning.hyperparameters import total_steps_for, training_steps
from kubetune.planning.job import PlanRequestError, build_plan, plan_request
from kubetune.planning.methods import (
    lora_input_bytes,
    lora_module_names,
    lora_targets,
    partial_layer_count,
    partial_parameters,
    prefix_parameters,
)
from tests.unit.specs import arch, spec_from

pytestmark = pytest.mark.unit

GPUS = Resources(gpus_per_node=1, gpu_memory_gib=80)


def data(n: int) -> DatasetStats:
    return DatasetStats(example_count=n, token_count=n * 300, max_tokens=1000)


def make_spec(**extra: Any) -> FineTuneJobSpec:
    base = {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": {"uri": "file:///d/t.jsonl"}}
    return spec_from(base, "demo", "ns", **extra)


def plan_for(spec: FineTuneJobSpec, examples: int = 200) -> dict[str, Any]:
    rows = "".join(
        json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) + "\n"
        for i in range(examples)
    )
    config = json.loads(bundled_architectures()["qwen2-0.5b"].read_text())
    return build_plan(spec, rows, "t.jsonl", config, "hf://Qwen/Qwen2-0.5B", (80.0, "r")).to_json()


# ---- Partial ----------------------------------------------------------------------------------


def test_partial_trains_the_requested_number_of_layers() -> None:
    a = arch("qwen2-0.5b")
    half = make_plan(data(5000), a, GPUS, PlanRequest(method=Method.PARTIAL))
    plan = make_plan(data(5000), a, GPUS, PlanRequest(method=Method.PARTIAL, partial_layers=4))
    assert plan.hyperparameters.trainable_layers == 4
    assert plan.trainable_parameters == partial_parameters(a, 4)
    assert plan.trainable_parameters == 4 * a.layer_parameters + a.hidden_size
    assert plan.memory.model_states < half.memory.model_states
    assert plan.memory.activations < half.memory.activations
    assert any("Partial (top 4 layers) needs" in r for r in plan.reasons)


@pytest.mark.parametrize(("fraction", "layers"), [(0.25, 8), (0.5, 16), (0.1, 4), (1.0, 32)])
def test_partial_trains_the_requested_fraction_rounded_up(fraction: float, layers: int) -> None:
    a = arch("llama-2-7b")  # 32 layers
    request = PlanRequest(method=Method.PARTIAL, partial_fraction=fraction)
    plan = make_plan(data(5000), a, GPUS, request)
    assert plan.hyperparameters.trainable_layers == layers
    assert plan.trainable_parameters == partial_parameters(a, layers)


def test_partial_fraction_is_not_rounded_up_by_float_error() -> None:
    ten = replace(arch("llama-2-7b"), num_layers=10)
    assert partial_layer_count(ten, fraction=0.3) == 3  # 0.3 x 10 is 3.0000000000000004
    assert partial_layer_count(ten, fraction=0.01) == 1
    assert partial_layer_count(ten) == 5
    assert partial_layer_count(replace(ten, num_layers=9)) == 5  # the top half, rounded up


def test_method_auto_honours_the_partial_settings_when_it_chooses_partial() -> None:
    a = arch("llama-2-7b")
    plan = make_plan(data(60_000), a, Resources(8, 80), PlanRequest(partial_layers=2))
    assert plan.method is Method.PARTIAL
    assert plan.hyperparameters.trainable_layers == 2
    assert plan.trainable_parameters == partial_parameters(a, 2)
    assert any("train the top 2 of the network's 32 layers (Partial)" in r for r in plan.reasons)


def test_more_partial_layers_than_the_model_has_is_an_invalid_spec() -> None:
    a = arch("qwen2-0.5b")  # 24 layers
    with pytest.raises(ValueError, match="24 decoder layers"):
        make_plan(data(500), a, GPUS, PlanRequest(method=Method.PARTIAL, partial_layers=25))
    spec = make_spec(method={"type": "Partial", "partial": {"trainableLayers": 25}})
    with pytest.raises(PlanRequestError, match=r"spec\.method\.partial\.trainableLayers.*24"):
        plan_for(spec)


def test_plan_request_rejects_both_partial_settings() -> None:
    with pytest.raises(ValueError, match="not both"):
        PlanRequest(partial_layers=2, partial_fraction=0.5)


def test_the_spec_partial_settings_reach_the_plan() -> None:
    by_count = make_spec(method={"type": "Partial", "partial": {"trainableLayers": 3}})
    by_share = make_spec(method={"type": "Partial", "partial": {"fraction": 0.25}})
    assert plan_request(by_count).partial_layers == 3
    assert plan_request(by_share).partial_fraction == 0.25
    assert plan_for(by_count)["hyperparameters"]["trainableLayers"] == 3
    assert plan_for(by_share)["hyperparameters"]["trainableLayers"] == 6  # of 24


# ---- LoRA -------------------------------------------------------------------------------------


def test_lora_settings_set_alpha_dropout_and_targets_and_the_counts_follow() -> None:
    a = arch("llama-2-7b")
    # One micro-batch for both: fewer adapted layers would otherwise buy a larger one.
    default = make_plan(data(500), a, GPUS, PlanRequest(method=Method.LORA, micro_batch_size=2))
    request = PlanRequest(
        method=Method.LORA,
        micro_batch_size=2,
        lora_alpha=32,
        lora_dropout=0.05,
        lora_target_modules=("q_proj", "v_proj"),
    )
    plan = make_plan(data(500), a, GPUS, request)
    hp = plan.hyperparameters
    assert (hp.lora_rank, hp.lora_alpha, hp.lora_dropout) == (8, 32, 0.05)
    assert hp.lora_target_modules == ["q_proj", "v_proj"]
    assert plan.trainable_parameters == lora_parameters(a, 8, ("q_proj", "v_proj")) == 4_194_304
    assert default.trainable_parameters == lora_parameters(a, 8)
    assert plan.memory.model_states < default.memory.model_states
    assert plan.memory.activations < default.memory.activations
    assert lora_input_bytes(a, ("q_proj", "v_proj")) < lora_input_bytes(a)
    text = " ".join(plan.reasons)
    assert "LoRA rank 8, alpha 32, dropout 0.05 on q_proj, v_proj (llama)" in text
    assert "alpha, dropout and target modules set by the request" in text


def test_lora_defaults_are_unchanged_without_settings() -> None:
    hp = make_plan(data(500), arch("llama-2-7b"), GPUS).hyperparameters
    assert hp.lora_alpha == 2 * (hp.lora_rank or 0)
    assert hp.lora_dropout == hp.dropout
    assert PlanRequest(lora_target_modules=()).lora_target_modules is None  # empty: the default


def test_lora_targets_keep_the_order_and_drop_repeats() -> None:
    a = arch("gpt2")
    assert lora_module_names(a) == ("c_attn", "c_proj", "c_fc")
    assert lora_targets(a, None) == ("c_attn", "c_proj", "c_fc")
    assert lora_targets(a, ()) == ("c_attn", "c_proj", "c_fc")
    assert lora_targets(a, ["c_fc", "c_attn", "c_fc"]) == ("c_fc", "c_attn")


def test_unknown_lora_targets_are_an_invalid_spec_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="c_attn, c_proj, c_fc"):
        lora_targets(arch("gpt2"), ["q_proj"])
    spec = make_spec(method={"type": "LoRA", "lora": {"targetModules": ["q_proj", "wq"]}})
    with pytest.raises(PlanRequestError) as caught:
        plan_for(spec)
    message = str(caught.value)
    assert message.startswith("spec.method.lora.targetModules: wq is not a linear layer")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message


def test_the_spec_lora_settings_reach_the_plan() -> None:
    spec = make_spec(
        method={
            "type": "LoRA",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["v_proj"]},
        }
    )
    request = plan_request(spec)
    assert (request.lora_alpha, request.lora_dropout) == (8, 0.0)
    assert request.lora_target_modules == ("v_proj",)
    plan = plan_for(spec)
    hp = plan["hyperparameters"]
    assert (hp["loraRank"], hp["loraAlpha"], hp["loraDropout"]) == (4, 8, 0.0)
    assert hp["loraTargetModules"] == ["v_proj"]
    assert plan["trainableParameters"] == lora_parameters(arch("qwen2-0.5b"), 4, ["v_proj"])


# ---- Prefix -----------------------------------------------------------------------------------


def test_prefix_virtual_tokens_set_the_prefix_parameters() -> None:
    a = arch("qwen2-0.5b")
    request = PlanRequest(method=Method.PREFIX, prefix_tokens=50)
    plan = make_plan(data(500), a, GPUS, request)
    default = make_plan(data(500), a, GPUS, PlanRequest(method=Method.PREFIX))
    assert plan.hyperparameters.prefix_tokens == 50
    assert plan.trainable_parameters == prefix_parameters(a, 50) == 50 * 24 * 2 * 128
    assert plan.memory.model_states > default.memory.model_states
    assert any("Prefix (50 virtual tokens) needs" in r for r in plan.reasons)
    spec = make_spec(method={"type": "Prefix", "prefix": {"numVirtualTokens": 50}})
    assert plan_for(spec)["trainableParameters"] == prefix_parameters(a, 50)


# ---- steps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        ((300, 8, 1, 1, 3), (38, 114)),
        ((64, 8, 1, 1, 2), (8, 16)),
        ((65, 8, 1, 1, 2), (9, 18)),
        ((1000, 4, 2, 4, 1), (32, 32)),
        ((5, 8, 4, 2, 1), (1, 1)),
        ((100, 10, 1, 1, 2.5), (10, 25)),
    ],
)
def test_training_steps(args: tuple[int, int, int, int, float], steps: tuple[int, int]) -> None:
    assert training_steps(*args) == steps
    per_epoch, total = training_steps(*args)
    assert (per_epoch, total) == steps


def test_the_planner_and_the_spec_overrides_count_steps_alike() -> None:
    plain = plan_for(make_spec(), examples=333)
    hp = plain["hyperparameters"]
    assert plain["exampleCount"] == 300  # after the 10% validation split
    assert (hp["stepsPerEpoch"], hp["totalSteps"]) == training_steps(
        300, hp["microBatchSize"], hp["gradientAccumulationSteps"], 1, hp["epochs"]
    )
    spec = make_spec(hyperparameters={"gradientAccumulationSteps": 3})
    hp = plan_for(spec, examples=333)["hyperparameters"]
    assert (hp["stepsPerEpoch"], hp["totalSteps"]) == training_steps(
        300, hp["microBatchSize"], 3, 1, hp["epochs"]
    )


def test_total_steps_round_up_and_are_at_least_one() -> None:
    assert total_steps_for(38, 3) == 114
    assert total_steps_for(10, 2.5) == 25
    assert total_steps_for(3, 0.1) == 1
