"""The remedies in the plan: each one's state and reason in status.plan.reasons, Auto only
with method Auto, EWC only for Full/Partial without ZeRO-3, and model.from's lower
learning-rate band."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import parse_job
from kubetune.remedies.plan import plan_remedies


def _spec(**extra: Any) -> Any:
    spec = {"model": {"uri": "hf://kubetune/tiny-llama-en"}, "dataset": {"uri": "file:///d"}}
    return parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {**spec, **extra},
        }
    ).spec


def _plan(method: str = "LoRA", zero: int = 0, lr: float = 2e-4) -> dict[str, Any]:
    return {
        "method": method,
        "zeroStage": zero,
        "totalParameters": 10**9,
        "hyperparameters": {"learningRate": lr},
        "trainableParameters": 10**9,
        "reasons": [],
        "warnings": [],
    }


def test_defaults_leave_auto_to_training_start_when_the_method_is_auto() -> None:
    plan = _plan("LoRA")
    plan_remedies(plan, _spec())
    r = plan["remedies"]
    assert r["replay"]["state"] == "Auto"
    assert r["ewc"]["state"] == "Off"  # LoRA
    assert r["lowPerplexityTargets"]["state"] == "Off"  # not among Auto's remedies
    reasons = "\n".join(plan["reasons"])
    assert "Replay of general text: decided at training start" in reasons
    assert "Elastic weight consolidation: off, it applies to Full and Partial" in reasons


def test_auto_applies_with_an_explicit_method_and_on_wins() -> None:
    plan = _plan("Full")
    plan_remedies(
        plan,
        _spec(method={"type": "Full"}, remedies={"ewc": {"mode": "On", "lambda": 50}}),
    )
    r = plan["remedies"]
    assert r["replay"]["state"] == "Auto"
    assert r["ewc"]["state"] == "On"
    assert r["ewc"]["lambda"] == 50
    assert any(
        "Elastic weight consolidation: on, set by spec.remedies" in x for x in plan["reasons"]
    )
    assert any("EWC keeps an fp32 anchor" in w for w in plan["warnings"])


def test_ewc_is_off_under_zero3() -> None:
    plan = _plan("Full", zero=3)
    plan_remedies(plan, _spec(remedies={"ewc": {"mode": "On"}}))
    assert plan["remedies"]["ewc"]["state"] == "Off"
    assert any("ZeRO-3" in x for x in plan["reasons"])


@pytest.mark.parametrize(
    ("method", "planned", "want"), [("Full", 2e-5, 5e-6), ("LoRA", 2e-4, 1e-4)]
)
def test_model_from_uses_the_incremental_band(method: str, planned: float, want: float) -> None:
    plan = _plan(method, lr=planned)
    spec = _spec(model={"uri": "hf://kubetune/tiny-llama-en", "from": "pvc://models/run-1"})
    plan_remedies(plan, spec)
    assert plan["hyperparameters"]["learningRate"] == pytest.approx(want)
    assert plan["remedies"]["from"] == "pvc://models/run-1"
    assert any("Incremental update" in x for x in plan["reasons"])


def test_model_from_keeps_a_learning_rate_the_user_set() -> None:
    plan = _plan("Full", lr=1e-4)
    spec = _spec(
        model={"uri": "hf://kubetune/tiny-llama-en", "from": "file:///out/run-1"},
        hyperparameters={"learningRate": 1e-4},
    )
    plan_remedies(plan, spec)
    assert plan["hyperparameters"]["learningRate"] == 1e-4


def test_model_from_must_be_an_output_location() -> None:
    with pytest.raises(ValueError, match=r"model\.from must be"):
        _spec(model={"uri": "hf://kubetune/tiny-llama-en", "from": "hf://org/name"})
