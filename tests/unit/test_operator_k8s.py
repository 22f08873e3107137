"""The API request counter counts each request once, also while reconciles run
concurrently in Kopf's thread pool (a before/after difference around one reconcile would
count the other threads' requests too)."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.unit


def test_requests_are_counted_once_under_concurrency() -> None:
    from kubernetes import client

    from kubetune.operator import metrics
    from kubetune.operator.k8s import Kube

    kube = Kube(client.ApiClient(client.Configuration()))
    before = metrics.API_REQUESTS._value.get()

    def work() -> None:
        for _ in range(500):
            kube._count()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kube.requests == 2000
    assert metrics.API_REQUESTS._value.get() - before == 2000


def test_the_refusal_read_from_events_is_the_current_one_and_api_errors_are_no_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`Kube.pod_creation_failure` on the client's own model classes: the newest FailedCreate
    by its last time (a series' last observation counts), none once a pod came after it;
    an API error is logged once per namespace and status, and read as no refusal."""
    import datetime as dt
    import logging
    from types import SimpleNamespace
    from typing import Any

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubetune.operator.k8s import Kube

    t0 = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)

    def at(seconds: int) -> dt.datetime:
        return t0 + dt.timedelta(seconds=seconds)

    def event(message: str, last: int | None, series: int | None = None) -> Any:
        return client.CoreV1Event(
            involved_object=client.V1ObjectReference(),
            metadata=client.V1ObjectMeta(creation_timestamp=at(0)),
            message=message,
            last_timestamp=at(last) if last is not None else None,
            event_time=at(0) if last is None else None,
            series=client.CoreV1EventSeries(count=3, last_observed_time=at(series))
            if series is not None
            else None,
        )

    class Core:
        def __init__(self) -> None:
            self.events: list[Any] = []
            self.pods: list[Any] = []
            self.error: ApiException | None = None
            self.selectors: list[str] = []

        def list_namespaced_event(self, namespace: str, field_selector: str) -> Any:
            self.selectors.append(field_selector)
            if self.error:
                raise self.error
            return SimpleNamespace(items=self.events)

        def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
            assert label_selector == "batch.kubernetes.io/controller-uid=u1"
            return SimpleNamespace(items=self.pods)

    kube = Kube(client.ApiClient(client.Configuration()))
    core = Core()
    kube.core = core
    job = {"metadata": {"name": "j-train", "uid": "u1"}, "status": {"startTime": None}}
    assert kube.pod_creation_failure("ns", job) is None
    assert core.selectors == ["involvedObject.uid=u1,reason=FailedCreate"]
    core.events = [event("old", 5), event("newer", 9), event("series", None, series=20)]
    assert kube.pod_creation_failure("ns", job) == "series"
    core.pods = [SimpleNamespace(metadata=client.V1ObjectMeta(creation_timestamp=at(30)))]
    assert kube.pod_creation_failure("ns", job) is None  # a pod was created after them all
    caplog.set_level(logging.WARNING, "kubetune.operator.k8s")
    core.error = ApiException(status=403, reason="Forbidden")
    assert kube.pod_creation_failure("ns", job) is None
    assert kube.pod_creation_failure("ns", job) is None
    core.error = ApiException(status=500, reason="Internal Server Error")
    assert kube.pod_creation_failure("ns", job) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "(403 Forbidden)" in warnings[0]
    assert "grant list on events" in warnings[0]
    assert "(500 Internal Server Error)" in warnings[1]
