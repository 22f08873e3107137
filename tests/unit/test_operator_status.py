"""Pure status logic: conditions, the one-word state, and what the training Job's status
means for the FineTuneJob."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from kubetune.operator.status import (
    CONDITION_TYPES,
    ChildJobView,
    Outcome,
    get_condition,
    is_true,
    now_iso,
    set_condition,
    state_of,
    training_outcome,
    view_job,
)
from tests.plans import plan_document

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)
T2 = T0 + dt.timedelta(hours=1)


def cond(ctype: str, status: str = "True", reason: str = "R", when: str = "x") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": "",
        "lastTransitionTime": when,
        "observedGeneration": 1,
    }


# ---- conditions -------------------------------------------------------------------------------


def test_now_iso_format() -> None:
    assert now_iso(T0) == "2024-05-06T07:08:09Z"
    aware = dt.datetime(2024, 5, 6, 7, 8, 9, 999999, tzinfo=dt.UTC)
    assert now_iso(aware) == "2024-05-06T07:08:09Z"


def test_set_condition_adds_a_full_condition() -> None:
    out = set_condition([], "Planned", "True", "Planned", "LoRA chosen", 3, clock=T0)
    assert out == [
        {
            "type": "Planned",
            "status": "True",
            "reason": "Planned",
            "message": "LoRA chosen",
            "lastTransitionTime": "2024-05-06T07:08:09Z",
            "observedGeneration": 3,
        }
    ]


def test_same_status_keeps_the_transition_time_but_updates_the_rest() -> None:
    first = set_condition([], "Running", "True", "Training", "1 of 2 pods", 1, clock=T0)
    again = set_condition(first, "Running", "True", "Training", "2 of 2 pods", 2, clock=T1)
    assert again == [
        {
            "type": "Running",
            "status": "True",
            "reason": "Training",
            "message": "2 of 2 pods",
            "lastTransitionTime": "2024-05-06T07:08:09Z",
            "observedGeneration": 2,
        }
    ]
    # A new reason with the same status is not a transition either.
    stopping = set_condition(again, "Running", "True", "StopRequested", "stopping", 2, clock=T2)
    assert stopping[0]["lastTransitionTime"] == "2024-05-06T07:08:09Z"
    assert stopping[0]["reason"] == "StopRequested"


@pytest.mark.parametrize(
    ("before", "after"), [("True", "False"), ("False", "True"), ("Unknown", "True")]
)
def test_status_change_moves_the_transition_time(before: str, after: str) -> None:
    first = set_condition([], "Suspended", before, "A", "", 1, clock=T0)
    changed = set_condition(first, "Suspended", after, "B", "", 1, clock=T1)
    assert changed[0]["lastTransitionTime"] == now_iso(T1)
    assert changed[0]["status"] == after


def test_missing_transition_time_is_filled_in() -> None:
    old = [{"type": "Planned", "status": "True", "reason": "Planned"}]
    out = set_condition(old, "Planned", "True", "Planned", "", 1, clock=T1)
    assert out[0]["lastTransitionTime"] == now_iso(T1)


def test_conditions_are_ordered_and_unique() -> None:
    out: list[dict[str, Any]] = []
    for ctype in ("Failed", "Custom", "Running", "Planned", "Succeeded", "EarlyStopped"):
        out = set_condition(out, ctype, "True", "R", "", 1, clock=T0)
    out = set_condition(out, "Running", "False", "Done", "", 1, clock=T0)
    types = [c["type"] for c in out]
    assert types == ["Planned", "Running", "EarlyStopped", "Succeeded", "Failed", "Custom"]
    assert types == sorted(types, key=lambda t: (*CONDITION_TYPES, "Custom").index(t))


def test_set_condition_does_not_change_its_input() -> None:
    before = [cond("Running", "True", "Training", "old"), cond("Planned")]
    snapshot = json.loads(json.dumps(before))
    out = set_condition(before, "Running", "False", "Completed", "", 2, clock=T1)
    assert before == snapshot
    # The other conditions are copies: changing them leaves the input alone.
    planned = get_condition(out, "Planned")
    assert planned == cond("Planned")
    planned["reason"] = "mutated"
    assert before == snapshot


@pytest.mark.parametrize(
    ("conditions", "ctype", "expected"),
    [
        ([], "Running", False),
        ([cond("Running", "True")], "Running", True),
        ([cond("Running", "False")], "Running", False),
        ([cond("Running", "Unknown")], "Running", False),
        ([cond("Planned", "True")], "Running", False),
    ],
)
def test_is_true(conditions: list[dict[str, Any]], ctype: str, expected: bool) -> None:
    assert is_true(conditions, ctype) is expected


# ---- state_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "has_plan", "planning", "state"),
    [
        ([], False, False, "Pending"),
        ([], False, True, "Planning"),
        ([], True, True, "Planned"),
        ([cond("Planned")], True, False, "Planned"),
        ([cond("Running", "True", "Training")], True, False, "Running"),
        ([cond("Running", "True", "StopRequested")], True, False, "Stopping"),
        ([cond("Running", "False", "Completed")], True, False, "Planned"),
        ([cond("Suspended"), cond("Running", "False")], True, False, "Suspended"),
        ([cond("Suspended", "False"), cond("Running", "True")], True, False, "Running"),
        ([cond("Running", "False"), cond("Succeeded")], True, False, "Succeeded"),
        ([cond("EarlyStopped"), cond("Succeeded")], True, False, "Succeeded"),
        ([cond("Running", "True"), cond("Failed")], True, False, "Failed"),
        # Failed wins over everything, even a stale Succeeded.
        ([cond("Succeeded"), cond("Failed")], True, False, "Failed"),
        ([cond("Suspended"), cond("Succeeded")], True, False, "Succeeded"),
        ([cond("Failed", "False")], False, False, "Pending"),
    ],
)
def test_state_of(
    conditions: list[dict[str, Any]], has_plan: bool, planning: bool, state: str
) -> None:
    assert state_of(conditions, has_plan, planning) == state


# ---- view_job ---------------------------------------------------------------------------------


def test_view_of_no_job() -> None:
    assert view_job(None) == ChildJobView(exists=False)


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({}, ChildJobView(exists=True)),
        ({"spec": {"suspend": True}, "status": {}}, ChildJobView(exists=True, suspended=True)),
        (
            {
                "spec": {"suspend": False},
                "status": {
                    "active": 2,
                    "ready": 1,
                    "failed": 1,
                    "startTime": "2024-01-01T00:00:00Z",
                },
            },
            ChildJobView(
                exists=True, active=2, ready=1, failed=1, start_time="2024-01-01T00:00:00Z"
            ),
        ),
        (
            {
                "status": {
                    "succeeded": 2,
                    "completionTime": "2024-01-01T02:00:00Z",
                    "conditions": [
                        {"type": "SuccessCriteriaMet", "status": "True"},
                        {"type": "Complete", "status": "True"},
                    ],
                }
            },
            ChildJobView(
                exists=True, succeeded=2, complete=True, completion_time="2024-01-01T02:00:00Z"
            ),
        ),
        (
            {
                "status": {
                    "failed": 1,
                    "conditions": [
                        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "PodFailurePolicy",
                            "message": "Container trainer for pod ns/x-0 failed with exit code 78",
                        },
                    ],
                }
            },
            ChildJobView(
                exists=True,
                failed=1,
                failed_reason="PodFailurePolicy",
                failed_message="Container trainer for pod ns/x-0 failed with exit code 78",
            ),
        ),
        # Conditions that are not True say nothing.
        (
            {
                "status": {
                    "conditions": [
                        {"type": "Complete", "status": "False"},
                        {"type": "Failed", "status": "False", "reason": "DeadlineExceeded"},
                        {"type": "Suspended", "status": "True"},
                    ]
                }
            },
            ChildJobView(exists=True),
        ),
        # A Failed condition with no reason or message still counts as a failure.
        (
            {"status": {"conditions": [{"type": "Failed", "status": "True"}]}},
            ChildJobView(exists=True, failed_reason="Failed", failed_message=""),
        ),
        ({"spec": None, "status": None}, ChildJobView(exists=True)),
    ],
)
def test_view_job(job: dict[str, Any], expected: ChildJobView) -> None:
    assert view_job(job) == expected


# ---- training_outcome -------------------------------------------------------------------------


def failed(reason: str, message: str = "") -> ChildJobView:
    return ChildJobView(exists=True, failed=1, failed_reason=reason, failed_message=message)


COMPLETE = ChildJobView(exists=True, succeeded=2, complete=True)
EARLY = json.dumps({"earlyStop": {"reason": "Overfitting", "message": "loss gap 0.8 > 0.5"}})


@pytest.mark.parametrize(
    ("view", "nodes", "termination", "expected"),
    [
        (
            COMPLETE,
            2,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "Completed", "training finished"),
                    ("Succeeded", "True", "Completed", "training finished on 2 node(s)"),
                ],
                finished=True,
            ),
        ),
        (
            COMPLETE,
            1,
            EARLY,
            Outcome(
                conditions=[
                    ("Running", "False", "Completed", "training finished"),
                    ("EarlyStopped", "True", "Overfitting", "loss gap 0.8 > 0.5"),
                    ("Succeeded", "True", "EarlyStopped", "loss gap 0.8 > 0.5"),
                ],
                finished=True,
            ),
        ),
        (
            COMPLETE,
            1,
            json.dumps({"earlyStop": {"reason": "NoImprovement"}}),
            Outcome(
                conditions=[
                    ("Running", "False", "Completed", "training finished"),
                    ("EarlyStopped", "True", "NoImprovement", ""),
                    ("Succeeded", "True", "EarlyStopped", ""),
                ],
                finished=True,
            ),
        ),
        (
            COMPLETE,
            1,
            json.dumps({"earlyStop": {"reason": "Diverged", "message": "loss not finite"}}),
            Outcome(
                conditions=[
                    ("Running", "False", "Diverged", "training diverged"),
                    ("EarlyStopped", "True", "Diverged", "loss not finite"),
                    ("Failed", "True", "Diverged", "loss not finite"),
                ],
                finished=True,
            ),
        ),
        (
            failed("PodFailurePolicy", "Container trainer failed with exit code 78"),
            1,
            "dataset line 3: not valid JSON",
            Outcome(
                conditions=[
                    ("Running", "False", "ConfigError", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "ConfigError",
                        "the trainer exited with the configuration-error code: "
                        "dataset line 3: not valid JSON",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("PodFailurePolicy", "Container trainer failed with exit code 78"),
            1,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "ConfigError", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "ConfigError",
                        "the trainer exited with the configuration-error code: "
                        "Container trainer failed with exit code 78",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("PodFailurePolicy"),
            1,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "ConfigError", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "ConfigError",
                        "the trainer exited with the configuration-error code: "
                        "see the pod's termination message",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
            2,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "BackoffLimitExceeded", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
            2,
            "CUDA out of memory",
            Outcome(
                conditions=[
                    ("Running", "False", "BackoffLimitExceeded", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit; "
                        "rank 0 said: CUDA out of memory",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("DeadlineExceeded", "Job was active longer than specified deadline"),
            1,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "DeadlineExceeded", "training stopped"),
                    (
                        "Failed",
                        "True",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                ],
                finished=True,
            ),
        ),
        (
            failed("MaxFailedIndexesExceeded"),
            4,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "BackoffLimitExceeded", "training stopped"),
                    ("Failed", "True", "BackoffLimitExceeded", "BackoffLimitExceeded"),
                ],
                finished=True,
            ),
        ),
        (
            failed("SomethingNew", "?"),
            1,
            None,
            Outcome(
                conditions=[
                    ("Running", "False", "SomethingNew", "training stopped"),
                    ("Failed", "True", "SomethingNew", "?"),
                ],
                finished=True,
            ),
        ),
        (
            ChildJobView(exists=True, suspended=True),
            2,
            None,
            Outcome(
                conditions=[
                    ("Suspended", "True", "Suspended", "spec.suspend is true; no pods run"),
                    ("Running", "False", "Suspended", "suspended"),
                ]
            ),
        ),
        # Pods still terminating after suspend: the Job is suspended all the same.
        (
            ChildJobView(exists=True, suspended=True, active=2),
            2,
            None,
            Outcome(
                conditions=[
                    ("Suspended", "True", "Suspended", "spec.suspend is true; no pods run"),
                    ("Running", "False", "Suspended", "suspended"),
                ]
            ),
        ),
        (
            ChildJobView(exists=True, active=2, ready=1),
            2,
            None,
            Outcome(
                conditions=[
                    ("Suspended", "False", "Resumed", "not suspended"),
                    ("Running", "True", "Training", "2 of 2 pod(s) active, 1 ready"),
                ]
            ),
        ),
        (
            ChildJobView(exists=True),
            3,
            None,
            Outcome(conditions=[("Suspended", "False", "Resumed", "not suspended")]),
        ),
    ],
)
def test_training_outcome(
    view: ChildJobView, nodes: int, termination: str | None, expected: Outcome
) -> None:
    assert training_outcome(view, nodes, termination) == expected


@pytest.mark.parametrize(
    "termination",
    [
        None,
        "",
        "plain text from the trainer",
        "[1, 2]",
        json.dumps({"earlyStop": None}),
        json.dumps({"earlyStop": {"message": "no reason"}}),
        json.dumps({"earlyStop": "Overfitting"}),
        json.dumps({"result": "ok"}),
    ],
)
def test_complete_without_an_early_stop_is_a_plain_success(termination: str | None) -> None:
    outcome = training_outcome(COMPLETE, 2, termination)
    assert outcome.finished
    assert [c[0] for c in outcome.conditions] == ["Running", "Succeeded"]
    assert outcome.conditions[1][2] == "Completed"


def test_long_termination_message_is_cut_to_its_tail() -> None:
    termination = "A" * 3000 + "the real error"
    outcome = training_outcome(failed("BackoffLimitExceeded", "limit"), 1, termination)
    message = outcome.conditions[1][3]
    assert message.endswith("the real error")
    assert message.startswith("limit; rank 0 said: ")
    assert len(message) == len("limit; rank 0 said: ") + 1500


def test_failure_wins_over_completion() -> None:
    view = ChildJobView(
        exists=True, complete=True, failed_reason="DeadlineExceeded", failed_message="late"
    )
    outcome = training_outcome(view, 1, EARLY)
    assert outcome.conditions[1][:3] == ("Failed", "True", "DeadlineExceeded")


def test_live_status_from_the_trainer_metrics_exposition() -> None:
    from kubetune.operator.status import scalar_samples
    from kubetune.operator.status import status_from_metrics as from_values
    from kubetune.trainer.server import TrainerMetrics

    def status_from_metrics(text: str) -> Any:
        return from_values(scalar_samples(text))

    m = TrainerMetrics()
    m.train_loss.set(1.5)
    m.eval_loss.set(1.75)
    m.loss_gap.set(0.25)
    m.eval_perplexity.set(5.75)
    m.best_step.set(40)
    m.step.set(42)
    m.total_steps.set(168)
    m.epoch.set(1.25)
    m.plan_info.labels(method="LoRA", zero_stage="2", offload="None").set(1)
    metrics, progress = status_from_metrics(m.exposition().decode())
    assert metrics == {
        "trainLoss": 1.5,
        "evalLoss": 1.75,
        "lossGap": 0.25,
        "evalPerplexity": 5.75,
        "bestStep": 40,
    }
    assert progress == {"step": 42, "totalSteps": 168, "epoch": 1.25, "percentage": 25.0}
    assert status_from_metrics(TrainerMetrics().exposition().decode()) == ({}, {})


def test_live_status_carries_the_diagnostics_and_a_zero_memorisation_rate() -> None:
    from kubetune.operator.status import scalar_samples, status_from_metrics
    from kubetune.trainer.server import TrainerMetrics

    m = TrainerMetrics()
    m.eval_token_accuracy.set(0.625)
    m.memorization_rate.labels(split="train", match="exact").set(0.25)
    m.memorization_rate.labels(split="train", match="near").set(0.5)
    m.memorization_rate.labels(split="heldout", match="exact").set(0.0)
    m.general_perplexity.set(30.0)
    m.general_perplexity_ratio.set(1.5)
    m.data_perplexity_base.set(200.0)
    m.data_high_perplexity_token_ratio.set(0.4)
    metrics, _ = status_from_metrics(scalar_samples(m.exposition().decode()))
    assert metrics == {
        "evalTokenAccuracy": 0.625,
        "memorizationRate": 0.25,
        "nearVerbatimRate": 0.5,
        "heldoutMemorizationRate": 0.0,
        "generalPerplexity": 30.0,
        "generalPerplexityRatio": 1.5,
        "dataPerplexity": 200.0,
        "highPerplexityTokenRatio": 0.4,
    }


@pytest.mark.parametrize(
    ("data", "general", "existing", "warns"),
    [
        (200.0, 20.0, [], True),
        (50.0, 20.0, [], False),
        (200.0, 0.0, [], False),
        (0.0, 20.0, [], False),
        (200.0, 20.0, ["training data perplexity 200.0 under the base model ..."], False),
    ],
)
def test_the_data_perplexity_warning_is_raised_once(
    data: float, general: float, existing: list[str], warns: bool
) -> None:
    from kubetune.operator.status import data_warning_from_metrics

    values = {
        "kubetune_data_perplexity_base": data,
        "kubetune_general_perplexity_base": general,
        "kubetune_data_high_perplexity_token_ratio": 0.5,
    }
    warning = data_warning_from_metrics(values, existing)
    assert (warning is not None) == warns
    if warning:
        assert "10.0x" in warning
        assert "50% of target tokens" in warning
        assert "rephrase responses in the model's own style" in warning


def test_the_evaluations_body_becomes_policy_input_skipping_bad_rows() -> None:
    from kubetune.operator.status import eval_points
    from kubetune.policy import EvalPoint

    body = [
        {"step": 10, "evalLoss": 2.0, "trainLoss": 2.1, "evalTokenAccuracy": 0.4},
        {"step": 20, "evalLoss": "x"},
        "junk",
        {"step": 30, "evalLoss": 1.5, "trainLoss": None},
    ]
    assert eval_points(body) == [
        EvalPoint(step=10, eval_loss=2.0, train_loss=2.1, eval_accuracy=0.4),
        EvalPoint(step=30, eval_loss=1.5),
    ]
    assert eval_points({"not": "a list"}) == []


def test_the_evaluations_body_carries_the_probe_figures_the_policy_reads() -> None:
    """The operator decides with the same memorisation and forgetting figures as the
    trainer's own policy (the rows of GET /evaluations name them as status.metrics does)."""
    from kubetune.operator.status import eval_points
    from kubetune.policy import EvalPoint, StopSettings, decide

    body = [
        {
            "step": s,
            "evalLoss": 2.0 - s / 100,
            "memorizationRate": 0.6,
            "heldoutMemorizationRate": 0.1,
            "generalPerplexityRatio": 1.1,
        }
        for s in (10, 20)
    ] + [{"step": 30, "evalLoss": 1.6, "memorizationRate": None}]
    points = eval_points(body)
    assert points[0] == EvalPoint(
        step=10,
        eval_loss=1.9,
        memorization_train=0.6,
        memorization_heldout=0.1,
        general_ratio=1.1,
    )
    assert points[2].memorization_train is None
    assert decide(points, StopSettings()).reason == "MemorizationExceeded"


def test_auto_decisions_go_into_the_plan_once_with_the_switched_method() -> None:
    from kubetune.operator.status import apply_decisions

    plan = plan_document(
        decisions=[{"key": "method", "sentence": "Method by data size: LoRA."}]
    ).to_json()
    full = plan_document(method="Full", zeroStage=2, memory={"perGpuGiB": 9.5}).to_json()
    decisions = [
        {
            "kind": "method",
            "text": "Auto at training start: method Full instead of LoRA: surprising data.",
            "plan": {k: full[k] for k in ("method", "zeroStage", "memory")},
        },
        {"kind": "remedy", "name": "replay", "text": "Auto at training start: replay on: x."},
        {"kind": "remedy"},  # malformed entries are skipped
        "junk",
    ]
    new, added = apply_decisions(plan, decisions)
    assert new is not None
    assert new["method"] == "Full"
    assert new["zeroStage"] == 2
    assert new["memory"] == full["memory"]
    assert new["reasons"][1:] == added
    assert len(added) == 2
    assert plan["method"] == "LoRA"  # the input is not changed
    again, added_again = apply_decisions(new, decisions)
    assert again == new
    assert added_again == []
    assert apply_decisions(None, decisions) == (None, [])
    assert apply_decisions(plan, {"not": "a list"}) == (plan, [])


PSS_REFUSAL = (
    'Error creating: pods "j-train-0-x2x4k" is forbidden: violates PodSecurity '
    '"baseline:latest": hostPath volumes (volume "output-host")'
)


@pytest.mark.parametrize(
    ("event", "says"),
    [
        (PSS_REFUSAL, "set spec.output.uri (its default is a file:// URI) to a pvc:// claim"),
        (
            'Error creating: pods "p" is forbidden: violates PodSecurity "restricted:latest": '
            "allowPrivilegeEscalation != false",
            "this namespace's Pod Security level refuses the pods",
        ),
        (
            'Error creating: pods "p" is forbidden: exceeded quota: gpus, requested: '
            "requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=8, limited: "
            "requests.nvidia.com/gpu=8",
            "the namespace's ResourceQuota is used up",
        ),
        ('Error creating: admission webhook "x" denied the request', "starts once the cause"),
    ],
)
def test_refused_pods_are_named_with_the_server_message_and_what_to_do(
    event: str, says: str
) -> None:
    from kubetune.operator.status import pod_creation_blocked

    reason, message = pod_creation_blocked("j-train", event)
    assert reason == "PodCreationFailed"
    assert message.startswith(f"Job j-train cannot create its pods: {event} (")
    assert says in message
    assert "keeps retrying" in message or "re-create the FineTuneJob" in message


def test_the_hostpath_hint_names_the_fields_whose_volumes_were_refused() -> None:
    from kubetune.operator.status import pod_creation_blocked

    both = PSS_REFUSAL.replace('(volume "output-host")', '(volumes "output-host", "previous-host")')
    _, message = pod_creation_blocked("j-train", both)
    assert "set spec.output.uri (its default is a file:// URI) and spec.model.from to a pvc://" in (
        message
    )
    _, message = pod_creation_blocked(
        "j-train", PSS_REFUSAL.replace("output-host", "previous-host")
    )
    assert "set spec.model.from to a pvc:// claim" in message


T = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("events", "floor", "expected"),
    [
        ([], [], None),
        ([(T, "a")], [], "a"),
        ([(T, "a"), (T + dt.timedelta(seconds=5), "b")], [], "b"),
        ([(T, "a")], [T + dt.timedelta(seconds=1)], None),  # before a (re)start or a pod
        ([(T, "a")], [T], "a"),  # the same second still holds
        ([(T + dt.timedelta(seconds=9), "a")], [T, T + dt.timedelta(seconds=1)], "a"),
        ([(T + dt.timedelta(seconds=9), "a")], [T, T + dt.timedelta(seconds=10)], None),
        ([(T, "")], [], None),
    ],
)
def test_only_a_refusal_newer_than_every_restart_and_pod_holds(
    events: list[tuple[dt.datetime, str]], floor: list[dt.datetime], expected: str | None
) -> None:
    from kubetune.operator.status import current_creation_failure, parse_time

    assert current_creation_failure(events, floor) == expected
    assert parse_time("2024-05-06T07:08:09Z") == T
    assert parse_time("2024-05-06T07:08:09+00:00") == T
    assert parse_time(None) is None


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([cond("Running", "False", "PodCreationFailed")], "Blocked"),
        ([cond("Planned", "False", "PodCreationFailed")], "Blocked"),
        ([cond("Planned", "False", "Preparing")], "Planned"),
        ([cond("Running", "False", "Starting")], "Planned"),
        (
            [cond("Planned", "False", "PodCreationFailed"), cond("Failed", "True", "X")],
            "Failed",
        ),
        (
            [cond("Running", "False", "PodCreationFailed"), cond("Suspended", "True", "S")],
            "Suspended",
        ),
        (
            [cond("Running", "False", "PodCreationFailed"), cond("Succeeded", "True", "S")],
            "Succeeded",
        ),
    ],
)
def test_a_blocked_job_has_its_own_state_unless_a_final_or_suspended_one_wins(
    conditions: list[dict[str, Any]], expected: str
) -> None:
    assert state_of(conditions, True, False) == expected


def test_a_refusal_from_before_a_suspension_is_history_after_the_resume() -> None:
    """Blocked, suspended (the pods deleted), the quota freed, resumed: until the Job
    controller resets startTime, the Suspended condition's transition dates the old refusal."""
    from types import SimpleNamespace

    from kubernetes import client

    from kubetune.operator.k8s import Kube

    refused = client.CoreV1Event(
        involved_object=client.V1ObjectReference(),
        metadata=client.V1ObjectMeta(creation_timestamp=T),
        message=PSS_REFUSAL,
        last_timestamp=T + dt.timedelta(seconds=30),
    )
    core = SimpleNamespace(
        list_namespaced_event=lambda *a, **k: SimpleNamespace(items=[refused]),
        list_namespaced_pod=lambda *a, **k: SimpleNamespace(items=[]),
    )
    kube = Kube(client.ApiClient(client.Configuration()))
    kube.core = core
    job: dict[str, Any] = {
        "metadata": {"name": "j-train", "uid": "u"},
        "status": {"startTime": "2024-05-06T07:08:09Z"},
    }
    assert kube.pod_creation_failure("ns", job) == PSS_REFUSAL
    for status in ("True", "False"):  # suspended, then resumed (startTime not yet reset)
        job["status"]["conditions"] = [
            {"type": "Suspended", "status": status, "lastTransitionTime": "2024-05-06T07:09:00Z"}
        ]
        assert kube.pod_creation_failure("ns", job) is None
