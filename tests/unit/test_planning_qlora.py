"""QLoRA and DoRA in the planner: the 4-bit base's bytes, Auto's fallback from LoRA to QLoRA
with its numbers, the refusals naming the field, and the settings reaching the plan."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.planning import (
    DatasetStats,
    Method,
    Offload,
    PlanRequest,
    Resources,
    bundled_architectures,
    lora_parameters,
    make_plan,
    model_state_bytes,
)
from kubetune.planning.job import PlanRequestError, build_plan, plan_request
from kubetune.planning.memory import GIB
from kubetune.planning.quantization import (
    CONSTANT_BITS,
    bitsandbytes_problem,
    quantised_base_bytes,
    quantised_parameters,
    version_tuple,
)
from tests.unit.specs import arch, spec_from

pytestmark = pytest.mark.unit

ONE_24 = Resources(gpus_per_node=1, gpu_memory_gib=24)


def long_data(longest: int = 4096) -> DatasetStats:
    """2,000 examples (LoRA rank 16) up to `longest` tokens."""
    return DatasetStats(example_count=2_000, token_count=2_000 * longest // 2, max_tokens=longest)


def decision(plan: Any, key: str) -> Any:
    return next((d for d in plan.decisions if d.key == key), None)


def gib_figures(sentence: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) GiB", sentence)]


# ---- the quantised base ----------------------------------------------------------------------


def test_double_quantisation_costs_0_127_bits_per_weight_as_the_qlora_paper_says() -> None:
    # Dettmers et al. 2023, section 3: 8/64 + 32/(64*256) = 0.127 bits instead of 0.5.
    assert pytest.approx(0.127, abs=5e-4) == CONSTANT_BITS


def test_llama_3_8b_quantises_its_decoder_linears_and_keeps_the_rest_in_fp32() -> None:
    a = arch("llama-3-8b")
    # Llama-3-8B: 8,030,261,248 parameters, of which the embedding and the untied LM head are
    # 2 x 128,256 x 4,096 and the norms 65 x 4,096; everything else is a decoder linear.
    assert a.total_parameters == 8_030_261_248
    rest = 2 * 128_256 * 4_096 + 65 * 4_096
    assert quantised_parameters(a) == a.total_parameters - rest
    expected = quantised_parameters(a) * (4 + 0.127) / 8 + 4 * rest
    assert quantised_base_bytes(a) == pytest.approx(expected, rel=1e-4)
    # About 7.3 GiB against 15.0 GiB in bf16.
    assert 7.0 * GIB < quantised_base_bytes(a) < 7.6 * GIB
    assert quantised_base_bytes(a) < 0.5 * 2 * a.total_parameters


def test_model_states_take_the_quantised_bytes_and_stream_the_load() -> None:
    plain = model_state_bytes(1_000, 10_000, 500, 0, Offload.NONE, 1)
    quantised = model_state_bytes(1_000, 10_000, 500, 0, Offload.NONE, 1, frozen_bytes=6_000)
    assert plain.gpu == 20 * 1_000 + 2 * 10_000
    assert quantised.gpu == 20 * 1_000 + 6_000
    # Quantised while loading, one bf16 tensor at a time, not the fp32 model.
    assert quantised.cpu == int(2 * 500 * 1.5)
    assert plain.cpu == int(4 * 11_000 * 1.5)


# ---- Auto: LoRA does not fit, QLoRA does ------------------------------------------------------


def test_an_8b_model_on_one_24_gib_gpu_plans_qlora_under_auto_and_states_its_estimate() -> None:
    a = arch("llama-3-8b")
    plan = make_plan(long_data(), a, ONE_24)
    assert plan.method is Method.QLORA
    assert plan.fits
    assert plan.error is None
    assert plan.zero_stage == 0
    assert plan.offload is Offload.NONE
    mem = plan.memory
    assert mem.per_gpu <= mem.usable
    # The frozen base is the 4-bit one, the LoRA states come on top.
    lora_states = 20 * lora_parameters(a, 16)
    assert mem.model_states == quantised_base_bytes(a) + lora_states
    # The fallback says LoRA's need, the switch says both and the base's bytes.
    fallback = decision(plan, "memory.fallback")
    assert fallback is not None
    assert fallback.value == "LoRA"
    assert "Falling back to QLoRA (rank 16, 4-bit NF4 base)" in fallback.sentence
    switch = decision(plan, "method.quantised")
    assert switch is not None
    assert switch.value == "QLoRA"
    lora_need, usable, _gpu, quantised, bf16, qlora_need = gib_figures(switch.sentence)
    assert lora_need > usable >= qlora_need
    assert usable == pytest.approx(mem.usable / GIB, abs=0.05)
    assert qlora_need == pytest.approx(mem.per_gpu / GIB, abs=0.05)
    assert quantised == pytest.approx(quantised_base_bytes(a) / GIB, abs=0.05)
    assert bf16 == pytest.approx(2 * a.total_parameters / GIB, abs=0.05)
    stated = decision(plan, "memory")
    assert stated.value == f"{mem.per_gpu / GIB:.1f} GiB"
    assert stated.sentence.startswith("QLoRA (rank 16, 4-bit NF4 base) needs")
    hp = plan.hyperparameters
    assert (hp.quant_type, hp.double_quant, hp.compute_dtype) == ("nf4", True, "bfloat16")
    assert hp.lora_rank == 16
    assert hp.lora_use_dora is False
    assert decision(plan, "quantization") is not None


def test_auto_keeps_lora_when_it_fits() -> None:
    plan = make_plan(long_data(longest=256), arch("llama-3-8b"), ONE_24)
    assert plan.method is Method.LORA
    assert plan.fits
    assert decision(plan, "method.quantised") is None
    assert plan.hyperparameters.quant_type is None


def test_when_qlora_does_not_fit_either_the_error_gives_its_need() -> None:
    plan = make_plan(long_data(), arch("llama-3-70b"), ONE_24)
    assert not plan.fits
    assert plan.error is not None
    assert plan.error.startswith("No method fits: QLoRA (rank 16")
    # 70B in 4 bits is still about 36 GiB.
    assert plan.memory.per_gpu > 30 * GIB


def test_auto_does_not_fall_back_to_qlora_under_a_requested_zero_3() -> None:
    plan = make_plan(long_data(), arch("llama-3-8b"), ONE_24, PlanRequest(zero_stage=3))
    assert plan.method is not Method.QLORA
    assert decision(plan, "method.quantised") is None


def test_explicit_qlora_on_gpus_of_any_size_plans_zero_0() -> None:
    plan = make_plan(
        long_data(1024),
        arch("llama-2-7b"),
        Resources(gpus_per_node=4, gpu_memory_gib=80),
        PlanRequest(method=Method.QLORA),
    )
    assert plan.method is Method.QLORA
    assert plan.zero_stage == 0
    assert plan.fits
    assert "requested explicitly" in decision(plan, "method").sentence


# ---- DoRA --------------------------------------------------------------------------------------


def test_dora_adds_a_magnitude_per_output_feature_and_needs_more_memory() -> None:
    a = arch("llama-3-8b")
    lora = make_plan(long_data(1024), a, ONE_24, PlanRequest(method=Method.QLORA))
    dora = make_plan(
        long_data(1024), a, ONE_24, PlanRequest(method=Method.QLORA, lora_use_dora=True)
    )
    outs = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # q k v o gate up down
    assert dora.trainable_parameters - lora.trainable_parameters == 32 * outs
    assert dora.memory.activations > lora.memory.activations
    assert dora.hyperparameters.lora_use_dora is True
    assert decision(dora, "lora").sentence.startswith("DoRA rank 16")
    assert "(rank 16, DoRA, 4-bit NF4 base)" in decision(dora, "memory").sentence


# ---- the spec ----------------------------------------------------------------------------------


def make_spec(**extra: Any) -> FineTuneJobSpec:
    base = {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": {"uri": "file:///d/t.jsonl"}}
    return spec_from(base, "demo", "ns", **extra)


def plan_for(spec: FineTuneJobSpec, gpus: int = 1) -> dict[str, Any]:
    rows = "".join(
        json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) + "\n"
        for i in range(200)
    )
    config = json.loads(bundled_architectures()["qwen2-0.5b"].read_text())
    source = "hf://Qwen/Qwen2-0.5B"
    return build_plan(
        spec, rows, "t.jsonl", config, source, (80.0, "r"), cpu_processes=gpus
    ).to_json()


def test_the_spec_qlora_and_dora_settings_reach_the_plan() -> None:
    spec = make_spec(method={"type": "QLoRA", "lora": {"rank": 4, "useDora": True}})
    assert spec.method.lora is not None
    assert spec.method.lora.use_dora is True
    plan = plan_for(spec)
    assert plan["method"] == "QLoRA"
    hp = plan["hyperparameters"]
    assert hp["loraRank"] == 4
    assert hp["loraUseDora"] is True
    assert (hp["quantType"], hp["doubleQuant"], hp["computeDtype"]) == ("nf4", True, "bfloat16")


def test_qlora_on_the_cpu_computes_in_fp32() -> None:
    spec = make_spec(method={"type": "QLoRA"}, resources={"gpusPerNode": 0})
    hp = plan_for(spec)["hyperparameters"]
    assert hp["computeDtype"] == "float32"
    assert hp["loraUseDora"] is False


def test_dora_on_plain_lora_keeps_a_bf16_base() -> None:
    hp = plan_for(make_spec(method={"type": "LoRA", "lora": {"useDora": True}}))["hyperparameters"]
    assert hp["loraUseDora"] is True
    assert hp["quantType"] is None


@pytest.mark.parametrize(
    ("deepspeed", "field"),
    [
        ({"zeroStage": 3}, r"spec\.deepspeed\.zeroStage: method QLoRA .*ZeRO-3 would partition"),
        ({"zeroStage": 2}, r"spec\.deepspeed\.zeroStage: method QLoRA runs with ZeRO-0"),
        ({"zeroStage": 2, "offload": "Optimizer"}, r"spec\.deepspeed\.zeroStage"),
    ],
)
def test_qlora_refuses_the_zero_settings_it_cannot_run_naming_the_field(
    deepspeed: dict[str, Any], field: str
) -> None:
    spec = make_spec(method={"type": "QLoRA"}, deepspeed=deepspeed)
    with pytest.raises(PlanRequestError, match=field):
        plan_request(spec)


def test_qlora_refuses_offload_naming_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"spec\.deepspeed\.offload: method QLoRA does not offload"
    ):
        PlanRequest(method=Method.QLORA, offload=Offload.OPTIMIZER)


def test_lora_settings_are_refused_with_full_but_allowed_with_qlora() -> None:
    from kubetune.api import SpecError

    make_spec(method={"type": "QLoRA", "lora": {"rank": 8}})
    with pytest.raises(SpecError, match="LoRA, QLoRA or Auto"):
        make_spec(method={"type": "Full", "lora": {"useDora": True}})


# ---- bitsandbytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "accelerator", "problem"),
    [
        (None, "GPU", "not installed"),
        ("0.44.1", "GPU", "needs bitsandbytes >= 0.45; 0.44.1 is installed"),
        ("0.45.5", "GPU", None),
        ("0.45.5", "CPU", "on the CPU needs bitsandbytes >= 0.46"),
        ("0.50.2", "CPU", None),
        ("0.48.0.dev0", "CPU", None),
    ],
)
def test_bitsandbytes_versions(version: str | None, accelerator: str, problem: str | None) -> None:
    said = bitsandbytes_problem(version, accelerator)
    if problem is None:
        assert said is None
    else:
        assert said is not None
        assert problem in said


def test_version_tuple() -> None:
    assert version_tuple("0.50.2") == (0, 50, 2)
    assert version_tuple("0.48.0.dev0") == (0, 48, 0)
    assert version_tuple("1.2rc1") == (1, 2)
