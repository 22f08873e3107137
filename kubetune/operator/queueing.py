"""Pure queue logic (Kueue): which queue a job's training Job goes to, and what the
Workload Kueue made for it (and the LocalQueue) say about where the job stands.

Kueue admits the training Job through a Workload it creates for it (owned by the Job,
labelled with the Job's uid). The operator reads that Workload, and the LocalQueue while it
waits, only while the Job has no running pods; a running job costs no extra read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import QUEUE_LABEL

#: The reasons of the Admitted condition.
AdmissionReason = Literal[
    "Queued", "Admitted", "Preempted", "Inadmissible", "QueueNotFound", "KueueNotInstalled"
]


def queue_name(spec: FineTuneJobSpec, default_queue: str | None) -> str | None:
    """The LocalQueue of the job: spec.labels' kueue.x-k8s.io/queue-name, else the operator's
    default queue (KUBETUNE_DEFAULT_QUEUE), else none (no queue: the Job starts at once)."""
    named = (spec.labels or {}).get(QUEUE_LABEL)
    return named or default_queue or None


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def _true(obj: dict[str, Any], ctype: str) -> bool:
    return (_condition(obj, ctype) or {}).get("status") == "True"


@dataclass(frozen=True)
class QueuePosition:
    """A pending Workload's place: how many wait ahead of it in its LocalQueue and in the
    ClusterQueue behind it (Kueue's positionInLocalQueue / positionInClusterQueue)."""

    local_queue: int
    cluster_queue: int

    def words(self, queue: str, cluster_queue: str | None) -> str:
        if self.cluster_queue == 0:
            return f"next in line for ClusterQueue {cluster_queue or '?'}"
        behind = f"{self.cluster_queue} ahead of it in ClusterQueue {cluster_queue or '?'}"
        return f"{self.local_queue} ahead of it in LocalQueue {queue!r}, {behind}"


def position_of(workload: str, pending: list[dict[str, Any]] | None) -> QueuePosition | None:
    """The Workload's position among a LocalQueue's pending Workloads (the visibility API's
    list), or None when it is not in the list (admitted meanwhile, or further back than the
    page read) or the list could not be read."""
    for item in pending or []:
        if (item.get("metadata") or {}).get("name") != workload:
            continue
        try:
            return QueuePosition(
                int(item.get("positionInLocalQueue", 0)), int(item.get("positionInClusterQueue", 0))
            )
        except (TypeError, ValueError):
            return None
    return None


@dataclass(frozen=True)
class Admission:
    """What the Admitted condition and status.queue say."""

    admitted: bool
    reason: AdmissionReason
    message: str
    queue: str
    workload: str | None = None
    cluster_queue: str | None = None
    pending_workloads: int | None = None
    #: What Kueue itself says (the Workload's condition message), for status.queue.message.
    kueue_message: str | None = None
    #: Where the Workload waits, as Kueue's visibility API counts (0: the next one).
    position: QueuePosition | None = None

    @property
    def warning(self) -> bool:
        return self.reason in ("Inadmissible", "QueueNotFound", "KueueNotInstalled")

    def status(self) -> dict[str, Any]:
        """status.queue."""
        out: dict[str, Any] = {"name": self.queue}
        for key, value in (
            ("clusterQueue", self.cluster_queue),
            ("workload", self.workload),
            ("pendingWorkloads", self.pending_workloads),
            ("message", self.kueue_message),
        ):
            if value is not None:
                out[key] = value
        if self.position is not None:
            out["positionInLocalQueue"] = self.position.local_queue
            out["positionInClusterQueue"] = self.position.cluster_queue
        return out


def newest_workload(workloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Workload of a Job (Kueue keeps one; after a change of the Job it may briefly
    have two: the newest is the current one)."""
    if not workloads:
        return None
    return max(workloads, key=lambda w: str((w.get("metadata") or {}).get("creationTimestamp")))


def _never_fits(message: str) -> bool:
    # Kueue's flavor assigner: the request is larger than all the quota the ClusterQueue
    # (and its cohort) could ever lend it; waiting does not help.
    return "> maximum capacity" in message


def admission_of(
    queue: str,
    job_name: str,
    namespace: str,
    workload: dict[str, Any] | None,
    *,
    workload_api: bool = True,
    local_queue: dict[str, Any] | None = None,
    local_queue_known: bool = False,
    pending: list[dict[str, Any]] | None = None,
) -> Admission:
    """Where the training Job `job_name` stands in Kueue.

    `workload_api` is False when the API server does not serve Kueue's Workloads (Kueue is
    not installed); `local_queue` is the LocalQueue when read (`local_queue_known`: it was
    read, so None means it does not exist); `pending` the LocalQueue's pending Workloads
    from Kueue's visibility API when it could be read."""
    label = f"spec.labels[{QUEUE_LABEL}]"
    if not workload_api:
        # As before queues were followed: the label is passed through and the Job runs.
        return Admission(
            True,
            "KueueNotInstalled",
            f"the training Job {job_name} names LocalQueue {queue!r} ({label} or the "
            "operator's default queue), but this cluster does not serve Kueue's Workload API "
            "(kueue.x-k8s.io): it was started without a queue. Install Kueue for queueing",
            queue,
        )
    if local_queue_known and local_queue is None:
        return Admission(
            False,
            "QueueNotFound",
            f"LocalQueue {queue!r} does not exist in namespace {namespace} (named by {label} "
            "or the operator's default queue): create it (docs/operator.md, Queues) or fix "
            "the label; the training Job waits suspended until then",
            queue,
            workload=((workload or {}).get("metadata") or {}).get("name"),
        )
    waiting = None
    if local_queue is not None:
        raw = (local_queue.get("status") or {}).get("pendingWorkloads")
        waiting = int(raw) if raw is not None else None
    if workload is None:
        return Admission(
            False,
            "Queued",
            f"waiting for Kueue to make the Workload of the training Job {job_name} "
            f"(LocalQueue {queue!r})",
            queue,
            pending_workloads=waiting,
        )
    name = str((workload.get("metadata") or {}).get("name"))
    cluster_queue = ((workload.get("status") or {}).get("admission") or {}).get("clusterQueue")
    position = position_of(name, pending)
    behind = ((local_queue or {}).get("spec") or {}).get("clusterQueue")
    if _true(workload, "Admitted"):
        return Admission(
            True,
            "Admitted",
            f"Workload {name} admitted by ClusterQueue {cluster_queue} (LocalQueue {queue!r})",
            queue,
            workload=name,
            cluster_queue=cluster_queue,
        )
    evicted = _condition(workload, "Evicted")
    reserved = _condition(workload, "QuotaReserved") or {}
    said = str(reserved.get("message") or "")
    if evicted and evicted.get("status") == "True":
        why = str(evicted.get("message") or evicted.get("reason") or "evicted")
        return Admission(
            False,
            "Preempted" if evicted.get("reason") == "Preempted" else "Queued",
            f"Workload {name} was evicted by Kueue ({evicted.get('reason')}: {why}); the "
            f"training Job's pods were stopped and it waits in LocalQueue {queue!r} to be "
            "admitted again (no failure is counted)",
            queue,
            workload=name,
            pending_workloads=waiting,
            kueue_message=why,
            position=position,
        )
    if _never_fits(said) or "is inactive" in said:
        return Admission(
            False,
            "Inadmissible",
            f"Workload {name} can never be admitted as it is: {said}. Ask for fewer GPUs "
            "(spec.resources) or have the ClusterQueue's quota raised",
            queue,
            workload=name,
            pending_workloads=waiting,
            kueue_message=said,
            position=position,
        )
    where = f"waiting in LocalQueue {queue!r}"
    if position is not None:
        where += f" ({position.words(queue, behind)})"
    elif waiting is not None:
        where += f" ({waiting} pending there)"
    if _true(workload, "QuotaReserved"):
        where = f"quota reserved in {cluster_queue}; waiting for its admission checks"
    return Admission(
        False,
        "Queued",
        f"Workload {name} {where}" + (f": {said}" if said else ""),
        queue,
        workload=name,
        pending_workloads=waiting,
        kueue_message=said or None,
        position=position,
    )
