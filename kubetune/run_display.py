"""How `kubetune run` shows the trainer's console events (`kubetune.console`): in a
terminal, one live progress bar (rich) with a line printed above it per evaluation,
decision and stop; otherwise (CI, pipes, files) plain lines with progress at a bounded
rate; with --quiet, nothing."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol, TextIO

from kubetune import console as events


class Display(Protocol):
    def event(self, event: dict[str, Any]) -> None: ...

    def say(self, text: str) -> None: ...

    def close(self) -> None: ...


class QuietDisplay:
    """--quiet: nothing on the console but errors (the CLI prints those)."""

    def event(self, event: dict[str, Any]) -> None:
        return None

    def say(self, text: str) -> None:
        return None

    def close(self) -> None:
        return None


class PlainDisplay:
    """Plain lines: every evaluation, decision and stop; progress at most every
    `seconds` (and at the first and last step)."""

    def __init__(self, stream: TextIO, seconds: float = events.PLAIN_PROGRESS_SECONDS) -> None:
        self.stream = stream
        self.lines = events.PlainLines(seconds)

    def event(self, event: dict[str, Any]) -> None:
        line = self.lines.line(event, time.monotonic())
        if line is not None:
            self.say(line)

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        return None


class TerminalDisplay:
    """A live progress bar (step/total, epoch, latest train loss, best eval loss, ETA) and
    the other events as lines above it."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]training[/bold]"),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def _bar(self, total: int) -> Any:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("training", total=total, info="starting")
        return self.task

    def event(self, event: dict[str, Any]) -> None:
        if event.get("kind") == events.PROGRESS:
            total = max(int(event.get("totalSteps") or 0), 1)
            task = self._bar(total)
            self.progress.update(
                task,
                total=total,
                completed=int(event.get("step", 0)),
                info=events.progress_line(event, percent=False),
            )
            return
        line = events.event_line(event)
        if line:
            self.say(line)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def make_display(*, quiet: bool, terminal: bool, stream: TextIO) -> Display:
    if quiet:
        return QuietDisplay()
    if terminal:
        return TerminalDisplay()
    return PlainDisplay(stream, events.progress_seconds(os.environ))
