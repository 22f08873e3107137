"""What a run says to a person: the trainer's console events and the lines they read as.

The trainer's rank 0 makes one event per thing worth saying (the run starts, a step ends,
an evaluation with its probes and the policy's verdict, a decision Auto takes, an early
stop, the end) as a JSON-able dict. Under `kubetune run` it appends them to an events file
that the CLI renders (a live display in a terminal, plain lines otherwise); in a pod it
writes the plain lines itself, so `kubectl logs` reads like a local run without a terminal.
Everything here is pure: the trainer and the CLI share it, and neither needs torch for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.contract import Env

#: The event kinds.
START = "start"
PROGRESS = "progress"
EVALUATION = "evaluation"
DECISION = "decision"
STOP = "stop"
DONE = "done"
ERROR = "error"

#: Plain output (no terminal): at most one progress line per this many seconds, besides the
#: first and the last step. A pod's log of a day-long run stays a few thousand lines.
PLAIN_PROGRESS_SECONDS = 30.0


def progress_seconds(env: Mapping[str, str]) -> float:
    """The plain progress interval: `KUBETUNE_PROGRESS_SECONDS`, else the default."""
    raw = env.get(Env.PROGRESS_SECONDS, "")
    try:
        return max(float(raw), 0.0) if raw else PLAIN_PROGRESS_SECONDS
    except ValueError:
        return PLAIN_PROGRESS_SECONDS


@dataclass
class Throttle:
    """At most one `ready()` per `seconds`; `force` (the first or last step) always is."""

    seconds: float
    last: float | None = None

    def ready(self, now: float, *, force: bool = False) -> bool:
        if force or self.last is None or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h07m`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(value: Any, fmt: str = ".3f") -> str | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return format(v, fmt) if math.isfinite(v) else str(v)


def progress_line(event: dict[str, Any], *, percent: bool = True) -> str:
    """`step 40/150 (26%) · epoch 1.07 · loss 3.214 · best eval 3.101 · ETA 18s` (without
    the percentage beside a bar that shows it)."""
    step, total = int(event.get("step", 0)), max(int(event.get("totalSteps", 0) or 0), 1)
    parts = [f"step {step}/{total}" + (f" ({100 * step // total}%)" if percent else "")]
    epoch = _num(event.get("epoch"), ".2f")
    if epoch is not None:
        parts.append(f"epoch {epoch}")
    loss = _num(event.get("trainLoss"))
    if loss is not None:
        parts.append(f"loss {loss}")
    best = _num(event.get("bestEvalLoss"))
    if best is not None:
        parts.append(f"best eval {best}")
    parts.append(f"ETA {duration(event.get('etaSeconds'))}")
    return " · ".join(parts)


def verdict_text(verdict: dict[str, Any]) -> str:
    """The policy's verdict at one evaluation: `keeps going`, `stops: Overfitting: ...`, or
    `would stop: ...` where the trainer does not act on it (the operator decides, or early
    stopping is off)."""
    if not verdict.get("stop"):
        return "keeps going"
    what = "stops" if verdict.get("acts") else "would stop"
    reason, message = verdict.get("reason") or "", verdict.get("message") or ""
    return f"{what}: {reason}" + (f" ({message})" if message else "")


def evaluation_line(event: dict[str, Any]) -> str:
    """One evaluation: eval loss, gap, perplexity, token accuracy, the probes when they
    ran (memorisation of training vs held-out rows, general-text perplexity against the
    base model's), and the policy's verdict."""
    head = f"eval @ step {int(event.get('step', 0))}"
    epoch = _num(event.get("epoch"), ".2f")
    if epoch is not None:
        head += f" (epoch {epoch})"
    figures = [f"loss {_num(event.get('eval_loss'))}"]
    gap = _num(event.get("loss_gap"), "+.3f")
    if gap is not None:
        figures.append(f"gap {gap}")
    ppl = _num(event.get("eval_perplexity"), ".2f")
    if ppl is not None:
        figures.append(f"perplexity {ppl}")
    acc = _num(event.get("eval_token_accuracy"))
    if acc is not None:
        figures.append(f"token accuracy {acc}")
    train_mem = _num(event.get("memorization_rate_train"), ".2f")
    if train_mem is not None:
        held = _num(event.get("memorization_rate_heldout"), ".2f")
        figures.append(f"memorised train {train_mem}" + (f" / held-out {held}" if held else ""))
    ratio = _num(event.get("general_perplexity_ratio"), ".2f")
    if ratio is not None:
        figures.append(f"general text x{ratio} of base")
    verdict = event.get("verdict") or {}
    tail = verdict_text(verdict)
    best = _num(verdict.get("bestEvalLoss"))
    if best is not None and verdict.get("bestStep") is not None:
        tail += f"; best {best} at step {verdict['bestStep']}"
    return f"{head}: {', '.join(figures)} -> {tail}"


def decision_line(event: dict[str, Any]) -> str:
    text = str(event.get("text") or "").strip()
    return text if text.lower().startswith("auto") else f"Auto: {text}"


def stop_line(event: dict[str, Any]) -> str:
    line = f"early stop at step {int(event.get('step', 0))}: {event.get('reason', '')}"
    if event.get("message"):
        line += f" ({event['message']})"
    if event.get("bestStep") is not None:
        line += f"; the best checkpoint (step {event['bestStep']}) is kept"
    return line


def done_line(event: dict[str, Any]) -> str:
    line = (
        f"trained {int(event.get('steps', 0))} step(s) in {duration(event.get('seconds'))}"
        f"; final model in {event.get('output', '?')}"
    )
    best = _num(event.get("bestEvalLoss"))
    if best is not None:
        line += f"; best eval loss {best} at step {event.get('bestStep')}"
    return line


def event_line(event: dict[str, Any]) -> str | None:
    """The plain line of any event (None for a kind that has none)."""
    kind = event.get("kind")
    if kind == START:
        return str(event.get("text") or "")
    if kind == PROGRESS:
        return progress_line(event)
    if kind == EVALUATION:
        return evaluation_line(event)
    if kind == DECISION:
        return decision_line(event)
    if kind == STOP:
        return stop_line(event)
    if kind == DONE:
        return done_line(event)
    if kind == ERROR:
        return f"error: {event.get('text', '')}"
    return None


class PlainLines:
    """Events to plain lines: every evaluation, decision, stop and end; progress at most
    once per `seconds` (and at the first and last step)."""

    def __init__(self, seconds: float = PLAIN_PROGRESS_SECONDS) -> None:
        self.throttle = Throttle(seconds)

    def line(self, event: dict[str, Any], now: float) -> str | None:
        if event.get("kind") == PROGRESS:
            step, total = int(event.get("step", 0)), int(event.get("totalSteps", 0) or 0)
            last = step >= total > 0
            if not self.throttle.ready(now, force=last or self.throttle.last is None):
                return None
        return event_line(event)
