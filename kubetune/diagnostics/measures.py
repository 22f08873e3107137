"""The arithmetic of the diagnostics, free of torch: what counts as a verbatim or
near-verbatim continuation, how token losses summarise into perplexities, and when the
training data is too surprising for the base model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DiagnosticsSettings:
    """`spec.diagnostics`, with the defaults of the CRD."""

    enabled: bool = True
    #: Training (and held-out) examples the memorisation probe prompts, each evaluation.
    memorization_samples: int = 32
    #: k: response tokens given after the prompt.
    prefix_tokens: int = 8
    #: m: response tokens that must then come out verbatim under greedy decoding.
    continuation_tokens: int = 16
    #: A continuation within this normalised edit distance counts as near-verbatim.
    near_verbatim_distance: float = 0.1
    #: Tokens each perplexity probe reads (general text; training data under the base).
    token_budget: int = 8192
    #: A token whose perplexity under the base model exceeds this is "high-perplexity".
    high_perplexity_threshold: float = 100.0
    #: Warn when the training targets' perplexity under the base model exceeds this
    #: multiple of the general text's.
    data_perplexity_warning_ratio: float = 3.0
    #: Probes at an evaluation are skipped while their time so far would exceed this share
    #: of the training wall time (the final evaluation always probes); it also caps the
    #: perplexity probes' tokens at this share of the tokens the run trains on.
    max_overhead: float = 0.05

    @classmethod
    def from_spec(cls, d: Mapping[str, object] | None) -> DiagnosticsSettings:
        d = d or {}
        base = cls()

        def get(key: str, default: float) -> float:
            value = d.get(key)
            return default if value is None else float(value)  # type: ignore[arg-type]

        return cls(
            enabled=bool(d.get("enabled", True)),
            memorization_samples=int(get("memorizationSamples", base.memorization_samples)),
            prefix_tokens=int(get("prefixTokens", base.prefix_tokens)),
            continuation_tokens=int(get("continuationTokens", base.continuation_tokens)),
            near_verbatim_distance=get("nearVerbatimDistance", base.near_verbatim_distance),
            token_budget=int(get("tokenBudget", base.token_budget)),
            high_perplexity_threshold=get(
                "highPerplexityThreshold", base.high_perplexity_threshold
            ),
            data_perplexity_warning_ratio=get(
                "dataPerplexityWarningRatio", base.data_perplexity_warning_ratio
            ),
            max_overhead=get("maxOverhead", base.max_overhead),
        )


def probe_token_budget(settings: DiagnosticsSettings, planned_train_tokens: int) -> int:
    """Tokens for each perplexity probe: `tokenBudget`, but at most `maxOverhead` of the
    tokens the run will train on (a forward pass costs about a third of a training step per
    token, so the two probes before training stay near maxOverhead of the run), and at least
    256 so that the figure means something."""
    if settings.token_budget == 0:
        return 0
    share = int(settings.max_overhead * planned_train_tokens)
    return min(settings.token_budget, max(256, share))


def should_probe(
    *, spent: float, next_cost: float, elapsed: float, max_overhead: float, final: bool
) -> bool:
    """Whether to run an evaluation's probes: always at the final evaluation; otherwise
    only while the probe seconds so far plus the expected cost of this round (`next_cost`:
    the last round's, or an estimate before the first) stay within `max_overhead` of the
    wall time since training began."""
    if final:
        return True
    return spent + next_cost <= max_overhead * elapsed


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def probe_window(target_len: int, k: int, m: int) -> tuple[int, int] | None:
    """(k', m') for a response of `target_len` tokens: the asked-for k and m when the
    response is long enough, else a shorter window that still asks for a continuation of
    at least as many tokens as it gives (k' <= target_len / 2). None below 2 tokens."""
    if target_len < 2:
        return None
    k_eff = min(k, target_len // 2)
    m_eff = min(m, target_len - k_eff)
    return k_eff, m_eff


@dataclass(frozen=True)
class MemorizationResult:
    samples: int
    exact: int
    near: int

    @property
    def exact_rate(self) -> float:
        return self.exact / self.samples if self.samples else 0.0

    @property
    def near_rate(self) -> float:
        return self.near / self.samples if self.samples else 0.0


def memorization_result(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], near_distance: float
) -> MemorizationResult:
    """Count (generated, expected) continuations that match exactly, and those within
    `near_distance` normalised edit distance (distance / len(expected); exact ones too).
    A generation is compared on the expected length: a longer one is cut, a shorter one
    (the model ended early) counts its missing tokens as edits."""
    exact = near = 0
    for generated, expected in pairs:
        got = list(generated[: len(expected)])
        if got == list(expected):
            exact += 1
            near += 1
        elif expected and edit_distance(got, expected) / len(expected) <= near_distance:
            near += 1
    return MemorizationResult(samples=len(pairs), exact=exact, near=near)


@dataclass(frozen=True)
class PerplexitySummary:
    tokens: int
    mean_nll: float
    high_ratio: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.mean_nll, 50.0))


def perplexity_summary(nlls: Sequence[float], high_threshold: float) -> PerplexitySummary:
    """Mean per-token negative log-likelihood (nats), its perplexity, and the share of
    tokens whose own perplexity exp(nll) exceeds `high_threshold`."""
    finite = [x for x in nlls if math.isfinite(x)]
    if not finite:
        return PerplexitySummary(tokens=0, mean_nll=float("nan"), high_ratio=0.0)
    cut = math.log(high_threshold)
    high = sum(1 for x in finite if x > cut)
    return PerplexitySummary(
        tokens=len(finite), mean_nll=sum(finite) / len(finite), high_ratio=high / len(finite)
    )


def data_perplexity_warning(
    data: PerplexitySummary, general: PerplexitySummary | None, settings: DiagnosticsSettings
) -> str | None:
    """The status warning when the training targets are unusually surprising for the
    base model: their perplexity is over `data_perplexity_warning_ratio` times the
    general text's (or, with no general text measured, half the tokens are high)."""
    if data.tokens == 0:
        return None
    advice = (
        "the data is unusually surprising for the base model, which raises forgetting and "
        "memorisation: rephrase responses in the model's own style (or let it rewrite "
        "them) and keep the facts"
    )
    if general is not None and general.tokens:
        ratio = data.perplexity / general.perplexity
        if ratio > settings.data_perplexity_warning_ratio:
            return (
                f"training targets have perplexity {data.perplexity:.1f} under the base "
                f"model, {ratio:.1f}x its {general.perplexity:.1f} on general text "
                f"({100 * data.high_ratio:.0f}% of tokens above "
                f"{settings.high_perplexity_threshold:g}): {advice}"
            )
        return None
    if data.high_ratio > 0.5:
        return (
            f"{100 * data.high_ratio:.0f}% of the training target tokens have perplexity "
            f"above {settings.high_perplexity_threshold:g} under the base model: {advice}"
        )
    return None
