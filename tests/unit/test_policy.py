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


# ---- the probe rules: memorisation above the held-out baseline, forgetting ------------------


def probed(
    train: list[float | None],
    heldout: list[float | None] | None = None,
    ratios: list[float | None] | None = None,
) -> list[EvalPoint]:
    """Evaluations whose eval loss keeps improving (no loss rule fires), with the probe
    figures given (None: the probes did not run at that evaluation)."""
    return [
        EvalPoint(
            step=10 * (i + 1),
            eval_loss=2.0 - 0.1 * i,
            memorization_train=t,
            memorization_heldout=None if heldout is None else heldout[i],
            general_ratio=None if ratios is None else ratios[i],
        )
        for i, t in enumerate(train)
    ]


ONLY_MEMORIZATION = StopSettings(max_general_ratio=None)
ONLY_FORGETTING = StopSettings(memorization_margin=None)


@pytest.mark.parametrize(
    ("train", "heldout", "settings", "reason"),
    [
        # Default margin 0.2 for 2 probed evaluations in a row: an excess of 0.25 twice stops.
        ([0.1, 0.3, 0.35], [0.05, 0.05, 0.1], ONLY_MEMORIZATION, "MemorizationExceeded"),
        # Only once above the margin: not yet.
        ([0.1, 0.1, 0.35], [0.05, 0.05, 0.1], ONLY_MEMORIZATION, ""),
        # Exactly at the margin is not above it.
        ([0.3, 0.3], [0.1, 0.1], ONLY_MEMORIZATION, ""),
        ([0.31, 0.31], [0.1, 0.1], ONLY_MEMORIZATION, "MemorizationExceeded"),
        # A high training rate the held-out baseline shares is learning, not memorisation.
        ([0.9, 0.95, 1.0], [0.85, 0.9, 0.95], ONLY_MEMORIZATION, ""),
        # Above the margin twice, then back under it: the last evaluations count.
        ([0.5, 0.5, 0.1], [0.0, 0.0, 0.0], ONLY_MEMORIZATION, ""),
        # Evaluations the probes skipped do not break the run of probed ones.
        ([0.5, None, 0.5], [0.0, None, 0.0], ONLY_MEMORIZATION, "MemorizationExceeded"),
        # N = 3 needs three.
        (
            [0.5, 0.5],
            [0.0, 0.0],
            StopSettings(memorization_evaluations=3, max_general_ratio=None),
            "",
        ),
        (
            [0.5, 0.5, 0.5],
            [0.0, 0.0, 0.0],
            StopSettings(memorization_evaluations=3, max_general_ratio=None),
            "MemorizationExceeded",
        ),
        # A tighter margin.
        (
            [0.12],
            [0.0],
            StopSettings(memorization_margin=0.1, memorization_evaluations=1),
            "MemorizationExceeded",
        ),
        # The rule off, or early stopping off.
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], StopSettings(memorization_margin=None), ""),
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], StopSettings(enabled=False), ""),
        # No held-out baseline (no validation rows): nothing to compare with.
        ([1.0, 1.0], None, ONLY_MEMORIZATION, ""),
    ],
)
def test_memorization_rule(
    train: list[float | None],
    heldout: list[float | None] | None,
    settings: StopSettings,
    reason: str,
) -> None:
    d = decide(probed(train, heldout), settings)
    assert (d.stop, d.reason) == (bool(reason), reason)
    if reason:
        assert "held-out baseline" in d.message
        assert f"{settings.memorization_margin:g}" in d.message


@pytest.mark.parametrize(
    ("ratios", "settings", "reason"),
    [
        # Default limit 2.0 for 2 probed evaluations.
        ([1.2, 2.1, 2.3], ONLY_FORGETTING, "ForgettingExceeded"),
        ([1.2, 1.9, 2.3], ONLY_FORGETTING, ""),
        ([2.0, 2.0], ONLY_FORGETTING, ""),  # at the limit: not above it
        ([2.01, 2.01], ONLY_FORGETTING, "ForgettingExceeded"),
        ([2.5, None, 2.5], ONLY_FORGETTING, "ForgettingExceeded"),
        ([2.5, 2.5, 1.5], ONLY_FORGETTING, ""),  # recovered (replay turned on, say)
        (
            [1.3],
            StopSettings(max_general_ratio=1.25, forgetting_evaluations=1),
            "ForgettingExceeded",
        ),
        ([1.3, 1.3], StopSettings(max_general_ratio=1.25, forgetting_evaluations=3), ""),
        ([5.0, 5.0], StopSettings(max_general_ratio=None), ""),
        ([5.0, 5.0], StopSettings(enabled=False), ""),
        ([math.nan, math.nan], ONLY_FORGETTING, ""),
    ],
)
def test_forgetting_rule(ratios: list[float | None], settings: StopSettings, reason: str) -> None:
    d = decide(probed([None] * len(ratios), ratios=ratios), settings)
    assert (d.stop, d.reason) == (bool(reason), reason)
    if reason:
        assert "forgetting.maxRatio" in d.message


def test_both_probe_rules_keep_the_best_step_and_leave_divergence_first() -> None:
    history = probed([0.9, 0.9], [0.0, 0.0], [3.0, 3.0])
    d = decide(history, StopSettings())
    assert d.reason == "MemorizationExceeded"  # checked before forgetting
    assert (d.best_step, d.evals_since_best) == (20, 0)
    d = decide(history, StopSettings(memorization_margin=None))
    assert d.reason == "ForgettingExceeded"
    diverged = [*history[:-1], EvalPoint(step=20, eval_loss=math.nan, memorization_train=0.9)]
    assert decide(diverged, StopSettings()).reason == "Diverged"


def test_probe_settings_from_the_spec() -> None:
    s = StopSettings.from_spec(
        {
            "memorization": {"enabled": True, "margin": 0.3, "evaluations": 4},
            "forgetting": {"enabled": False, "maxRatio": 1.5, "evaluations": 1},
        }
    )
    assert (s.memorization_margin, s.memorization_evaluations) == (0.3, 4)
    assert s.max_general_ratio is None
    assert s.forgetting_evaluations == 1
    # The pydantic defaults (what the operator dumps) are the policy's defaults.
    from kubetune.api.spec import EarlyStopping

    assert StopSettings.from_spec(EarlyStopping().model_dump(by_alias=True)) == StopSettings()
    with pytest.raises(ValueError, match=r"earlyStopping\.forgetting"):
        StopSettings.from_spec({"forgetting": 2.0})


def test_a_loss_rule_that_holds_too_gives_its_reason_before_the_probe_rules() -> None:
    """The evaluation a loss rule stops at always probes: its reason stays the loss rule's."""
    history = [
        EvalPoint(step=10, eval_loss=1.5, memorization_train=0.9, memorization_heldout=0.0),
        EvalPoint(step=20, eval_loss=1.6, memorization_train=0.9, memorization_heldout=0.0),
    ]
    assert decide(history, StopSettings(patience=1)).reason == "NoImprovement"
    assert decide(history, StopSettings(patience=5)).reason == "MemorizationExceeded"
