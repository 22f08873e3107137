"""`python -m kubetune.trainer.launch <torchrun arguments>`: what a training pod runs.

torchrun reports any failed worker as exit code 1, which would hide the trainer's
configuration-error code (78) from the Job's podFailurePolicy, and bad data would be
retried on GPUs up to backoffLimit. So this launcher first checks the configuration and
the data in-process (exit 78 at once, before any GPU work), then runs torchrun, and maps a
failure whose termination message says ConfigError back to 78.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import TextIO

from kubetune.contract import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    REASON_INTERRUPTED,
    Env,
    termination_path,
)

#: After a failure: this many lines of each rank's log are printed (at most this many logs).
TAIL_LINES = 25
TAIL_LOGS = 8


def precheck() -> str | None:
    """The configuration or data error that would stop every rank, or None."""
    from kubetune.data import DataError
    from kubetune.trainer.config import TrainerConfigError, load_config
    from kubetune.trainer.data import read_sources

    try:
        cfg = load_config(None)
        read_sources(cfg.spec, cfg.dataset, cfg.sources, cfg.validation)
    except (TrainerConfigError, DataError, OSError, ValueError) as exc:
        return str(exc)
    return None


def stage_objects() -> str | None:
    """Download the s3:// inputs (and an earlier attempt's output) once for this node, and
    point the environment torchrun's workers inherit at the local copies; the error, if any."""
    from kubetune.data.objectstore import ObjectStoreError, is_s3, work_dir

    if not any(is_s3(v) for v in os.environ.values()):
        return None
    from kubetune.trainer.objects import stage

    try:
        os.environ.update(stage(os.environ, work_dir(dict(os.environ), "kubetune-train-")))
    except ObjectStoreError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # SIGTERM before torchrun starts: nothing to save, stop at once (PID 1 would ignore it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_INTERRUPTED))
    error = stage_objects() or precheck()
    if error is not None:
        print(f"configuration error: {error}", file=sys.stderr)
        with contextlib.suppress(OSError):
            termination_path().write_text(json.dumps({"error": error, "reason": "ConfigError"}))
        return EXIT_CONFIG_ERROR
    code = run_torchrun([sys.executable, "-m", "torch.distributed.run", *args])
    if code != 0:
        try:
            message = json.loads(termination_path().read_text())
        except (OSError, ValueError):
            message = {}
        reason = message.get("reason") if isinstance(message, dict) else None
        if reason == REASON_INTERRUPTED:
            # Every rank saved and stopped on SIGTERM (here or on another pod of the gang).
            print(f"interrupted: {message.get('message', '')}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        print_rank_logs(sys.stderr)
        if reason == "ConfigError":
            return EXIT_CONFIG_ERROR
    return code


def run_torchrun(command: list[str]) -> int:
    """torchrun as a child that gets this process's SIGTERM. The launcher is the container's
    PID 1, which the kernel spares from signals it has no handler for: without this the
    kubelet's SIGTERM would do nothing until its SIGKILL. torchrun passes SIGTERM to the
    workers (which save a checkpoint and stop) and kills them after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set from the pod's grace period."""
    env = dict(os.environ)
    shutdown = os.environ.get(Env.SHUTDOWN_TIMEOUT)
    if shutdown and shutdown.isdigit():
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = shutdown
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def print_rank_logs(stream: TextIO) -> None:
    """The last lines of the ranks' logs (`<output>/logs/trainer-rank-N.log`, where the
    trainer sends its libraries' output in a pod): after a failure they reach `kubectl logs`
    and, through the pod's FallbackToLogsOnError, the job's condition, even when the crash
    was no Python exception (a segfault, an NCCL or CUDA abort)."""
    output = os.environ.get(Env.OUTPUT_PATH)
    if not output:
        return
    logs = sorted((Path(output) / "logs").glob("trainer-rank-*.log"))[:TAIL_LOGS]
    for log in logs:
        try:
            lines = log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
        except OSError:
            continue
        print(f"--- the last lines of {log}:", file=stream)
        print("\n".join(lines[-TAIL_LINES:]), file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
