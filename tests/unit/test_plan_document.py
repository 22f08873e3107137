"""The plan document: one typed model for status.plan, plan.json, the prepare pod's message
and the trainer; decisions replaced by key; the plan updated by decisions at training start."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api import parse_job
from kubetune.api.plan import STEPS_AT_START, Decision, PlanDocument, trainer_decision_key
from kubetune.contract import TERMINATION_LIMIT_BYTES, decode_prepare_message
from kubetune.planning import bundled_architectures
from kubetune.planning.hyperparameters import training_steps
from kubetune.planning.job import build_plan
from kubetune.planning.replan import with_epochs, with_training_rows
from kubetune.prepare import encode_message
from tests.plans import plan_document

pytestmark = pytest.mark.unit


def _auto_plan(examples: int = 200, gpus: int = 8, nodes: int = 2) -> PlanDocument:
    job = parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo"},
            "spec": {
                "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                "dataset": {"uri": "pvc://data/train.jsonl"},
                "resources": {"gpusPerNode": gpus, "numNodes": nodes},
            },
        }
    )
    rows = "".join(
        json.dumps({"prompt": f"What is herb {i}?", "completion": f" Herb {i}: a plant."}) + "\n"
        for i in range(examples)
    )
    config = json.loads(bundled_architectures()["llama-2-7b"].read_text())
    return build_plan(job.spec, rows, "t.jsonl", config, "llama-2-7b", (80.0, "given"))


def test_the_json_reads_back_as_the_same_document() -> None:
    plan = _auto_plan()
    data = plan.to_json()
    assert PlanDocument.model_validate(data) == plan
    assert data["reasons"] == [d["sentence"] for d in data["decisions"]]
    assert "alternative" in data  # method Auto with LoRA by data size: Full as the alternative
    assert "switchedFrom" not in data  # unset optional sections are left out
    assert data["error"] is None


def test_every_planner_decision_has_a_key() -> None:
    plan = _auto_plan()
    keys = [d.key for d in plan.decisions]
    assert "reason" not in keys  # the legacy key is for documents without decisions only
    for key in ("gpuMemory", "data", "model", "method", "method.byEvidence", "memory", "batch"):
        assert key in keys, key
    assert [k for k in keys if k.startswith("remedy.")] == [
        "remedy.replay",
        "remedy.ewc",
        "remedy.lowPerplexityTargets",
        "remedy.halfFineTuning",
        "remedy.sam",
        "remedy.selfRewrite",
    ]


def test_the_alternative_takes_the_planned_method_decision_and_the_evidence_rule() -> None:
    plan = _auto_plan()
    assert plan.alternative is not None
    alt = plan.alternative.plan
    assert alt.method == "Full"
    assert alt.decision("method") == plan.decision("method")  # not "Full was requested"
    assert not any("was requested" in r for r in alt.reasons)
    keys = [d.key for d in alt.decisions]
    assert keys[keys.index("method") + 1] == "method.byEvidence"


def test_with_decision_replaces_by_key_or_inserts_after_one() -> None:
    plan = plan_document(
        decisions=[
            {"key": "method", "sentence": "LoRA by size."},
            {"key": "batch", "sentence": "Batch 8."},
            {"key": "warmup", "sentence": "Warm-up 6."},
        ]
    )
    replaced = plan.with_decision(Decision(key="batch", sentence="Batch 16."))
    assert replaced.reasons == ["LoRA by size.", "Batch 16.", "Warm-up 6."]
    inserted = plan.with_decision(Decision(key="steps", sentence="Steps 50."), after="batch")
    assert inserted.reasons == ["LoRA by size.", "Batch 8.", "Steps 50.", "Warm-up 6."]
    appended = plan.with_decision(Decision(key="steps", sentence="Steps 50."), after="nothing")
    assert appended.reasons[-1] == "Steps 50."
    assert plan.reasons == ["LoRA by size.", "Batch 8.", "Warm-up 6."]  # unchanged


def test_a_document_with_reasons_only_reads_as_decisions_keyed_reason() -> None:
    data = plan_document().to_json()
    del data["decisions"]
    data["reasons"] = ["one", "two"]
    plan = PlanDocument.model_validate(data)
    assert [(d.key, d.sentence) for d in plan.decisions] == [("reason", "one"), ("reason", "two")]


def test_a_bad_plan_names_the_field() -> None:
    data: dict[str, Any] = plan_document().to_json()
    data["hyperparameters"]["microBatchSize"] = "eight"
    with pytest.raises(ValueError, match="microBatchSize"):
        PlanDocument.model_validate(data)


def test_the_compact_form_reads_back_as_the_same_document() -> None:
    plan = _auto_plan()
    compact = plan.to_compact_json()
    assert "reasons" not in compact
    assert all(isinstance(d, int) for d in compact["alternative"]["plan"]["decisions"][:5])
    assert PlanDocument.from_compact_json(compact) == plan
    assert PlanDocument.from_compact_json(plan.to_json()) == plan


def test_the_prepare_message_of_a_large_auto_plan_fits_and_decodes() -> None:
    plan = _auto_plan()
    message = encode_message({"plan": plan.to_compact_json()})
    assert len(message.encode()) <= TERMINATION_LIMIT_BYTES
    decoded = decode_prepare_message(message)
    assert PlanDocument.from_compact_json(decoded["plan"]) == plan


def test_trainer_decision_keys() -> None:
    assert trainer_decision_key("method") == "method.atTrainingStart"
    assert trainer_decision_key("steps") == STEPS_AT_START
    assert trainer_decision_key("remedy", "replay") == "auto.remedy.replay"


# ---- the plan after decisions at training start -----------------------------------------------


def test_more_training_rows_update_the_steps_beside_the_batch_decision() -> None:
    plan = _auto_plan(examples=300, gpus=1, nodes=1)
    hp = plan.hyperparameters
    rows = 400  # replay's general text: a quarter of the rows
    after = with_training_rows(plan, rows)
    per_epoch, total = training_steps(
        rows, hp.micro_batch_size, hp.gradient_accumulation_steps, 1, hp.epochs
    )
    assert after.hyperparameters.steps_per_epoch == per_epoch > hp.steps_per_epoch
    assert after.hyperparameters.total_steps == total
    # What the run uses and the plan said stays: warm-up and the evaluation interval.
    assert after.hyperparameters.warmup_steps == hp.warmup_steps
    assert after.hyperparameters.eval_steps == hp.eval_steps
    keys = [d.key for d in after.decisions]
    assert keys[keys.index("batch") + 1] == STEPS_AT_START
    step = after.decision(STEPS_AT_START)
    assert step is not None
    assert f"{total} in all (planned {hp.total_steps})" in step.sentence
    assert with_training_rows(plan, plan.example_count) == plan  # same rows: same plan


def test_epochs_chosen_at_start_update_the_plan_and_its_alternative() -> None:
    plan = _auto_plan()
    after = with_epochs(plan, 7, eval_steps_set=False)
    hp = after.hyperparameters
    assert hp.epochs == 7
    assert hp.total_steps == hp.steps_per_epoch * 7
    assert after.alternative is not None
    assert after.alternative.plan.hyperparameters.epochs == 7
    kept = with_epochs(plan, 7, eval_steps_set=True)
    assert kept.hyperparameters.eval_steps == plan.hyperparameters.eval_steps


def test_auto_switches_to_the_alternative_on_surprising_data_only() -> None:
    from kubetune.planning.evidence import Evidence, method_for_evidence, needs_evidence

    plan = _auto_plan()
    assert needs_evidence(plan)
    assert plan.alternative is not None
    threshold = plan.alternative.when.data_perplexity_ratio
    same, why = method_for_evidence(plan, Evidence(10.0, 10.0 / (threshold * 0.9)))
    assert same == plan
    assert why is not None
    assert "method stays LoRA" in why
    switched, why = method_for_evidence(plan, Evidence(10.0 * threshold, 10.0))
    assert switched.method == "Full"
    assert switched.switched_from == "LoRA"
    assert switched.reasons[-1] == why
    assert switched.decision("method.atTrainingStart") is not None
    # No alternative and no Auto remedy: nothing to measure.
    explicit = plan.model_copy(update={"alternative": None, "remedies": None})
    assert not needs_evidence(explicit)
