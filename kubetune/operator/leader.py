"""Leader election over a coordination.k8s.io/v1 Lease, so that two operator replicas
started by mistake never both reconcile: only the holder of the Lease acts; the other
waits, and takes over when the holder has not renewed for `leaseDurationSeconds`.

Like client-go's leader election, expiry is judged on this process's own monotonic clock
(how long the Lease record has stayed unchanged since we first saw it), never by comparing
another machine's `renewTime` with ours, so clock skew between nodes cannot let two
replicas lead at once. The decision is pure (`decide`); `k8s.Kube` does the API calls.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger("kubetune.operator.leader")

Action = Literal["create", "renew", "take", "wait"]


@dataclass(frozen=True)
class LeaseRecord:
    """What identifies one renewal of a Lease: a new renewal changes it."""

    holder: str
    renew_time: str
    transitions: int
    duration_seconds: int
    resource_version: str


def record_of(lease: dict[str, Any] | None) -> LeaseRecord | None:
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        renew_time=str(spec.get("renewTime") or ""),
        transitions=int(spec.get("leaseTransitions") or 0),
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
    )


def decide(record: LeaseRecord | None, me: str, unchanged_for: float) -> Action:
    """What to do with the Lease as read now. `unchanged_for`: seconds (our clock) since we
    first saw this exact record."""
    if record is None:
        return "create"
    if record.holder == me:
        return "renew"
    if not record.holder or unchanged_for >= record.duration_seconds:
        return "take"  # released, or its holder stopped renewing
    return "wait"


def lease_body(
    name: str, namespace: str, me: str, duration: int, transitions: int, rv: str | None
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if rv:
        meta["resourceVersion"] = rv  # optimistic concurrency: a racing replica gets 409
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": me,
            "leaseDurationSeconds": duration,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        },
    }


def default_identity() -> str:
    """The pod's name in a cluster; elsewhere host, pid and a random suffix (two local
    processes on one host must differ)."""
    pod = os.environ.get("POD_NAME")
    if pod:
        return pod
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaseApi(Protocol):
    """The calls the elector needs (implemented by k8s.Kube)."""

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def write_lease(self, body: dict[str, Any], create: bool) -> bool:
        """Create or replace; False when another writer got there first (409)."""
        ...


class LeaderElector:
    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str = "kubetune-operator",
        identity: str | None = None,
        duration_seconds: int = 15,
        on_elected: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.duration = max(2, int(duration_seconds))
        self.on_elected = on_elected or (lambda: None)
        self.clock = clock
        self._valid_until = 0.0  # monotonic
        self._seen: tuple[LeaseRecord | None, float] = (None, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        return self.clock() < self._valid_until

    def try_once(self) -> bool:
        """Acquire or renew if we may; True while we lead."""
        started = self.clock()
        was = self.is_leader()
        try:
            record = record_of(self.api.get_lease(self.namespace, self.name))
        except Exception as exc:  # API server down: we keep leading only until expiry
            log.warning("cannot read Lease %s/%s: %s", self.namespace, self.name, exc)
            return self.is_leader()
        if record != self._seen[0]:
            self._seen = (record, started)
        action = decide(record, self.identity, started - self._seen[1])
        if action == "wait":
            self._valid_until = 0.0
            return False
        transitions = 0 if record is None else record.transitions
        if action == "take":
            transitions += 1
        body = lease_body(
            self.name,
            self.namespace,
            self.identity,
            self.duration,
            transitions,
            None if record is None else record.resource_version,
        )
        try:
            written = self.api.write_lease(body, create=record is None)
        except Exception as exc:
            log.warning("cannot write Lease %s/%s: %s", self.namespace, self.name, exc)
            return self.is_leader()
        if not written:
            self._valid_until = 0.0
            return False
        # Lead for a little less than the Lease lasts, counted from before we read it.
        self._valid_until = started + self.duration * 0.8
        if not was:
            log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
            self.on_elected()
        return True

    def start(self) -> None:
        self.try_once()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="leader")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.5, self.duration / 5)):
            self.try_once()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with `release`, hand the Lease over at once (a clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release and self.is_leader():
            self._valid_until = 0.0
            try:
                record = record_of(self.api.get_lease(self.namespace, self.name))
                if record is not None and record.holder == self.identity:
                    body = lease_body(
                        self.name,
                        self.namespace,
                        "",
                        self.duration,
                        record.transitions,
                        record.resource_version,
                    )
                    self.api.write_lease(body, create=False)
            except Exception as exc:
                log.warning("cannot release Lease %s/%s: %s", self.namespace, self.name, exc)
