"""The remedies in the plan: each one's state and reason in status.plan.reasons, Auto only
with method Auto, EWC only for Full/Partial without ZeRO-3, and model.from's lower
learning-rate band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api import parse_job
from kubetune.planning.remedies import plan_remedies
from tests.plans import plan_document


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
        "decisions": [],
        "warnings": [],
    }


def _planned(plan: dict[str, Any], spec: Any) -> dict[str, Any]:
    """`plan_remedies` on the base plan document with `plan`'s fields, as JSON."""
    return plan_remedies(plan_document(**plan), spec).to_json()


def test_defaults_leave_auto_to_training_start_when_the_method_is_auto() -> None:
    plan = _plan("LoRA")
    plan = _planned(plan, _spec())
    r = plan["remedies"]
    assert r["replay"]["state"] == "Auto"
    assert r["ewc"]["state"] == "Off"  # LoRA
    assert r["lowPerplexityTargets"]["state"] == "Off"  # not among Auto's remedies
    reasons = "\n".join(plan["reasons"])
    assert "Replay of general text: decided at training start" in reasons
    assert "Elastic weight consolidation: off, it applies to Full and Partial" in reasons


def test_auto_applies_with_an_explicit_method_and_on_wins() -> None:
    plan = _plan("Full")
    plan = _planned(
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
    plan = _planned(plan, _spec(remedies={"ewc": {"mode": "On"}}))
    assert plan["remedies"]["ewc"]["state"] == "Off"
    assert any("ZeRO-3" in x for x in plan["reasons"])


@pytest.mark.parametrize(
    ("method", "planned", "want"), [("Full", 2e-5, 5e-6), ("LoRA", 2e-4, 1e-4)]
)
def test_model_from_uses_the_incremental_band(method: str, planned: float, want: float) -> None:
    plan = _plan(method, lr=planned)
    spec = _spec(model={"uri": "hf://kubetune/tiny-llama-en", "from": "pvc://models/run-1"})
    plan = _planned(plan, spec)
    assert plan["hyperparameters"]["learningRate"] == pytest.approx(want)
    assert plan["remedies"]["from"] == "pvc://models/run-1"
    assert any("Incremental update" in x for x in plan["reasons"])


def test_model_from_keeps_a_learning_rate_the_user_set() -> None:
    plan = _plan("Full", lr=1e-4)
    spec = _spec(
        model={"uri": "hf://kubetune/tiny-llama-en", "from": "file:///out/run-1"},
        hyperparameters={"learningRate": 1e-4},
    )
    plan = _planned(plan, spec)
    assert plan["hyperparameters"]["learningRate"] == 1e-4


def test_model_from_must_be_an_output_location() -> None:
    with pytest.raises(ValueError, match=r"model\.from must be"):
        _spec(model={"uri": "hf://kubetune/tiny-llama-en", "from": "hf://org/name"})


def test_previous_output_is_read_where_the_operator_mounted_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.remedies.previous import previous_output

    (tmp_path / "run-41" / "final").mkdir(parents=True)
    monkeypatch.delenv("KUBETUNE_PREVIOUS_PATH", raising=False)
    assert previous_output(f"file://{tmp_path}/run-41") == tmp_path / "run-41" / "final"
    with pytest.raises(TrainerConfigError, match="mounted by the operator"):
        previous_output("pvc://runs/run-41")
    monkeypatch.setenv("KUBETUNE_PREVIOUS_PATH", str(tmp_path / "run-41"))
    assert previous_output("pvc://runs/run-41") == tmp_path / "run-41" / "final"


def test_sam_on_runs_on_one_process_without_zero_and_says_its_cost() -> None:
    plan = _plan("Full")
    plan = _planned(plan, _spec(remedies={"sam": {"mode": "On", "rho": 0.1}}))
    assert plan["remedies"]["sam"]["state"] == "On"
    reason = next(r for r in plan["reasons"] if r.startswith("Sharpness-aware"))
    assert "rho 0.1" in reason
    assert "two forward and backward passes" in reason
    assert any(w.startswith("SAM keeps the weight perturbation") for w in plan["warnings"])
    for zero, nodes in ((2, 1), (0, 2)):
        plan = {**_plan("Full", zero=zero), "numNodes": nodes, "reasons": [], "warnings": []}
        plan = _planned(plan, _spec(remedies={"sam": {"mode": "On"}}))
        assert plan["remedies"]["sam"]["state"] == "Off"
        reason = next(r for r in plan["reasons"] if r.startswith("Sharpness-aware"))
        assert "one process without DeepSpeed" in reason


def test_self_rewrite_and_augmentation_are_explained_in_the_plan() -> None:
    plan = _plan("Full")
    plan = _planned(
        plan,
        _spec(
            remedies={"selfRewrite": {"mode": "On", "minOverlap": 0.5}},
            augmentation={"paraphrases": 2, "backTranslations": 1, "pivotLanguage": "German"},
        ),
    )
    assert plan["remedies"]["selfRewrite"]["state"] == "On"
    text = "\n".join(plan["reasons"])
    assert "Self-rewrite of the targets: on" in text
    assert "keeps 50% of its words" in text
    assert "2 paraphrases and 1 back-translation via German" in text
    plan = _plan("Full")
    plan = _planned(plan, _spec())
    assert plan["remedies"]["selfRewrite"]["state"] == "Off"
    assert not any(r.startswith("Augmentation") for r in plan["reasons"])


@pytest.mark.parametrize(
    ("examples", "hyperparameters", "on"),
    [
        (150, {}, True),
        (150, {"epochs": 3}, False),
        (250, {}, False),
        (250, {"crossValidation": {"mode": "On", "folds": 3}}, True),
        (150, {"crossValidation": {"mode": "Off"}}, False),
    ],
)
def test_cross_validation_is_planned_for_tiny_sets(
    examples: int, hyperparameters: dict[str, Any], on: bool
) -> None:
    plan = {**_plan("LoRA"), "exampleCount": examples}
    plan["hyperparameters"]["epochs"] = 4
    plan = _planned(plan, _spec(hyperparameters=hyperparameters))
    assert ("crossValidation" in plan) is on
    if on:
        folds = (hyperparameters.get("crossValidation") or {}).get("folds", 4)
        assert plan["crossValidation"] == {"folds": folds, "maxEpochs": 6}
        assert any(r.startswith("Cross-validation: on") for r in plan["reasons"])


def test_a_spec_as_a_camel_case_dict_without_the_new_sections_plans() -> None:
    """plan.json's spec (a dict) from before augmentation and cross-validation existed."""
    plan = {**_plan("Full"), "exampleCount": 500}
    plan = _planned(plan, {"remedies": {"replay": {"mode": "On"}}, "hyperparameters": {}})
    assert plan["remedies"]["replay"]["state"] == "On"
    assert plan["remedies"]["sam"]["state"] == "Off"
    assert "crossValidation" not in plan
