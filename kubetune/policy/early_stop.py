"""Decide from the evaluation history whether a run should stop, and why.

Reasons (CamelCase, as in the job's EarlyStopped condition), checked in this order:
- Diverged: the train or eval loss is not finite, or eval loss exceeds 4x the best.
- LossGapExceeded: eval minus train loss above `maxLossGap`.
- PerplexityExceeded: eval perplexity above `maxEvalPerplexity`.
- OverMemorization: eval perplexity rose `patience` evaluations in a row while eval token
  accuracy held (within 1 point) — the model grows over-confident on what it gets wrong.
- Overfitting: the loss gap (eval minus train loss) widened `patience` evaluations in a
  row, ending positive, while eval loss is above its best.
- NoImprovement: no eval loss better than the best by `minDelta` for `patience` evaluations.
- MemorizationExceeded: the memorisation rate of the training sample exceeded the held-out
  baseline's by more than `memorization.margin` at each of the last
  `memorization.evaluations` evaluations that ran the probes.
- ForgettingExceeded: the general-text perplexity ratio (now / base) exceeded
  `forgetting.maxRatio` at each of the last `forgetting.evaluations` probed evaluations.

The probe figures of an evaluation are None when the probes did not run at it (their
overhead budget skips some): the two probe rules look at the evaluations that have them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

#: Defaults of the probe rules (the CRD's; docs/metrics.md says why these values).
MEMORIZATION_MARGIN = 0.2
MAX_GENERAL_RATIO = 2.0
PROBE_EVALUATIONS = 2


@dataclass(frozen=True)
class EvalPoint:
    step: int
    eval_loss: float
    train_loss: float | None = None
    eval_accuracy: float | None = None
    #: The memorisation probe: exact rate on the training sample and on the held-out one.
    memorization_train: float | None = None
    memorization_heldout: float | None = None
    #: The forgetting probe: general-text perplexity now / the base model's.
    general_ratio: float | None = None

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
    #: MemorizationExceeded: None turns the rule off.
    memorization_margin: float | None = MEMORIZATION_MARGIN
    memorization_evaluations: int = PROBE_EVALUATIONS
    #: ForgettingExceeded: None turns the rule off.
    max_general_ratio: float | None = MAX_GENERAL_RATIO
    forgetting_evaluations: int = PROBE_EVALUATIONS

    @classmethod
    def from_spec(cls, es: dict[str, object]) -> StopSettings:
        """The settings of `spec.earlyStopping` (camelCase, as the API server stores it;
        a missing field takes the CRD's default)."""

        def num(key: str) -> float | None:
            v = es.get(key)
            return None if v is None else float(v)  # type: ignore[arg-type]

        def group(key: str) -> dict[str, object]:
            value = es.get(key)
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError(f"earlyStopping.{key} must be an object, not {value!r}")
            return value

        mem, forget = group("memorization"), group("forgetting")
        return cls(
            enabled=bool(es.get("enabled", True)),
            patience=int(es.get("patience", 3)),  # type: ignore[call-overload]
            min_delta=float(es.get("minDelta", 0.0)),  # type: ignore[arg-type]
            max_loss_gap=num("maxLossGap"),
            max_eval_perplexity=num("maxEvalPerplexity"),
            over_memorization=bool(es.get("overMemorization", True)),
            memorization_margin=(
                float(mem.get("margin", MEMORIZATION_MARGIN))  # type: ignore[arg-type]
                if mem.get("enabled", True)
                else None
            ),
            memorization_evaluations=int(
                mem.get("evaluations", PROBE_EVALUATIONS)  # type: ignore[call-overload]
            ),
            max_general_ratio=(
                float(forget.get("maxRatio", MAX_GENERAL_RATIO))  # type: ignore[arg-type]
                if forget.get("enabled", True)
                else None
            ),
            forgetting_evaluations=int(
                forget.get("evaluations", PROBE_EVALUATIONS)  # type: ignore[call-overload]
            ),
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
    # The probe rules last: where a loss rule also holds (the evaluation a loss rule stops
    # at always probes), its reason is the one reported.
    memorized = _memorization_exceeded(history, settings)
    if memorized:
        return stop("MemorizationExceeded", memorized)
    forgotten = _forgetting_exceeded(history, settings)
    if forgotten:
        return stop("ForgettingExceeded", forgotten)
    return Decision(stop=False, **base)  # type: ignore[arg-type]


def _memorization_exceeded(history: list[EvalPoint], settings: StopSettings) -> str:
    """The message of MemorizationExceeded, or "" when it does not apply: the training
    sample's exact memorisation rate above the held-out baseline's by more than the margin
    at each of the last `memorization_evaluations` probed evaluations."""
    margin, n = settings.memorization_margin, settings.memorization_evaluations
    if margin is None:
        return ""
    probed = [
        p
        for p in history
        if p.memorization_train is not None and p.memorization_heldout is not None
    ][-n:]
    if len(probed) < n:
        return ""
    excess = [(p.memorization_train or 0.0) - (p.memorization_heldout or 0.0) for p in probed]
    if not all(x > margin for x in excess):
        return ""
    last = probed[-1]
    return (
        f"the training sample's memorisation rate {last.memorization_train:.2f} exceeded the "
        f"held-out baseline {last.memorization_heldout:.2f} by more than the margin "
        f"{margin:g} at {n} probed evaluation(s) in a row (excess "
        f"{', '.join(f'{x:.2f}' for x in excess)}; steps {', '.join(str(p.step) for p in probed)})"
    )


def _forgetting_exceeded(history: list[EvalPoint], settings: StopSettings) -> str:
    """The message of ForgettingExceeded, or "": the general-text perplexity ratio above
    `max_general_ratio` at each of the last `forgetting_evaluations` probed evaluations."""
    limit, n = settings.max_general_ratio, settings.forgetting_evaluations
    if limit is None:
        return ""
    probed = [p for p in history if p.general_ratio is not None][-n:]
    if len(probed) < n:
        return ""
    ratios = [p.general_ratio or 0.0 for p in probed]
    if not all(r > limit for r in ratios):
        return ""
    return (
        f"the general-text perplexity ratio (now / base) was above forgetting.maxRatio "
        f"{limit:g} at {n} probed evaluation(s) in a row "
        f"({', '.join(f'{r:.2f}' for r in ratios)}; steps "
        f"{', '.join(str(p.step) for p in probed)})"
    )
