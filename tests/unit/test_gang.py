"""Gang restarts of multi-node runs, the stop budget from the plan, and how the operator
reads its failed pods: the pure functions and the reconciler against the in-memory API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.contract import EXIT_INTERRUPTED, Env
from kubetune.operator import gang
from kubetune.operator.builders import JobRef, training_job
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import get_condition
from kubetune.planning.interruption import (
    MAX_GRACE_SECONDS,
    MIN_COLLECTIVE_SECONDS,
    MIN_GRACE_SECONDS,
    checkpoint_bytes_per_node,
    stop_times,
)
from tests.plans import plan_document
from tests.unit.test_operator_reconcile import FakeKube, configmap_example, reconciler

pytestmark = pytest.mark.unit


def pod(
    name: str,
    index: str,
    phase: str = "Failed",
    pod_reason: str | None = None,
    exit_code: int | None = 1,
    reason: str | None = "Error",
    disrupted: bool = False,
    message: str = "",
    finished_at: str | None = None,
) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason, "message": message}
    if finished_at is not None:
        terminated["finishedAt"] = finished_at
    state = {"terminated": terminated} if exit_code is not None else {}
    return {
        "metadata": {
            "name": name,
            "annotations": {"batch.kubernetes.io/job-completion-index": index},
        },
        "status": {
            "phase": phase,
            **({"reason": pod_reason} if pod_reason else {}),
            "conditions": [{"type": "DisruptionTarget", "status": "True"}] if disrupted else [],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


# ---- the pods' ends


def test_a_crash_wins_over_the_interrupted_pods_it_took_down() -> None:
    ends = gang.pod_ends(
        [
            pod("j-train-0-aaa", "0", exit_code=EXIT_INTERRUPTED, reason="Error"),
            pod("j-train-1-bbb", "1", exit_code=1, message="RuntimeError: boom"),
            pod("j-train-2-ccc", "2", phase="Running", exit_code=None),
        ]
    )
    assert [e.pod for e in ends] == ["j-train-0-aaa", "j-train-1-bbb"]
    failure = gang.gang_failure(ends)
    assert failure is not None
    assert failure.kind == "crash"
    assert failure.pod == "j-train-1-bbb"
    assert "exit code 1 (Error): RuntimeError: boom" in failure.message


def test_the_rank_that_died_first_is_named_when_its_peers_crashed_after_it() -> None:
    """Rank 1 killed; rank 0's collective then fails on the closed connection a second
    later, also a crash: the failure names rank 1, whatever the pods' names sort as."""
    ends = gang.pod_ends(
        [
            pod(
                "job-train-0-abc",
                "0",
                message="gloo: connection closed by peer",
                finished_at="2026-12-04T19:00:02Z",
            ),
            pod(
                "job-train-1-xyz",
                "1",
                exit_code=137,
                reason="Error",
                finished_at="2026-12-04T19:00:01Z",
            ),
        ]
    )
    failure = gang.gang_failure(ends)
    assert failure is not None
    assert (failure.kind, failure.pod) == ("crash", "job-train-1-xyz")
    assert "exit code 137" in failure.message


def test_sigterm_disruption_and_never_started_pods_are_interruptions() -> None:
    for p in (
        pod("a", "0", exit_code=EXIT_INTERRUPTED),
        pod("a", "0", exit_code=137, disrupted=True),
        pod("a", "0", exit_code=None),
    ):
        failure = gang.gang_failure(gang.pod_ends([p]))
        assert failure is not None, p
        assert failure.kind == "interrupted", p


def test_an_oom_kill_wins_and_is_never_retried() -> None:
    ends = gang.pod_ends(
        [pod("a", "0", exit_code=1), pod("b", "1", exit_code=137, reason="OOMKilled")]
    )
    failure = gang.gang_failure(ends)
    assert failure is not None
    assert (failure.kind, failure.pod) == ("oom", "b")
    decision = gang.decide_restart(failure, restarts=0, backoff_limit=5)
    assert (decision.restart, decision.reason) == (False, "OOMKilled")
    text = gang.oom_message("b", "6Gi", 4.25)
    for part in ("memory limit 6Gi", "4.2 GiB", "microBatchSize", "zeroStage", "resourcesPerNode"):
        assert part in text


def test_crashes_count_against_the_backoff_limit_and_interruptions_do_not() -> None:
    crash = gang.GangFailure("crash", "p", "p failed")
    assert gang.decide_restart(crash, 0, 2) == gang.RestartDecision(
        True, True, "PodFailed", "p failed"
    )
    assert gang.decide_restart(crash, 1, 2).restart
    last = gang.decide_restart(crash, 2, 2)
    assert (last.restart, last.reason) == (False, "BackoffLimitExceeded")
    assert "restarted 2 time(s), spec.backoffLimit is 2" in last.message
    stop = gang.GangFailure("interrupted", "p", "p stopped on SIGTERM")
    assert gang.decide_restart(stop, 99, 0) == gang.RestartDecision(
        True, False, "Interrupted", "p stopped on SIGTERM"
    )
    assert gang.gang_failure([]) is None


# ---- the stop budget


def test_the_checkpoint_a_node_writes_follows_the_method_and_the_zero_stage() -> None:
    full = plan_document(method="Full", zeroStage=3, numNodes=2)
    params = full.total_parameters
    # ZeRO-3: node 0 writes the gathered 16-bit model whole, and its shard of the rest.
    shard = -(-(params * 2 + full.trainable_parameters * 12) // 2)
    assert checkpoint_bytes_per_node(full) == params * 2 + shard
    # ZeRO-1/2: the model file and the engine's copy of the weights, and an optimizer shard.
    zero2 = full.model_copy(update={"zero_stage": 2})
    assert checkpoint_bytes_per_node(zero2) == 2 * params * 2 + -(
        -full.trainable_parameters * 12 // 2
    )
    lora = full.model_copy(update={"method": "LoRA", "trainable_parameters": 1000})
    assert checkpoint_bytes_per_node(lora) == 1000 * 4 + -(-(1000 * 16) // 2)


def test_grace_and_timeouts_grow_with_the_checkpoint_within_their_bounds() -> None:
    tiny = stop_times(plan_document(method="LoRA"))
    assert tiny.grace_seconds == MIN_GRACE_SECONDS
    assert tiny.shutdown_seconds == tiny.grace_seconds - 10
    assert tiny.collective_seconds == MIN_COLLECTIVE_SECONDS
    big = plan_document(method="Full", zeroStage=0, numNodes=1).model_copy(
        update={"total_parameters": 7_000_000_000, "trainable_parameters": 7_000_000_000}
    )
    times = stop_times(big)
    # 7B x 14 bytes at 200 MiB/s: about 467 s to write; the grace covers it twice.
    assert 450 < times.checkpoint_seconds < 500
    assert times.grace_seconds == pytest.approx(60 + 2 * times.checkpoint_seconds, abs=1)
    assert times.collective_seconds >= 3 * times.checkpoint_seconds
    huge = big.model_copy(update={"total_parameters": 10**12, "trainable_parameters": 10**12})
    assert stop_times(huge).grace_seconds == MAX_GRACE_SECONDS


def test_the_training_job_carries_the_stop_budget_and_a_gang_has_no_per_pod_retries() -> None:
    from tests.unit.specs import spec_from

    ref = JobRef(name="j", namespace="ns", uid="uid", generation=1)
    settings = OperatorSettings()
    base = {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": {"uri": "pvc://d/train.jsonl"}}
    for nodes in (1, 2):
        spec = spec_from(
            base, "j", "ns", resources={"numNodes": nodes, "gpusPerNode": 8}, backoffLimit=3
        )
        plan = plan_document(numNodes=nodes)
        job = training_job(ref, spec, plan, settings)
        times = stop_times(plan)
        pod_spec = job["spec"]["template"]["spec"]
        assert pod_spec["terminationGracePeriodSeconds"] == times.grace_seconds
        env = {e["name"]: e.get("value") for e in pod_spec["containers"][0]["env"]}
        assert env[Env.COLLECTIVE_TIMEOUT] == str(times.collective_seconds)
        assert env[Env.SHUTDOWN_TIMEOUT] == str(times.shutdown_seconds)
        rules = job["spec"]["podFailurePolicy"]["rules"]
        if nodes == 1:
            assert job["spec"]["backoffLimit"] == 3
            assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
        else:
            assert job["spec"]["backoffLimit"] == 0
            assert [r["action"] for r in rules] == ["FailJob"]


# ---- the reconciler


def _failed_gang(kube: FakeKube, name: str, pods: list[dict[str, Any]]) -> None:
    kube.stored_job("ns", f"{name}-train")["status"] = {
        "failed": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
    }
    kube.pods[("ns", f"{name}-train")] = pods


def test_a_two_node_gang_restarts_together_and_fails_past_its_backoff_limit() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, resources={"numNodes": 2, "gpusPerNode": 1}, backoffLimit=1)
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    rec.reconcile("ns", name)
    # An interruption (pod 1 deleted: both saved and stopped on SIGTERM) is not counted.
    _failed_gang(
        kube,
        name,
        [
            pod(f"{name}-train-0-x", "0", exit_code=143),
            pod(f"{name}-train-1-y", "1", exit_code=143),
        ],
    )
    assert rec.reconcile("ns", name) == "training"
    assert kube.deleted_jobs == [("ns", f"{name}-train")]
    status = kube.ftjs[("ns", name)]["status"]
    assert status["restarts"]["interruptions"] == 1
    assert "count" not in status["restarts"]
    running = get_condition(status["conditions"], "Running")
    assert running is not None
    assert running["reason"] == "Restarting"
    assert "GangRestart" in events.reasons()
    assert status["state"] != "Failed"
    # The next reconcile creates the Job again.
    assert rec.reconcile("ns", name) == "training"
    assert ("Job", f"{name}-train") in kube.created[4:]
    # A crash is counted: one restart is allowed by backoffLimit 1, the second fails it.
    _failed_gang(kube, name, [pod(f"{name}-train-1-z", "1", exit_code=1, message="boom")])
    rec.reconcile("ns", name)
    assert kube.ftjs[("ns", name)]["status"]["restarts"]["count"] == 1
    rec.reconcile("ns", name)
    _failed_gang(kube, name, [pod(f"{name}-train-0-w", "0", exit_code=1, message="boom")])
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Failed"
    failed = get_condition(status["conditions"], "Failed")
    assert failed is not None
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "spec.backoffLimit is 1" in failed["message"]
    assert len(kube.deleted_jobs) == 2


def test_a_job_being_deleted_for_a_restart_waits_for_its_pods() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, resources={"numNodes": 2, "gpusPerNode": 1})
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    kube.stored_job("ns", f"{name}-train")["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    created = len(kube.created)
    assert rec.reconcile("ns", name) == "training"
    assert len(kube.created) == created
    running = get_condition(kube.ftjs[("ns", name)]["status"]["conditions"], "Running")
    assert running is not None
    assert running["reason"] == "Restarting"


@pytest.mark.parametrize("nodes", [1, 2])
def test_an_oom_killed_training_pod_fails_the_job_saying_what_to_change(nodes: int) -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, resources={"numNodes": nodes, "gpusPerNode": 1})
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    _failed_gang(kube, name, [pod(f"{name}-train-0-x", "0", exit_code=137, reason="OOMKilled")])
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    failed = get_condition(status["conditions"], "Failed")
    assert failed is not None, json.dumps(status)[:800]
    assert failed["reason"] == "OOMKilled", json.dumps(status)[:800]
    assert "microBatchSize" in failed["message"]
    assert not kube.deleted_jobs


def test_a_gang_whose_pods_were_all_deleted_restarts_as_an_interruption() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, resources={"numNodes": 2, "gpusPerNode": 1}, backoffLimit=0)
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    # Pod 1 deleted, pod 0 deleted by the Job controller after it: no Failed pod is left.
    _failed_gang(kube, name, [])
    assert rec.reconcile("ns", name) == "training"
    status = kube.ftjs[("ns", name)]["status"]
    assert status["restarts"]["interruptions"] == 1
    assert "deleted" in status["restarts"]["lastMessage"]
    assert kube.deleted_jobs == [("ns", f"{name}-train")]


def test_a_pod_refused_at_admission_is_a_crash_not_an_interruption() -> None:
    """No container exit and a kubelet reason: the node may refuse it again, so it counts."""
    ends = gang.pod_ends(
        [pod("j-train-1-y", "1", exit_code=None, pod_reason="UnexpectedAdmissionError")]
    )
    failure = gang.gang_failure(ends)
    assert failure is not None
    assert failure.kind == "crash"
    assert "UnexpectedAdmissionError" in failure.message
    # Deleted before its container ran (no reason): an interruption, as before.
    deleted = gang.gang_failure(gang.pod_ends([pod("j-train-1-y", "1", exit_code=None)]))
    assert deleted is not None
    assert deleted.kind == "interrupted"


def test_interruptions_without_progress_are_bounded() -> None:
    failure = gang.GangFailure("interrupted", "p", "p was disrupted")
    limit = gang.MAX_STALLED_INTERRUPTIONS
    assert gang.decide_restart(failure, 0, 3, stalled=limit).restart
    stop = gang.decide_restart(failure, 0, 3, stalled=limit + 1)
    assert (stop.restart, stop.reason) == (False, "InterruptedWithoutProgress")
    assert "without a training step" in stop.message


def test_the_reconciler_fails_a_gang_evicted_again_and_again_without_a_step() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, resources={"numNodes": 2, "gpusPerNode": 1})
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    evicted = [pod(f"{name}-train-0-x", "0", exit_code=143, disrupted=True)]
    for attempt in range(1, gang.MAX_STALLED_INTERRUPTIONS + 2):
        if ("Job", "ns", f"{name}-train") not in kube.objects:
            rec.reconcile("ns", name)  # the Job again after the restart
        _failed_gang(kube, name, evicted)
        rec.reconcile("ns", name)
        status = kube.ftjs[("ns", name)]["status"]
        failed = get_condition(status["conditions"], "Failed")
        if attempt <= gang.MAX_STALLED_INTERRUPTIONS:
            assert failed is None or failed["status"] != "True", (attempt, status)
            assert status["restarts"]["interruptionsWithoutProgress"] == attempt
    assert failed is not None
    assert failed["reason"] == "InterruptedWithoutProgress", json.dumps(status)[:800]
    assert status["restarts"]["interruptions"] == gang.MAX_STALLED_INTERRUPTIONS
