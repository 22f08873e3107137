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
