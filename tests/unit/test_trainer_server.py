"""Rank 0's endpoint: /stop needs `Authorization: Bearer <the job's token>` exactly;
/evaluations serves the evaluation history; the probe counters advance to running totals."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kubetune.trainer.server import ControlServer, TrainerMetrics
from tests.plans import plan_document

pytestmark = pytest.mark.unit


@pytest.fixture
def server() -> Iterator[ControlServer]:
    srv = ControlServer(TrainerMetrics(), "s3cret-token", 0, host="127.0.0.1").start()
    yield srv
    srv.close()


def _stop(srv: ControlServer, headers: dict[str, str], body: bytes = b"{}") -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.port}/stop", method="POST", data=body, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "s3cret-token"},  # no scheme
        {"Authorization": "Basic s3cret-token"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer s3cret-tok"},
        {"Authorization": "Bearer s3cret-token-and-more"},
    ],
)
def test_stop_refuses_anything_but_the_bearer_token(
    server: ControlServer, headers: dict[str, str]
) -> None:
    assert _stop(server, headers) == 401
    assert not server.stop_requested.is_set()


def test_stop_with_the_token_carries_reason_and_message(server: ControlServer) -> None:
    body = json.dumps({"reason": "Overfitting", "message": "gap widened"}).encode()
    assert _stop(server, {"Authorization": "Bearer s3cret-token"}, body) == 202
    assert server.stop_requested.is_set()
    assert (server.stop_reason, server.stop_message) == ("Overfitting", "gap widened")


def test_evaluations_and_probe_counters(server: ControlServer) -> None:
    server.metrics.history.append({"step": 5, "evalLoss": 1.5, "trainLoss": 1.2})
    url = f"http://127.0.0.1:{server.port}/evaluations"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert json.loads(resp.read()) == [{"step": 5, "evalLoss": 1.5, "trainLoss": 1.2}]
    server.metrics.add_probe_seconds({"memorization": 2.0})
    server.metrics.add_probe_seconds({"memorization": 3.5, "general_perplexity": 1.0})
    text = server.metrics.exposition().decode()
    assert 'kubetune_probe_seconds_total{probe="memorization"} 3.5' in text
    assert 'kubetune_probe_seconds_total{probe="general_perplexity"} 1.0' in text


def test_the_operator_reads_new_decisions_once_per_count_and_again_from_a_new_pod() -> None:
    """GET /decisions is read when rank 0's decision counter differs from the count last
    read from that pod: once per change, and again from a restarted pod (a new address)
    whose counter starts from 0; the sentences go into status.plan once, with an Event."""
    import dataclasses

    from kubetune.operator import builders as b
    from kubetune.operator.reconcile import Reconciler, StatusDraft
    from kubetune.operator.settings import OperatorSettings
    from kubetune.operator.status import scalar_samples

    metrics = TrainerMetrics()
    server = ControlServer(metrics, "tok", 0, host="127.0.0.1").start()
    try:
        settings = dataclasses.replace(OperatorSettings(), trainer_metrics_port=server.port)
        rec = Reconciler(None, settings)  # type: ignore[arg-type]  # no API calls here
        ref = b.JobRef(name="j", namespace="ns", uid="u")
        planned = plan_document(decisions=[{"key": "method", "sentence": "planned"}])
        draft = StatusDraft(ref, {"plan": planned.to_json()})

        def scrape() -> dict[str, float]:
            return scalar_samples(metrics.exposition().decode())

        rec._read_decisions("127.0.0.1", draft, scrape())  # nothing decided yet
        assert draft.events == []
        metrics.add_decision({"kind": "remedy", "step": 0, "text": "Auto at training start: x."})
        rec._read_decisions("127.0.0.1", draft, scrape())
        rec._read_decisions("127.0.0.1", draft, scrape())  # same count: not read again
        assert draft.new["plan"]["reasons"] == ["planned", "Auto at training start: x."]
        assert draft.events == [("Normal", "AutoDecision", "Auto at training start: x.")]
        # A restarted pod: its first decision is new text at count 1 again.
        metrics.decisions[:] = [{"kind": "remedy", "step": 30, "text": "Auto at step 30: y."}]
        rec._read_decisions("localhost", draft, {"kubetune_auto_decisions_total": 1.0})
        assert draft.new["plan"]["reasons"][-1] == "Auto at step 30: y."
        assert len(draft.events) == 2
    finally:
        server.close()


def test_the_end_of_a_run_waits_for_each_regular_scraper_to_read_the_final_figures() -> None:
    """An early stop's gauge is set just before the trainer exits: close() keeps serving
    until every scraper seen at a steady interval has read /metrics once more (bounded)."""
    import threading
    import time

    server = ControlServer(TrainerMetrics(), "tok", 0, host="127.0.0.1")
    server.note_scrape("once", now=100.0)  # a single read: no interval, not waited for
    assert server.final_wait(30.0, now=100.5) == 0.0
    server.note_scrape("prom", now=100.0)
    server.note_scrape("prom", now=102.0)  # every 2 s
    assert server.final_wait(30.0, now=102.5) == pytest.approx(2.5)
    assert server.final_wait(1.0, now=102.5) == 1.0  # the limit
    assert server.final_wait(30.0, now=110.0) == 0.0  # it stopped scraping
    server = ControlServer(TrainerMetrics(), "tok", 0, host="127.0.0.1").start()
    url = f"http://127.0.0.1:{server.port}/metrics"

    def scrape() -> None:
        req = urllib.request.Request(url, headers={"User-Agent": "prom"})
        urllib.request.urlopen(req, timeout=5).read()

    scrape()
    time.sleep(0.3)
    scrape()
    threading.Timer(0.6, scrape).start()
    started = time.monotonic()
    server.close()
    waited = time.monotonic() - started
    assert 0.4 < waited < 1.3  # until the next scrape, not the whole interval-plus-a-second
