"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kubetune import __version__

#: The trainer image when neither the chart nor spec.image names one: the operator's own
#: version, never a moving tag (the chart sets its appVersion instead).
DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} must be a number") from exc


def _command(name: str) -> tuple[str, ...] | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a JSON list of strings") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ValueError(f"environment variable {name} must be a JSON list of strings")
    return tuple(value)


@dataclass(frozen=True)
class OperatorSettings:
    # Image for prepare and training pods when spec.image is empty.
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # Seconds between status refreshes of a running job (metrics scrape, safety net).
    sync_interval_seconds: float = 15.0
    # Port the trainer's rank 0 serves metrics and the stop endpoint on.
    trainer_metrics_port: int = 9400
    # Port torchrun's rendezvous uses on pod 0.
    rendezvous_port: int = 29500
    # GPU memory assumed when neither the spec nor any node label says (GiB).
    default_gpu_memory_gib: float = 80.0
    # Size limit of the /dev/shm memory volume per GPU (GiB).
    shm_gib_per_gpu: float = 8.0
    # Port of the operator's own Prometheus metrics.
    metrics_port: int = 8080
    # Where a job's output goes when spec.output is empty ({namespace}/{name} substituted).
    default_output_uri: str = "file:///tmp/kubetune-output/{namespace}/{name}"
    # Replaces the training command (`torchrun ... -m kubetune.trainer`) when set: a JSON
    # list. For custom trainer images, and for tests that run a stand-in trainer.
    trainer_command: tuple[str, ...] | None = None
    # Namespaces whose FineTuneJobs the resync round lists (empty: all namespaces). Kopf's
    # own watches follow its --namespace flags; the Helm chart sets both from one value.
    watch_namespaces: tuple[str, ...] = ()
    # Leader election over a Lease: only one replica reconciles (false: no Lease).
    leader_election: bool = True
    # Namespace of the Lease (default: the operator pod's namespace, else "default").
    lease_namespace: str = "default"
    # Seconds a replica keeps leading without renewing; a standby takes over after that.
    lease_duration_seconds: float = 15.0
    # The Kueue LocalQueue of a FineTuneJob whose spec.labels name none (None: such jobs
    # are not queued and start at once).
    default_queue: str | None = None

    @classmethod
    def from_env(cls) -> OperatorSettings:
        d = cls()
        return cls(
            trainer_image=os.environ.get("KUBETUNE_TRAINER_IMAGE", d.trainer_image),
            sync_interval_seconds=_float("KUBETUNE_SYNC_INTERVAL_SECONDS", d.sync_interval_seconds),
            trainer_metrics_port=int(
                _float("KUBETUNE_TRAINER_METRICS_PORT", d.trainer_metrics_port)
            ),
            rendezvous_port=int(_float("KUBETUNE_RENDEZVOUS_PORT", d.rendezvous_port)),
            default_gpu_memory_gib=_float(
                "KUBETUNE_DEFAULT_GPU_MEMORY_GIB", d.default_gpu_memory_gib
            ),
            shm_gib_per_gpu=_float("KUBETUNE_SHM_GIB_PER_GPU", d.shm_gib_per_gpu),
            metrics_port=int(_float("KUBETUNE_METRICS_PORT", d.metrics_port)),
            default_output_uri=os.environ.get("KUBETUNE_DEFAULT_OUTPUT_URI", d.default_output_uri),
            trainer_command=_command("KUBETUNE_TRAINER_COMMAND"),
            watch_namespaces=tuple(
                ns.strip()
                for ns in os.environ.get("KUBETUNE_WATCH_NAMESPACES", "").split(",")
                if ns.strip()
            ),
            leader_election=os.environ.get("KUBETUNE_LEADER_ELECTION", "true").lower()
            not in ("false", "0", "no"),
            lease_namespace=os.environ.get("KUBETUNE_LEASE_NAMESPACE")
            or os.environ.get("POD_NAMESPACE")
            or _pod_namespace()
            or d.lease_namespace,
            lease_duration_seconds=_float(
                "KUBETUNE_LEASE_DURATION_SECONDS", d.lease_duration_seconds
            ),
            default_queue=os.environ.get("KUBETUNE_DEFAULT_QUEUE", "").strip() or None,
        )


def _pod_namespace() -> str | None:
    """The namespace of the pod this runs in (its service account's), if any."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None
