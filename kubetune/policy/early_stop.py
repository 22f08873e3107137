"""Decide from the evaluation history whether a run should stop, and why.

Reasons (CamelCase, as in the job's EarlyStopped condition):
- Diverged: the train or eval loss is not finite, or eval loss exceeds 4x the best.
- LossGapExceeded: eval minus train loss above `maxLossGap`.
- PerplexityExceeded: eval perplexity above `maxEvalPerplexity`.
- OverMemorization: eval perplexity rose `patience` evaluations in a row while eval token
  accuracy held (within 1 point) — the model grows over-confident on what it gets wrong.
- Overfitting: the loss gap (eval minus train loss) widened `patience` evaluations in a
  row, ending positive, while eval loss is above its best.
- NoImprovement: no eval loss better than the best by `minDelta` for `patience` evaluations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalPoint:
    step: int
    eval_loss: float
    train_loss: float | None = None
    eval_accuracy: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.eval_loss, 50.0))


@dataclass(frozen=True)
class StopSettings:
    enabled: bool = True
    patience: int = 3
    min_delta: float = 0.0
    max_loss_gap: float | None = None
    max_eval_perplexity: float | None = None
    over_memorization: bool = True

    @classmethod
    def from_spec(cls, es: dict[str, object]) -> StopSettings:
        def num(key: str) -> float | None:
            v = es.get(key)
            return None if v is None else float(v)  # type: ignore[arg-type]

        return cls(
            enabled=bool(es.get("enabled", True)),
            patience=int(es.get("patience", 3)),  # type: ignore[call-overload]
            min_delta=float(es.get("minDelta", 0.0)),  # type: ignore[arg-type]
            max_loss_gap=num("maxLossGap"),
            max_eval_perplexity=num("maxEvalPerplexity"),
            over_memorization=bool(es.get("overMemorization", True)),
        )


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str = ""
    message: str = ""
    best_step: int | None = None
    best_eval_loss: float | None = None
    evals_since_best: int = 0


def _best(history: list[EvalPoint], min_delta: float) -> tuple[int, int]:
    """Index of the best point, and evaluations since it (an improvement must beat the
    best so far by more than min_delta)."""
    best_i = 0
    for i, p in enumerate(history[1:], start=1):
        if p.eval_loss < history[best_i].eval_loss - min_delta:
            best_i = i
    return best_i, len(history) - 1 - best_i


def _rising(values: list[float], n: int) -> bool:
    if len(values) < n + 1:
        return False
    tail = values[-(n + 1) :]
    return all(b > a for a, b in itertools.pairwise(tail))


def decide(history: list[EvalPoint], settings: StopSettings) -> Decision:
    if not history:
        return Decision(stop=False)
    best_i, since = _best(history, settings.min_delta)
    best = history[best_i]
    base = {"best_step": best.step, "best_eval_loss": best.eval_loss, "evals_since_best": since}
    last = history[-1]

    def stop(reason: str, message: str) -> Decision:
        return Decision(stop=True, reason=reason, message=message, **base)  # type: ignore[arg-type]

    if not settings.enabled:
        return Decision(stop=False, **base)  # type: ignore[arg-type]
    losses = [last.eval_loss] + ([last.train_loss] if last.train_loss is not None else [])
    if any(not math.isfinite(x) for x in losses):
        return stop("Diverged", f"the loss is not finite at step {last.step}")
    if last.eval_loss > 4 * best.eval_loss and last.eval_loss - best.eval_loss > 1.0:
        return stop(
            "Diverged",
            f"eval loss {last.eval_loss:.3f} at step {last.step} is over "
            f"4x the best {best.eval_loss:.3f}",
        )
    if (
        settings.max_loss_gap is not None
        and last.train_loss is not None
        and last.eval_loss - last.train_loss > settings.max_loss_gap
    ):
        return stop(
            "LossGapExceeded",
            f"eval loss {last.eval_loss:.3f} - train loss {last.train_loss:.3f} = "
            f"{last.eval_loss - last.train_loss:.3f} > maxLossGap "
            f"{settings.max_loss_gap:g} at step {last.step}",
        )
    if settings.max_eval_perplexity is not None and last.perplexity > settings.max_eval_perplexity:
        return stop(
            "PerplexityExceeded",
            f"eval perplexity {last.perplexity:.2f} > maxEvalPerplexity "
            f"{settings.max_eval_perplexity:g} at step {last.step}",
        )
    n = settings.patience
    evals = [p.eval_loss for p in history]
    if settings.over_memorization and _rising(evals, n):
        accs = [p.eval_accuracy for p in history[-(n + 1) :]]
        if all(a is not None for a in accs):
            vals = [a for a in accs if a is not None]
            if max(vals) - min(vals) <= 0.01:
                return stop(
                    "OverMemorization",
                    f"eval perplexity rose {n} evaluations in a row (to "
                    f"{last.perplexity:.2f}) while eval token accuracy held at "
                    f"{vals[-1]:.3f}",
                )
    window = history[-(n + 1) :]
    if len(window) == n + 1 and all(p.train_loss is not None for p in window):
        gaps = [p.eval_loss - (p.train_loss or 0.0) for p in window]
        # Widening means eval loss pulling away above train loss: a negative gap that
        # shrinks (train loss with dropout catching up with eval loss) is not overfitting.
        if _rising(gaps, n) and gaps[-1] > 0 and last.eval_loss > best.eval_loss:
            return stop(
                "Overfitting",
                f"the loss gap widened {n} evaluations in a row, from {gaps[0]:.3f} to "
                f"{gaps[-1]:.3f}, while eval loss {last.eval_loss:.3f} is above its best "
                f"{best.eval_loss:.3f} (step {best.step})",
            )
    if since >= n:
        return stop(
            "NoImprovement",
            f"eval loss has not improved on {best.eval_loss:.4f} (step {best.step}) "
            f"by more than {settings.min_delta:g} for {since} evaluations",
        )
    return Decision(stop=False, **base)  # type: ignore[arg-type]
