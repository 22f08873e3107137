"""How a training Job's pods ended, and what the operator does about it: pure functions of
the pods (as the API returns them). A multi-node run is one gang: when one pod fails, the
Job controller stops the others (the Job's backoffLimit is 0) and the operator restarts all
of them together from the newest checkpoint, counting crashes against spec.backoffLimit and
not counting interruptions (SIGTERM with a checkpoint saved, preemption, drain, deletion)
unless they come again and again with no training step in between.
A pod killed for exceeding its memory limit fails the job at once, saying what to change:
the same settings would be killed again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune.contract import EXIT_INTERRUPTED, TRAINER_CONTAINER

Kind = Literal["interrupted", "oom", "crash"]

#: Interruptions in a row with no training step between them that are restarted; the next
#: one fails the job. A pod evicted again and again (a node under disk pressure, say) would
#: otherwise restart forever. Preemptions of a run that trains in between never add up.
MAX_STALLED_INTERRUPTIONS = 5


@dataclass(frozen=True)
class PodEnd:
    """One failed pod of the training Job."""

    pod: str
    index: str | None
    exit_code: int | None
    #: The container's terminated reason (`OOMKilled`, `Error`, ...).
    reason: str | None
    #: The pod has a DisruptionTarget condition (preempted, evicted, drained, node lost).
    disrupted: bool
    message: str
    #: When the container ended (RFC 3339, as the API gives it; these sort by time).
    finished_at: str | None = None
    #: The pod's own status.reason (`UnexpectedAdmissionError`, `OutOfcpu`, `Evicted`...).
    pod_reason: str | None = None


@dataclass(frozen=True)
class GangFailure:
    kind: Kind
    pod: str
    message: str


def pod_ends(pods: list[dict[str, Any]]) -> list[PodEnd]:
    """The failed pods among a Job's pods (camelCase dicts), oldest name first."""
    ends = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Failed":
            continue
        meta = pod.get("metadata") or {}
        term: dict[str, Any] = {}
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") == TRAINER_CONTAINER:
                term = (cs.get("state") or {}).get("terminated") or {}
        disrupted = any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        code = term.get("exitCode")
        ends.append(
            PodEnd(
                pod=str(meta.get("name") or ""),
                index=(meta.get("annotations") or {}).get(
                    "batch.kubernetes.io/job-completion-index"
                ),
                exit_code=int(code) if code is not None else None,
                reason=term.get("reason"),
                disrupted=disrupted,
                message=str(term.get("message") or status.get("message") or "").strip(),
                finished_at=term.get("finishedAt"),
                pod_reason=status.get("reason"),
            )
        )
    return sorted(ends, key=lambda e: e.pod)


def _interrupted(end: PodEnd) -> bool:
    """Stopped from outside, not by its own fault: SIGTERM after a checkpoint (or before
    training started), a disruption, or a pod deleted before it ran its container. A pod
    the kubelet refused (a reason such as `UnexpectedAdmissionError` and no container exit)
    is a crash: the same node may refuse it again, and crashes are bounded."""
    if end.exit_code == EXIT_INTERRUPTED or end.disrupted:
        return True
    return end.exit_code is None and not end.pod_reason


def gang_failure(ends: list[PodEnd]) -> GangFailure | None:
    """What ended the gang: an OOM kill wins, then a crash (the pod that was not interrupted
    and ended first: a rank that dies takes its peers' collectives down with it, and they
    fail a moment later), else an interruption."""
    if not ends:
        return None
    for end in ends:
        if end.reason == "OOMKilled":
            return GangFailure("oom", end.pod, end.message)
    by_time = sorted(ends, key=lambda e: (e.finished_at is None, e.finished_at or "", e.pod))
    for end in by_time:
        if not _interrupted(end):
            if end.exit_code is None:
                detail = f"no container exit: {end.pod_reason}"
            else:
                detail = f"exit code {end.exit_code}" + (f" ({end.reason})" if end.reason else "")
            tail = f": {end.message[-600:]}" if end.message else ""
            return GangFailure("crash", end.pod, f"{end.pod} failed with {detail}{tail}")
    end = ends[0]
    why = (
        "was disrupted (preempted, evicted or its node drained)"
        if end.disrupted
        else ("stopped on SIGTERM" if end.exit_code == EXIT_INTERRUPTED else "ended before it ran")
    )
    return GangFailure("interrupted", end.pod, f"{end.pod} {why}")


def deleted_gang() -> GangFailure:
    """A multi-node Job failed and none of its pods is left Failed: every pod was deleted
    (a pod deleted by a user, evicted or drained, and the others stopped by the Job
    controller after it). A pod that crashes by itself stays, Failed, until its Job goes."""
    return GangFailure(
        "interrupted",
        "",
        "the training pods were deleted (by a user, an eviction or a drain, and then by the "
        "Job controller) before any failed by itself",
    )


def memory_limit(job: dict[str, Any] | None) -> str | None:
    """The trainer container's memory limit in a training Job, if it has one."""
    spec = ((job or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    for container in spec.get("containers") or []:
        if container.get("name") == TRAINER_CONTAINER:
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit is not None else None
    return None


def oom_message(pod: str, memory_limit: str | None, host_gib_per_node: float) -> str:
    """What an OOM-killed training pod's condition says: the facts and what to change."""
    limit = f" (memory limit {memory_limit})" if memory_limit else ""
    return (
        f"{pod} was killed by the kernel for exceeding its memory limit{limit}: OOMKilled. "
        f"The plan estimates {host_gib_per_node:.1f} GiB of host memory per node. Lower "
        "spec.hyperparameters.microBatchSize, choose a higher spec.deepspeed.zeroStage, move "
        "less to the CPU (spec.deepspeed.offload), or raise the memory in "
        "spec.resources.resourcesPerNode; the same settings would be killed again, so the "
        "job is not retried"
    )


@dataclass(frozen=True)
class RestartDecision:
    """restart: delete the Job (its pods with it) so that the next reconcile creates it
    again; otherwise fail with (reason, message)."""

    restart: bool
    counted: bool
    reason: str
    message: str


def decide_restart(
    failure: GangFailure, restarts: int, backoff_limit: int, stalled: int = 0
) -> RestartDecision:
    """Restart an interruption unless `stalled` (this one and those before it in a row with
    no training step in between) is past :data:`MAX_STALLED_INTERRUPTIONS`, a crash while
    `restarts` (crashes restarted so far) is below spec.backoffLimit; an OOM kill never."""
    if failure.kind == "oom":
        return RestartDecision(False, False, "OOMKilled", failure.message)
    if failure.kind == "interrupted":
        if stalled > MAX_STALLED_INTERRUPTIONS:
            return RestartDecision(
                False,
                False,
                "InterruptedWithoutProgress",
                f"{failure.message}; the gang was interrupted {stalled} times in a row "
                "without a training step in between: look for what stops its pods "
                "(kubectl get events: evictions, admission, preemption)",
            )
        return RestartDecision(True, False, "Interrupted", failure.message)
    if restarts < backoff_limit:
        return RestartDecision(True, True, "PodFailed", failure.message)
    return RestartDecision(
        False,
        False,
        "BackoffLimitExceeded",
        f"{failure.message}; the gang was restarted {restarts} time(s), "
        f"spec.backoffLimit is {backoff_limit}",
    )
