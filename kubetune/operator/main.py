"""Kopf handlers: registration only. Each handler hands the object to the Reconciler.

Run with `kopf run -m kubetune.operator.main` (the image does) or
`python -m kubetune.operator` (same thing).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, cast, get_args

import kopf

from kubetune.api.status import JobState
from kubetune.contract import GROUP, JOB_LABEL, PLURAL, VERSION
from kubetune.operator import metrics
from kubetune.operator.coalesce import Coalescer
from kubetune.operator.k8s import Kube
from kubetune.operator.reconcile import Reconciler
from kubetune.operator.settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
_state: dict[str, Any] = {}
_logged_in = threading.Event()


def _reconciler() -> Reconciler:
    rec = _state.get("reconciler")
    if rec is None:
        rec = Reconciler(_kube(), SETTINGS, events=_post_event)
        _state["reconciler"] = rec
    return cast(Reconciler, rec)


def _kube() -> Kube:
    """The one API client: the reconciler's, the resync's, the Events' and the Lease's."""
    kube = _state.get("kube")
    if kube is None:
        kube = _state["kube"] = Kube()
    return cast(Kube, kube)


def _post_event(body: dict[str, Any], etype: str, reason: str, message: str) -> None:
    _kube().post_event(body, etype, reason, message[:1000])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own annotation prefix for Kopf's bookkeeping (progress and last-handled state).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Finalizer name, used only if a handler ever needs one (none does: owner references
    # clean up children, so a FineTuneJob is never blocked on the operator to be deleted).
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Events for our reasons only, not Kopf's per-handler chatter.
    settings.posting.level = logging.WARNING
    # Reconnect watches regularly so a silently dropped connection cannot stall us.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Enough worker threads for sync handlers when many jobs change at once.
    settings.execution.max_workers = 20
    # Back off a failing handler instead of hammering the API server.
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    # Expose the operator's metrics.
    if SETTINGS.metrics_port >= 0:
        _state["metrics_port"] = metrics.serve(SETTINGS.metrics_port)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account (Kopf's default). Elsewhere: $KUBECONFIG, read now
    rather than when the client library was imported. Also configures the client library
    our reconciler uses."""
    import kubernetes

    path = os.environ.get("KUBECONFIG")
    if os.environ.get("KUBERNETES_SERVICE_HOST") or not path:
        info = kopf.login_via_client(**kwargs)
        _logged_in.set()
        return info
    kubernetes.config.load_kube_config(config_file=path)
    _logged_in.set()  # the client library is configured: the leader elector may start
    cfg = kubernetes.client.Configuration.get_default_copy()
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        default_namespace=None,
    )


def _leading() -> bool:
    """True when this replica may reconcile: it holds the Lease (or election is off)."""
    if not SETTINGS.leader_election:
        return True
    elector = _state.get("elector")
    return elector is not None and bool(elector.is_leader())


def _run(namespace: str | None, name: str, body: dict[str, Any] | None = None) -> None:
    if namespace is None:  # FineTuneJobs are namespaced; never happens
        return
    if not _leading():
        # A standby replica: the leader handles it; the resync round on election catches
        # up on whatever happened meanwhile.
        return
    given = [body]

    def once() -> str:
        first, given[0] = given[0], None  # a rerun reads the job again
        return _reconcile_once(namespace, name, first)

    _COALESCER.run((namespace, name), once)


#: One reconcile at a time per job; triggers meanwhile fold into one more run.
_COALESCER = Coalescer()
#: When each job was last reconciled (time.monotonic()), for the resync round to skip it.
_reconciled_at: dict[tuple[str, str], float] = {}


def _reconcile_once(namespace: str, name: str, body: dict[str, Any] | None = None) -> str:
    start = time.perf_counter()
    try:
        result = _reconciler().reconcile(namespace, name, body)
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - start)
    metrics.RECONCILES.labels(result=result).inc()
    if result == "gone":
        _reconciled_at.pop((namespace, name), None)
    else:
        _reconciled_at[(namespace, name)] = time.monotonic()
    counts: dict[str, int] = {}
    for state in list(_reconciler().states.values()):  # 5,000 jobs: well under 1 ms
        counts[state] = counts.get(state, 0) + 1
    for state in get_args(JobState):
        metrics.JOBS.labels(state=state).set(counts.get(state, 0))
    return result


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(
    namespace: str | None, name: str, body: Mapping[str, Any] | None = None, **_: Any
) -> None:
    """A new FineTuneJob, or one that existed before the operator started. A new one (no
    status yet) is reconciled from the event's body: no read."""
    fresh = body is not None and not body.get("status")
    _run(namespace, name, json.loads(json.dumps(dict(body))) if fresh and body else None)


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_update(namespace: str | None, name: str, **_: Any) -> None:
    """suspend, stopRequested and other mutable fields."""
    _run(namespace, name)


def _resync_once() -> None:
    """Reconcile every unfinished job (and finished ones with a TTL): the safety net for
    missed events and the TTL clock. One list call per round, not one timer per job, so no
    Kopf finalizer is needed and deleting a job never waits on the operator."""
    kube = _kube()
    jobs = (
        [ftj for ns in SETTINGS.watch_namespaces for ftj in kube.list_ftjs(ns)]
        if SETTINGS.watch_namespaces
        else kube.list_ftjs()
    )
    now = time.monotonic()
    for ftj in jobs:
        meta = ftj["metadata"]
        if now - _reconciled_at.get((meta["namespace"], meta["name"]), -1e9) < (
            SETTINGS.sync_interval_seconds / 2
        ):
            # Reconciled on an event moments ago: this round would repeat it. Every job is
            # still reconciled at least once every 1.5 intervals.
            continue
        status = ftj.get("status") or {}
        finished = any(
            c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if finished and (ftj.get("spec") or {}).get("ttlSecondsAfterFinished") is None:
            continue
        try:
            _run(meta["namespace"], meta["name"])
        except Exception:  # one bad job must not stop the round
            logging.getLogger("kubetune.operator").exception(
                "resync of %s/%s failed", meta["namespace"], meta["name"]
            )


def _resync_loop(stop: threading.Event, wake: threading.Event) -> None:
    while not stop.is_set():
        wake.wait(SETTINGS.sync_interval_seconds)
        wake.clear()
        if stop.is_set() or not _leading():
            continue
        try:
            _resync_once()
        except Exception:
            logging.getLogger("kubetune.operator").exception("resync round failed")


def _elect(stop: threading.Event, wake: threading.Event) -> None:
    """Start leader election once Kopf has logged in (it runs startup handlers first, and
    the client library is configured at login). Until we hold the Lease, handlers skip."""
    from kubetune.operator.leader import LeaderElector

    while not stop.is_set() and not _logged_in.wait(1):
        pass
    if stop.is_set():
        return
    elector = LeaderElector(
        _kube(),
        SETTINGS.lease_namespace,
        duration_seconds=int(SETTINGS.lease_duration_seconds),
        on_elected=wake.set,  # a new leader catches up at once
    )
    _state["elector"] = elector
    elector.start()


def _start_node_cache(stop: threading.Event) -> None:
    """The node cache (planning's GPU memory labels) once the client library is set up."""
    while not stop.is_set() and not _logged_in.wait(1):
        pass
    if not stop.is_set():
        _kube().start_node_cache()


@kopf.on.startup()
def start_resync(**_: Any) -> None:
    stop, wake = threading.Event(), threading.Event()
    _state["resync_stop"], _state["resync_wake"] = stop, wake
    threading.Thread(target=_start_node_cache, args=(stop,), daemon=True, name="nodes").start()
    if SETTINGS.leader_election:
        threading.Thread(target=_elect, args=(stop, wake), daemon=True, name="elect").start()
    threading.Thread(target=_resync_loop, args=(stop, wake), daemon=True, name="resync").start()


@kopf.on.cleanup()
def stop_resync(**_: Any) -> None:
    stop = _state.pop("resync_stop", None)
    if stop is not None:
        stop.set()
        _state.pop("resync_wake").set()
    cache = _kube().node_cache
    if cache is not None:
        cache.stop()
    elector = _state.pop("elector", None)
    if elector is not None:
        elector.stop(release=True)  # a replacement leads at once, not after the Lease expires


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
def on_child_job(
    event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> None:
    """Any change of a training or prepare Job: reconcile its FineTuneJob."""
    if event.get("type") is None and not event.get("object"):
        return
    _run(namespace, labels[JOB_LABEL])


@kopf.on.probe(id="reconciles")
def probe_reconciles(**_: Any) -> float:
    """Liveness detail: the number of reconciles so far."""
    total = 0.0
    for metric in metrics.RECONCILES.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total
