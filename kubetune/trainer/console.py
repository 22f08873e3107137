"""The trainer's console: rank 0's events (`kubetune.console`) to the events file that
`kubetune run` renders, or as plain lines to stdout in a pod; and the libraries' output
(transformers, DeepSpeed, torch, warnings, C++ prints) routed to a log file in the output
folder, so that the console carries what a person reads."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from kubetune.console import PLAIN_PROGRESS_SECONDS, PlainLines, progress_seconds
from kubetune.contract import Env


def verbose() -> bool:
    return os.environ.get(Env.VERBOSE, "") not in ("", "0", "false")


def library_log_path(output: Path, rank: int) -> Path:
    return output / "logs" / f"trainer-rank-{rank}.log"


def route_library_output(log_path: Path) -> TextIO:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and
    subprocess output too) to `log_path`, appended; returns a stream on the former stdout
    for the console lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return console


class RunConsole:
    """Where rank 0's events go: appended to `events_path` as JSON lines (`kubetune run`),
    or written as plain lines to `stream` (progress at a bounded rate)."""

    def __init__(
        self,
        *,
        events_path: Path | None = None,
        stream: TextIO | None = None,
        progress_seconds: float = PLAIN_PROGRESS_SECONDS,
    ) -> None:
        self.events_path = events_path
        self.stream = stream
        self.plain = PlainLines(progress_seconds)
        self._events: TextIO | None = None  # opened at the first event, line-buffered

    @classmethod
    def from_env(cls, stream: TextIO | None) -> RunConsole:
        path = os.environ.get(Env.EVENTS_PATH)
        return cls(
            events_path=Path(path) if path else None,
            stream=stream,
            progress_seconds=progress_seconds(os.environ),
        )

    def emit(self, kind: str, **fields: Any) -> None:
        event = {"kind": kind, "time": time.time(), **fields}
        if self.events_path is not None:
            if self._events is None:
                self._events = self.events_path.open("a", encoding="utf-8", buffering=1)
            self._events.write(json.dumps(event, default=str) + "\n")
            return
        if self.stream is None:
            return
        line = self.plain.line(event, time.monotonic())
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()


def quiet_trainer(trainer: Any) -> None:
    """Without the HF Trainer's own console output: its per-step log dictionaries
    (PrinterCallback) and its tqdm bars (ProgressCallback); the console events replace
    them, and metrics.jsonl keeps every row."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
