"""SIGTERM in a training process: the kubelet's notice that the pod is going (deleted,
drained, the job suspended or preempted by a queue). The handler only records it. At the end
of the step in flight every rank learns it (the same all-reduce that carries the operator's
stop request), all of them save a checkpoint together and leave the training loop, and the
process exits with `EXIT_INTERRUPTED`; the next start resumes from that checkpoint.

One SIGTERM on any rank is enough: when a single pod of a multi-node gang is deleted, the
others save with it instead of hanging in the next collective."""

from __future__ import annotations

import signal
import threading
from types import FrameType

_received = threading.Event()


def install() -> None:
    """Record SIGTERM instead of dying on it (call in the training process's main thread)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Nothing else here: a handler that logs or locks could deadlock the interrupted code.
    _received.set()


def requested() -> bool:
    """Whether this process got SIGTERM."""
    return _received.is_set()
