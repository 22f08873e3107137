"""Rank 0's HTTP endpoint: Prometheus metrics (GET /metrics) and the authenticated stop
request the operator sends (POST /stop with `Authorization: Bearer <token>`)."""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
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
        self.plan_info = g("plan_info", "The plan (always 1).", ("method", "zero_stage", "offload"))
        self.early_stop = g("early_stop", "1 for the reason the run stopped early.", ("reason",))

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
                elif self.path == "/healthz":
                    self._send(200, b"ok")
                else:
                    self._send(404, b"not found")

            def do_POST(self) -> None:
                if self.path != "/stop":
                    self._send(404, b"not found")
                    return
                given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not outer.token or not hmac.compare_digest(given, outer.token):
                    self._send(401, b"a valid bearer token is required")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                outer.stop_reason = str(body.get("reason") or "StopRequested")
                outer.stop_requested.set()
                self._send(202, b"stopping after the current step")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
