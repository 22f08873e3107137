"""Queues (Kueue): which LocalQueue a job goes to, the training Job it gets, and what a
Workload says about where the job stands; the reconciler following a queued job."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import QUEUE_LABEL, SUSPEND_ANNOTATION
from kubetune.operator.queueing import (
    QueuePosition,
    admission_of,
    newest_workload,
    position_of,
    queue_name,
)
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import get_condition, state_of
from tests.unit.test_operator_reconcile import FakeKube, configmap_example, reconciler

pytestmark = pytest.mark.unit


def _spec(labels: dict[str, str] | None = None) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "hf://org/name"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "labels": labels,
        }
    )


def _workload(name: str = "job-x-train-1a2b", **conditions: tuple[str, str, str]) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": m}
            for t, (s, r, m) in ((t, (c[0], c[1], c[2])) for t, c in conditions.items())
        ]
    }
    if conditions.get("Admitted", ("False",))[0] == "True":
        status["admission"] = {"clusterQueue": "gpu-cq"}
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": status,
    }


def test_the_queue_is_the_label_else_the_default_else_none() -> None:
    assert queue_name(_spec({QUEUE_LABEL: "team-a"}), "shared") == "team-a"
    assert queue_name(_spec({"other": "x"}), "shared") == "shared"
    assert queue_name(_spec(), None) is None
    assert queue_name(_spec({QUEUE_LABEL: ""}), None) is None


def test_kueue_missing_and_a_missing_local_queue_say_what_to_do() -> None:
    gone = admission_of("gpu", "j-train", "ns", None, workload_api=False)
    assert (gone.admitted, gone.reason, gone.warning) == (True, "KueueNotInstalled", True)
    assert "does not serve Kueue's Workload API" in gone.message
    missing = admission_of("gpu", "j-train", "ns", None, local_queue_known=True)
    assert missing.reason == "QueueNotFound"
    assert "LocalQueue 'gpu' does not exist in namespace ns" in missing.message
    assert f"spec.labels[{QUEUE_LABEL}]" in missing.message


def test_a_pending_workload_is_queued_with_the_pending_count_and_kueues_words() -> None:
    said = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
    wl = _workload(QuotaReserved=("False", "Pending", said))
    lq = {"status": {"pendingWorkloads": 3}}
    got = admission_of("gpu", "j-train", "ns", wl, local_queue=lq, local_queue_known=True)
    assert (got.admitted, got.reason, got.warning) == (False, "Queued", False)
    assert "(3 pending there)" in got.message
    assert said in got.message
    assert got.status() == {
        "name": "gpu",
        "workload": "job-x-train-1a2b",
        "pendingWorkloads": 3,
        "message": said,
    }
    assert admission_of("gpu", "j-train", "ns", None).reason == "Queued"


def _pending(*names: str, local_offset: int = 0) -> list[dict[str, Any]]:
    """The visibility API's pendingworkloads items, in order (the ClusterQueue also holds
    `local_offset` Workloads of other LocalQueues ahead of these)."""
    return [
        {
            "metadata": {"name": n, "namespace": "ns"},
            "localQueueName": "gpu",
            "positionInLocalQueue": i,
            "positionInClusterQueue": i + local_offset,
            "priority": 0,
        }
        for i, n in enumerate(names)
    ]


def test_the_position_comes_from_kueues_visibility_api_when_it_answers() -> None:
    wl = _workload("w2", QuotaReserved=("False", "Pending", "insufficient unused quota"))
    lq = {"spec": {"clusterQueue": "team-cq"}, "status": {"pendingWorkloads": 3}}
    pending = _pending("w1", "w2", "w3", local_offset=2)
    got = admission_of(
        "gpu", "j-train", "ns", wl, local_queue=lq, local_queue_known=True, pending=pending
    )
    assert got.position == QueuePosition(local_queue=1, cluster_queue=3)
    assert "(1 ahead of it in LocalQueue 'gpu', 3 ahead of it in ClusterQueue team-cq)" in (
        got.message
    )
    assert "pending there" not in got.message
    assert got.status()["positionInLocalQueue"] == 1
    assert got.status()["positionInClusterQueue"] == 3
    assert got.status()["pendingWorkloads"] == 3

    first = admission_of(
        "gpu", "j", "ns", _workload("w1"), local_queue=lq, local_queue_known=True, pending=pending
    )
    assert first.position is not None
    assert "next in line for ClusterQueue" not in first.message  # two of another queue ahead
    head = _pending("w1")
    first = admission_of(
        "gpu", "j", "ns", _workload("w1"), local_queue=lq, local_queue_known=True, pending=head
    )
    assert "(next in line for ClusterQueue team-cq)" in first.message


def test_without_the_visibility_api_or_off_its_page_the_count_stands_in() -> None:
    wl = _workload("w9")
    lq = {"status": {"pendingWorkloads": 4}}
    for pending in (None, [], _pending("w1", "w2")):
        got = admission_of(
            "gpu", "j", "ns", wl, local_queue=lq, local_queue_known=True, pending=pending
        )
        assert got.position is None
        assert "(4 pending there)" in got.message
        assert "positionInLocalQueue" not in got.status()
    assert position_of("w1", [{"metadata": {"name": "w1"}, "positionInLocalQueue": "x"}]) is None


def test_a_preempted_workload_keeps_its_position_in_status() -> None:
    wl = _workload("w1", Evicted=("True", "Preempted", "Preempted to accommodate a workload"))
    got = admission_of(
        "gpu", "j", "ns", wl, local_queue={}, local_queue_known=True, pending=_pending("w1")
    )
    assert got.reason == "Preempted"
    assert got.status()["positionInClusterQueue"] == 0


def test_more_than_the_cluster_queue_can_ever_give_is_inadmissible() -> None:
    said = (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in "
        "flavor h100, previously considered podsets requests (0) + current podset request "
        "(16) > maximum capacity (8)"
    )
    got = admission_of("gpu", "j", "ns", _workload(QuotaReserved=("False", "Pending", said)))
    assert (got.reason, got.warning) == ("Inadmissible", True)
    assert "can never be admitted" in got.message
    assert "(16) > maximum capacity (8)" in got.message


def test_admitted_and_preempted() -> None:
    admitted = admission_of("gpu", "j", "ns", _workload(Admitted=("True", "Admitted", "")))
    assert (admitted.admitted, admitted.reason, admitted.cluster_queue) == (
        True,
        "Admitted",
        "gpu-cq",
    )
    evicted = _workload(
        Evicted=(
            "True",
            "Preempted",
            "Preempted to accommodate a workload (UID: u) due to "
            "prioritization in the ClusterQueue",
        ),
        QuotaReserved=("False", "Pending", ""),
    )
    got = admission_of("gpu", "j", "ns", evicted)
    assert (got.admitted, got.reason, got.warning) == (False, "Preempted", False)
    assert "no failure is counted" in got.message
    other = _workload(Evicted=("True", "PodsReadyTimeout", "pods not ready in 10m"))
    assert admission_of("gpu", "j", "ns", other).reason == "Queued"


def test_the_newest_workload_is_the_current_one() -> None:
    old, new = _workload("a"), _workload("b")
    new["metadata"]["creationTimestamp"] = "2026-01-02T00:00:00Z"
    assert newest_workload([new, old]) is new
    assert newest_workload([]) is None


def test_states_of_a_queued_job() -> None:
    def c(t: str, s: str) -> dict[str, Any]:
        return {"type": t, "status": s, "reason": "R", "message": ""}

    assert state_of([c("Planned", "True"), c("Admitted", "False")], True, False) == "Queued"
    assert state_of([c("Admitted", "True")], True, False) == "Admitted"
    assert state_of([c("Admitted", "True"), c("Running", "True")], True, False) == "Running"
    assert state_of([c("Admitted", "False"), c("Suspended", "True")], True, False) == "Suspended"


def _field(status: dict[str, Any], ctype: str, key: str) -> Any:
    found = get_condition(status["conditions"], ctype)
    assert found is not None, f"no {ctype} condition in {status}"
    return found[key]


# ---- the reconciler with a queue ---------------------------------------------------------------


def test_a_queued_job_waits_is_admitted_runs_and_goes_back_to_queued_when_preempted() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, labels={QUEUE_LABEL: "gpu"})
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    rec.reconcile("ns", name)
    job = kube.stored_job("ns", f"{name}-train")
    # Created suspended, with the queue label Kueue reads; no suspend applied yet.
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu"
    assert job["metadata"]["annotations"][SUSPEND_ANNOTATION] == "false"
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Queued"
    assert _field(status, "Admitted", "reason") == "QueueNotFound"
    assert _field(status, "Suspended", "status") == "False"
    assert ("Warning", "QueueNotFound") in [(t, r) for t, r, _ in events.seen]

    uid = job["metadata"]["uid"]
    kube.local_queues[("ns", "gpu")] = {"status": {"pendingWorkloads": 2}}
    kube.workloads = {("ns", uid): [_workload(QuotaReserved=("False", "Pending", "no quota"))]}
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert status["queue"]["pendingWorkloads"] == 2
    assert "positionInLocalQueue" not in status["queue"]  # no visibility API
    assert _field(status, "Admitted", "reason") == "Queued"
    assert _field(status, "Running", "reason") == "Queued"
    kube.pending = {("ns", "gpu"): _pending("other", "job-x-train-1a2b")}
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert (status["queue"]["positionInLocalQueue"], status["queue"]["positionInClusterQueue"]) == (
        1,
        1,
    )
    assert "1 ahead of it in LocalQueue 'gpu'" in str(_field(status, "Admitted", "message"))
    reads = kube.pending_reads

    # Kueue admits it and unsuspends the Job: Admitted, then Running once pods are active.
    kube.workloads = {("ns", uid): [_workload(Admitted=("True", "Admitted", ""))]}
    job["spec"]["suspend"] = False
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Admitted"
    assert status["queue"]["clusterQueue"] == "gpu-cq"
    job["status"] = {"active": 2, "ready": 2}
    rec.reconcile("ns", name)
    assert kube.ftjs[("ns", name)]["status"]["state"] == "Running"
    assert "positionInLocalQueue" not in kube.ftjs[("ns", name)]["status"]["queue"]
    assert kube.pending_reads == reads  # an admitted job costs no visibility read
    kube.workloads = None  # a running job seen Admitted reads no Workload
    rec.reconcile("ns", name)
    assert kube.ftjs[("ns", name)]["status"]["state"] == "Running"

    # Preempted: Kueue suspends the Job again; back to Queued, nothing failed.
    kube.workloads = {("ns", uid): [_workload(Evicted=("True", "Preempted", "higher priority"))]}
    job["spec"]["suspend"] = True
    job["status"] = {}
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Queued"
    assert _field(status, "Admitted", "reason") == "Preempted"
    assert get_condition(status["conditions"], "Failed") is None
    assert [r for _, r, _ in events.seen if r in ("Queued", "Admitted", "Preempted")] == [
        "Queued",
        "Admitted",
        "Preempted",
    ]
    assert kube.suspends == []  # the operator never touched the Job's suspend itself


def test_without_kueue_a_queued_job_starts_as_before_with_a_warning() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, labels={QUEUE_LABEL: "gpu"})
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    kube.workloads = None  # the API server serves no Workloads
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert _field(status, "Admitted", "reason") == "KueueNotInstalled"
    assert "started without a queue" in _field(status, "Admitted", "message")
    assert kube.suspends == [(f"{name}-train", False, "false")]
    assert kube.stored_job("ns", f"{name}-train")["spec"]["suspend"] is False
    assert ("Warning", "KueueNotInstalled") in [(t, r) for t, r, _ in events.seen]
    assert _field(status, "Suspended", "status") == "False"
    rec.reconcile("ns", name)
    assert len(kube.suspends) == 1


def test_spec_suspend_of_a_queued_job_deactivates_its_workload() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, labels={QUEUE_LABEL: "gpu"})
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    job = kube.stored_job("ns", f"{name}-train")
    kube.workloads = {("ns", job["metadata"]["uid"]): [_workload("wl-1")]}
    kube.ftjs[("ns", name)]["spec"]["suspend"] = True
    rec.reconcile("ns", name)
    assert kube.activations == [("wl-1", False, "true")]
    rec.reconcile("ns", name)
    assert len(kube.activations) == 1
    assert kube.ftjs[("ns", name)]["status"]["state"] == "Suspended"
    assert kube.suspends == []


def test_the_default_queue_setting_queues_jobs_without_a_label() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube)
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.settings = OperatorSettings(default_queue="shared")
    rec.reconcile("ns", name)
    job = kube.stored_job("ns", f"{name}-train")
    assert job["metadata"]["labels"][QUEUE_LABEL] == "shared"
    assert job["spec"]["suspend"] is True
    # The prepare step is never queued: it carries no queue label.
    assert all(
        QUEUE_LABEL not in (o["metadata"].get("labels") or {})
        for (kind, _, n), o in kube.objects.items()
        if n != f"{name}-train" or kind != "Job"
    )


def test_a_job_admitted_and_running_between_two_reconciles_still_says_admitted() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, labels={QUEUE_LABEL: "gpu"})
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    rec.reconcile("ns", name)
    job = kube.stored_job("ns", f"{name}-train")
    kube.workloads = {("ns", job["metadata"]["uid"]): [_workload(Admitted=("True", "A", ""))]}
    job["spec"]["suspend"] = False
    job["status"] = {"active": 2, "ready": 2}
    rec.reconcile("ns", name)
    status = kube.ftjs[("ns", name)]["status"]
    assert (status["state"], _field(status, "Admitted", "reason")) == ("Running", "Admitted")
    assert "Admitted" in events.reasons()
