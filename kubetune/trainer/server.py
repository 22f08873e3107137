"""Rank 0's HTTP endpoint: Prometheus metrics (GET /metrics) and the authenticated stop
request the operator sends (POST /stop with `Authorization: Bearer <token>`)."""

from __future__ import annotations

import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class TrainerMetrics:
    """The gauges rank 0 exports (`kubetune_*`, one job per target, no per-value labels)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"kubetune_{name}", doc, labels, registry=self.registry)

        self.train_loss = g("train_loss", "Training loss (mean over the last logging window).")
        self.eval_loss = g("eval_loss", "Loss on the validation set at the last evaluation.")
        self.loss_gap = g("loss_gap", "Eval loss minus train loss at the last evaluation.")
        self.eval_perplexity = g("eval_perplexity", "exp(eval loss).")
        self.best_eval_loss = g("best_eval_loss", "Lowest eval loss so far.")
        self.best_step = g("best_step", "Step of the lowest eval loss.")
        self.evals_since_best = g("evals_since_best", "Evaluations since the best one.")
        self.learning_rate = g("learning_rate", "Current learning rate.")
        self.grad_norm = g("grad_norm", "Gradient norm before clipping.")
        self.step = g("step", "Optimizer steps done.")
        self.total_steps = g("total_steps", "Optimizer steps planned.")
        self.epoch = g("epoch", "Epochs done (fractional).")
        self.progress = g("progress_ratio", "step / total_steps.")
        self.eta = g("eta_seconds", "Estimated seconds to the end of the run.")
        self.tokens_per_second = g("tokens_per_second", "Training tokens per second.")
        self.eval_token_accuracy = g(
            "eval_token_accuracy", "Next-token accuracy on the validation targets (0-1)."
        )
        self.gpu_memory_allocated = g(
            "gpu_memory_allocated_bytes", "GPU memory held by tensors on rank 0 (bytes)."
        )
        self.gpu_memory_peak = g(
            "gpu_memory_peak_bytes", "Peak GPU memory held by tensors on rank 0 (bytes)."
        )
        self.gpu_memory_reserved = g(
            "gpu_memory_reserved_bytes", "GPU memory reserved by the allocator on rank 0 (bytes)."
        )
        self.memorization_rate = g(
            "memorization_rate",
            "Share of probed examples whose continuation is reproduced verbatim "
            "(match=exact) or within the edit distance (match=near); split=train or heldout.",
            ("split", "match"),
        )
        self.general_perplexity = g(
            "general_perplexity", "Perplexity on the general-text set at the last evaluation."
        )
        self.general_perplexity_base = g(
            "general_perplexity_base", "The base model's perplexity on the general-text set."
        )
        self.general_perplexity_ratio = g(
            "general_perplexity_ratio",
            "general_perplexity / general_perplexity_base (above 1 means forgetting).",
        )
        self.data_perplexity_base = g(
            "data_perplexity_base", "Perplexity of the training targets under the base model."
        )
        self.data_high_perplexity_token_ratio = g(
            "data_high_perplexity_token_ratio",
            "Share of training target tokens above the high-perplexity threshold (0-1).",
        )
        self.probe_seconds = Counter(
            "kubetune_probe_seconds",
            "Seconds spent in each diagnostic probe.",
            ("probe",),
            registry=self.registry,
        )
        self.evaluations = Counter(
            "kubetune_evaluations", "Evaluations done.", registry=self.registry
        )
        self.auto_decisions = Counter(
            "kubetune_auto_decisions",
            "Decisions Auto made during the run (the method, remedies; GET /decisions).",
            registry=self.registry,
        )
        self.plan_info = g("plan_info", "The plan (always 1).", ("method", "zero_stage", "offload"))
        self.early_stop = g("early_stop", "1 for the reason the run stopped early.", ("reason",))
        #: The evaluation history (GET /evaluations): the operator runs the early-stop
        #: policy on it.
        self.history: list[dict[str, Any]] = []
        #: What Auto decided (GET /decisions): the operator adds each to status.plan and
        #: records an Event.
        self.decisions: list[dict[str, Any]] = []
        self._probe_seen: dict[str, float] = {}

    def add_decision(self, decision: dict[str, Any]) -> None:
        self.decisions.append(decision)
        self.auto_decisions.inc()

    def add_probe_seconds(self, totals: dict[str, float]) -> None:
        """Advance the probe counters to the given running totals."""
        for probe, total in totals.items():
            delta = total - self._probe_seen.get(probe, 0.0)
            if delta > 0:
                self.probe_seconds.labels(probe=probe).inc(delta)
            self._probe_seen[probe] = total

    def exposition(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


class ControlServer:
    """Serves /metrics and /stop on a port (0 picks a free one) in a daemon thread."""

    def __init__(
        self, metrics: TrainerMetrics, token: str | None, port: int, host: str = "0.0.0.0"
    ) -> None:
        self.metrics = metrics
        self.token = token
        self.stop_requested = threading.Event()
        self.stop_reason = "StopRequested"
        self.stop_message = ""
        #: When each scraper (by User-Agent) last read /metrics, and its last interval: at
        #: the end of the run, close() waits for each to read the final figures once.
        self.scrapes: dict[str, tuple[float, float]] = {}
        self.scraped = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # quiet
                return

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                    outer.note_scrape(self.headers.get("User-Agent") or "-")
                elif self.path.split("?")[0] == "/evaluations":
                    body = json.dumps(list(outer.metrics.history)).encode()
                    self._send(200, body, "application/json")
                elif self.path.split("?")[0] == "/decisions":
                    body = json.dumps(list(outer.metrics.decisions)).encode()
                    self._send(200, body, "application/json")
                elif self.path == "/healthz":
                    self._send(200, b"ok")
                else:
                    self._send(404, b"not found")

            def do_POST(self) -> None:
                if self.path != "/stop":
                    self._send(404, b"not found")
                    return
                header = self.headers.get("Authorization", "")
                scheme, _, given = header.partition(" ")
                if (
                    not outer.token
                    or scheme != "Bearer"
                    or not hmac.compare_digest(given.strip(), outer.token)
                ):
                    self._send(401, b"a valid bearer token is required")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                if not isinstance(body, dict):
                    body = {}
                outer.stop_reason = str(body.get("reason") or "StopRequested")
                outer.stop_message = str(body.get("message") or "")[:1000]
                outer.stop_requested.set()
                self._send(202, b"stopping after the current step")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def note_scrape(self, agent: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.scraped:
            last, _ = self.scrapes.get(agent, (now, 0.0))
            self.scrapes[agent] = (now, now - last)
            self.scraped.notify_all()

    def final_wait(self, limit: float, now: float | None = None) -> float:
        """How long to keep serving so that every scraper seen at a steady interval (two
        scrapes or more) reads the final figures once: up to one interval and a second
        past its last read, at most `limit` seconds."""
        now = time.monotonic() if now is None else now
        waits = [
            last + interval + 1.0 - now
            for last, interval in self.scrapes.values()
            if interval > 0 and now - last < 2 * interval + 1.0
        ]
        return max(0.0, min(limit, max(waits, default=0.0)))

    def close(self, final_scrape_limit: float = 30.0) -> None:
        """Stop serving, after every regular scraper has read the final figures once (at
        most `final_scrape_limit` seconds: an early stop's gauge set just before the end
        would otherwise be seen by no one)."""
        started = time.monotonic()
        deadline = started + self.final_wait(final_scrape_limit, started)
        with self.scraped:
            while time.monotonic() < deadline:
                pending = [
                    a
                    for a, (last, interval) in self.scrapes.items()
                    if interval > 0 and last < started and started - last < 2 * interval + 1.0
                ]
                if not pending:
                    break
                self.scraped.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.httpd.shutdown()
        self.httpd.server_close()
