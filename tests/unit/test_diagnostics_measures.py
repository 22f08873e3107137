"""The diagnostics' arithmetic: edit distance, probe windows, memorisation counts,
perplexity summaries, the data warning, and the cost controls."""

from __future__ import annotations

import math

import pytest

from kubetune.diagnostics import (
    DiagnosticsSettings,
    PerplexitySummary,
    data_perplexity_warning,
    edit_distance,
    memorization_result,
    perplexity_summary,
    probe_token_budget,
    probe_window,
    should_probe,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ([], [], 0),
        ([1, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [1, 3], 1),
        ([1, 2, 3], [1, 9, 3], 1),
        ([], [1, 2], 2),
        ([1, 2, 3, 4], [4, 3, 2, 1], 4),
        ([1, 2, 3, 4, 5], [2, 3, 4, 5, 6], 2),
    ],
)
def test_edit_distance(a: list[int], b: list[int], d: int) -> None:
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


@pytest.mark.parametrize(
    ("length", "window"),
    [(40, (8, 16)), (24, (8, 16)), (20, (8, 12)), (10, (5, 5)), (3, (1, 2)), (1, None)],
)
def test_probe_window_shrinks_for_short_responses(
    length: int, window: tuple[int, int] | None
) -> None:
    assert probe_window(length, 8, 16) == window


def test_memorization_counts_exact_and_near() -> None:
    pairs = [
        ([1, 2, 3, 4], [1, 2, 3, 4]),  # exact
        ([1, 2, 3, 4, 9, 9], [1, 2, 3, 4]),  # longer generation: compared on 4 tokens
        ([1, 2, 0, 4], [1, 2, 3, 4]),  # one substitution: 0.25
        ([1, 2], [1, 2, 3, 4]),  # ended early: two missing tokens, 0.5
        ([7, 7, 7, 7], [1, 2, 3, 4]),
    ]
    r = memorization_result(pairs, near_distance=0.25)
    assert (r.samples, r.exact, r.near) == (5, 2, 3)
    assert r.exact_rate == pytest.approx(0.4)
    assert r.near_rate == pytest.approx(0.6)
    assert memorization_result([], 0.1).exact_rate == 0.0


def test_perplexity_summary() -> None:
    nlls = [math.log(10.0)] * 3 + [math.log(1000.0)] + [math.nan]
    s = perplexity_summary(nlls, high_threshold=100.0)
    assert s.tokens == 4
    assert s.perplexity == pytest.approx(math.exp((3 * math.log(10) + math.log(1000)) / 4))
    assert s.high_ratio == pytest.approx(0.25)
    assert perplexity_summary([], 100.0).tokens == 0


def _summary(ppl: float, high: float = 0.2) -> PerplexitySummary:
    return PerplexitySummary(tokens=100, mean_nll=math.log(ppl), high_ratio=high)


@pytest.mark.parametrize(
    ("data", "general", "warns"),
    [
        (_summary(300.0), _summary(50.0), True),
        (_summary(120.0), _summary(50.0), False),
        (_summary(300.0, high=0.6), None, True),
        (_summary(300.0, high=0.3), None, False),
        (PerplexitySummary(tokens=0, mean_nll=math.nan, high_ratio=0.0), _summary(5.0), False),
    ],
)
def test_the_data_warning(
    data: PerplexitySummary, general: PerplexitySummary | None, warns: bool
) -> None:
    warning = data_perplexity_warning(data, general, DiagnosticsSettings())
    assert (warning is not None) == warns
    if warning:
        assert "rephrase responses in the model's own style" in warning


@pytest.mark.parametrize(
    ("spent", "next_cost", "elapsed", "final", "runs"),
    [
        (0.0, 1.0, 100.0, False, True),  # 1 s of 100 s at 5%: fine
        (0.0, 10.0, 100.0, False, False),  # the first round would take 10%
        (4.0, 2.0, 100.0, False, False),  # 6% with this round
        (4.0, 2.0, 100.0, True, True),  # the final evaluation always probes
        (4.0, 1.0, 100.0, False, True),
    ],
)
def test_probes_stay_within_the_overhead_share(
    spent: float, next_cost: float, elapsed: float, final: bool, runs: bool
) -> None:
    assert (
        should_probe(
            spent=spent,
            next_cost=next_cost,
            elapsed=elapsed,
            max_overhead=0.05,
            final=final,
        )
        == runs
    )


def test_the_token_budget_follows_the_run_size() -> None:
    s = DiagnosticsSettings()
    assert probe_token_budget(s, 10_000_000) == 8192  # the spec's budget caps big runs
    assert probe_token_budget(s, 40_000) == 2000  # 5% of a small run
    assert probe_token_budget(s, 100) == 256  # never below a meaningful floor
    off = DiagnosticsSettings(token_budget=0)
    assert probe_token_budget(off, 10_000_000) == 0


def test_settings_from_the_spec() -> None:
    s = DiagnosticsSettings.from_spec(
        {"enabled": False, "memorizationSamples": 4, "maxOverhead": 0.2, "prefixTokens": 2}
    )
    assert (s.enabled, s.memorization_samples, s.max_overhead, s.prefix_tokens) == (
        False,
        4,
        0.2,
        2,
    )
    assert DiagnosticsSettings.from_spec(None) == DiagnosticsSettings()
