"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kubetune_operator_reconciles",
    "FineTuneJob reconciles by result.",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "kubetune_operator_reconcile_errors",
    "Reconciles that raised an error (retried).",
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time one reconcile takes.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    registry=REGISTRY,
)
JOBS = Gauge(
    "kubetune_operator_jobs",
    "FineTuneJobs seen by this operator, by state.",
    ["state"],
    registry=REGISTRY,
)
EARLY_STOPS = Counter(
    "kubetune_operator_early_stops",
    "FineTuneJobs that ended with the condition EarlyStopped, by reason.",
    ["reason"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "kubetune_operator_api_requests",
    "Kubernetes API requests the operator made (reconciles, resync rounds, leader election).",
    registry=REGISTRY,
)


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound: int = server.server_address[1]
    return bound
