"""The early-stop policy: evaluation history -> decision and reason."""

from __future__ import annotations

import math

import pytest

from kubetune.policy import EvalPoint, StopSettings, decide

pytestmark = pytest.mark.unit


def hist(
    evals: list[float], trains: list[float] | None = None, accs: list[float] | None = None
) -> list[EvalPoint]:
    return [
        EvalPoint(
            step=10 * (i + 1),
            eval_loss=e,
            train_loss=None if trains is None else trains[i],
            eval_accuracy=None if accs is None else accs[i],
        )
        for i, e in enumerate(evals)
    ]


@pytest.mark.parametrize(
    ("evals", "trains", "accs", "settings", "reason"),
    [
        ([2.0, 1.8, 1.6, 1.5], None, None, StopSettings(), ""),
        ([2.0, 1.5, 1.6, 1.55, 1.58], None, None, StopSettings(patience=3), "NoImprovement"),
        ([2.0, 1.5, 1.6, 1.55], None, None, StopSettings(patience=3), ""),
        (
            [2.0, 1.5, 1.49, 1.495],
            None,
            None,
            StopSettings(patience=2, min_delta=0.05),
            "NoImprovement",
        ),
        (
            [2.0, 1.5, 1.6, 1.7, 1.8],
            [2.0, 1.4, 1.2, 1.0, 0.8],
            None,
            StopSettings(patience=3),
            "Overfitting",
        ),
        (
            [2.0, 1.5, 1.6, 1.7, 1.8],
            [2.0, 1.4, 1.2, 1.0, 0.8],
            [0.5, 0.6, 0.6, 0.605, 0.6],
            StopSettings(patience=3),
            "OverMemorization",
        ),
        (
            [2.0, 1.5, 1.6, 1.7, 1.8],
            [2.0, 1.4, 1.2, 1.0, 0.8],
            [0.5, 0.6, 0.6, 0.605, 0.6],
            StopSettings(patience=3, over_memorization=False),
            "Overfitting",
        ),
        ([2.0, 1.5], [1.8, 0.9], None, StopSettings(max_loss_gap=0.5), "LossGapExceeded"),
        ([2.0, 1.5], [1.8, 1.2], None, StopSettings(max_loss_gap=0.5), ""),
        ([3.5, 3.2], None, None, StopSettings(max_eval_perplexity=20), "PerplexityExceeded"),
        ([2.0, math.nan], None, None, StopSettings(), "Diverged"),
        ([1.0, 0.5, 3.0], None, None, StopSettings(), "Diverged"),
        ([2.0, 2.5, 3.0, 3.5], None, None, StopSettings(enabled=False), ""),
        # The gap widens while eval loss wobbles above its best: Overfitting before
        # NoImprovement.
        (
            [2.0, 1.5, 1.55, 1.52, 1.56],
            [2.0, 1.4, 1.3, 1.1, 1.0],
            None,
            StopSettings(patience=3),
            "Overfitting",
        ),
        # The gap widens but every evaluation is a new best: keep going.
        ([2.0, 1.8, 1.6, 1.5], [1.9, 1.6, 1.3, 1.1], None, StopSettings(patience=3), ""),
        # Eval perplexity rises but accuracy falls too: not over-memorisation, overfitting.
        (
            [2.0, 1.5, 1.6, 1.7, 1.8],
            [2.0, 1.4, 1.2, 1.0, 0.8],
            [0.5, 0.6, 0.55, 0.5, 0.45],
            StopSettings(patience=3),
            "Overfitting",
        ),
        ([2.0, 1.9], [1.8, math.inf], None, StopSettings(), "Diverged"),
        ([2.0, 2.1], None, None, StopSettings(patience=1), "NoImprovement"),
        ([3.5, 2.9], None, None, StopSettings(max_eval_perplexity=20), ""),
        # A jump above 4x the best that is small in absolute terms is noise, not divergence.
        ([0.1, 0.05, 0.3], None, None, StopSettings(), ""),
        ([5.0], [1.0], [0.9], StopSettings(patience=1), ""),
        # Eval below train loss (dropout in training) and the gap shrinking towards zero:
        # train loss catching up, not overfitting (measured by bench/early_stop.py).
        (
            [0.40, 0.36, 0.342, 0.35, 0.345],
            [1.6, 1.3, 1.0, 0.8, 0.6],
            None,
            StopSettings(patience=3),
            "",
        ),
    ],
)
def test_decisions(
    evals: list[float],
    trains: list[float] | None,
    accs: list[float] | None,
    settings: StopSettings,
    reason: str,
) -> None:
    d = decide(hist(evals, trains, accs), settings)
    assert d.stop == bool(reason)
    assert d.reason == reason
    if reason:
        assert d.message


def test_best_and_evals_since_best_are_reported() -> None:
    d = decide(hist([2.0, 1.2, 1.3, 1.4]), StopSettings(patience=5))
    assert (d.best_step, d.best_eval_loss, d.evals_since_best) == (20, 1.2, 2)


def test_settings_from_the_spec() -> None:
    s = StopSettings.from_spec(
        {
            "patience": 4,
            "minDelta": 0.01,
            "maxLossGap": 0.7,
            "enabled": True,
            "overMemorization": False,
        }
    )
    assert (s.patience, s.min_delta, s.max_loss_gap, s.over_memorization) == (4, 0.01, 0.7, False)
    assert StopSettings.from_spec({}) == StopSettings()


def test_empty_history_never_stops() -> None:
    assert decide([], StopSettings()).stop is False
