"""What every phase of a reconcile shares: the API, the settings, the Event sink, what the
operator remembers between reconciles, and the check for pods the API server refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.operator import status as st
from kubetune.operator.builders import JobRef
from kubetune.operator.kubeapi import KubeApi
from kubetune.operator.settings import OperatorSettings

EventSink = Callable[[dict[str, Any], str, str, str], None]  # body, type, reason, message


class ReconcilerBase:
    def __init__(
        self, kube: KubeApi, settings: OperatorSettings, events: EventSink | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.emit: EventSink = events or (lambda *_: None)
        # Last known state of every job this operator reconciled (for the jobs gauge).
        self.states: dict[tuple[str, str], str] = {}
        #: The jobs whose status this process has written (an event's body of them may be
        #: older than that write, so it is read instead).
        self.written: set[tuple[str, str]] = set()
        # Per job: failed live scrapes in a row, and when the next may be tried.
        self.scrape_backoff: dict[tuple[str, str], tuple[int, float]] = {}
        #: The Auto-decision count last read from each job's rank-0 pod (by its address).
        self.decisions_seen: dict[tuple[str, str, str], int] = {}

    def _pods_blocked(
        self,
        ref: JobRef,
        job: dict[str, Any],
        view: st.ChildJobView,
        pods: int,
        stop_requested: bool = False,
    ) -> tuple[str, str] | None:
        """(reason, message) when an unfinished child Job has fewer pods than it needs
        (running or done) and the Job controller reports that the API server refuses them."""
        if view.suspended or view.complete or view.failed_reason:
            return None
        if view.active + view.succeeded >= pods:
            return None
        failure = self.kube.pod_creation_failure(ref.namespace, job)
        if not failure:
            return None
        name = str((job.get("metadata") or {}).get("name"))
        return st.pod_creation_blocked(name, failure, stop_requested)
