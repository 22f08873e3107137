"""The diagnostics of one training run: the base model's figures before training (general
text, training data), and at each evaluation the memorisation rates (training sample and
held-out baseline) and the general-text perplexity with its ratio to the base model's."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kubetune.diagnostics import probes
from kubetune.diagnostics.measures import (
    DiagnosticsSettings,
    PerplexitySummary,
    data_perplexity_warning,
    perplexity_summary,
    should_probe,
)

log = logging.getLogger("kubetune.diagnostics")

BASE_FILE = "diagnostics-base.json"


@contextlib.contextmanager
def base_model(model: Any) -> Iterator[bool]:
    """The base model inside: a PEFT model with its adapter disabled (yields True), or the
    model itself (yields False: only the base before any training step)."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield True
    else:
        yield False


class DiagnosticsRunner:
    def __init__(
        self,
        settings: DiagnosticsSettings,
        *,
        train_rows: Sequence[probes.Row],
        heldout_rows: Sequence[probes.Row],
        general_rows: Sequence[probes.Row],
        token_budget: int,
        pad_id: int,
        device: Any,
        output: Path | None,
        seed: int = 0,
        synced: bool = False,
    ) -> None:
        self.settings = settings
        n = settings.memorization_samples
        self.train_sample = probes.sample_rows(train_rows, n, seed)
        self.heldout_sample = probes.sample_rows(heldout_rows, n, seed)
        self.data_rows = probes.budget_rows(train_rows, token_budget, seed)
        self.general_rows = list(general_rows)
        self.pad_id = pad_id
        self.device = device
        self.output = output
        self.synced = synced
        self.watch = probes.Stopwatch()
        self.base: dict[str, float] = {}
        self.warning: str | None = None
        self.rounds = 0
        self.skipped = 0
        self.last_round = 0.0

    # ------------------------------------------------------------------ before training
    def before_training(self, model: Any, fresh: bool) -> dict[str, float]:
        """The base model's general-text and training-data perplexity. A resumed full
        fine-tune cannot see its base any more: it reads the figures saved at the start."""
        saved = self.output / BASE_FILE if self.output is not None else None
        with base_model(model) as is_adapter:
            if not (fresh or is_adapter):
                if saved is not None and saved.exists():
                    self.base = json.loads(saved.read_text())
                    self.warning = self.base.pop("warning", None)  # type: ignore[assignment]
                return dict(self.base)
            general: PerplexitySummary | None = None
            if self.general_rows:
                with self.watch.time("general_perplexity"):
                    general = self._perplexity(model, self.general_rows)
                self.base["general_perplexity_base"] = general.perplexity
            if self.data_rows:
                with self.watch.time("data_perplexity"):
                    data = self._perplexity(model, self.data_rows)
                self.base["data_perplexity_base"] = data.perplexity
                self.base["data_high_perplexity_token_ratio"] = data.high_ratio
                self.base["data_perplexity_tokens"] = data.tokens
                self.warning = data_perplexity_warning(data, general, self.settings)
        if saved is not None:
            saved.write_text(json.dumps({**self.base, "warning": self.warning}))
        return dict(self.base)

    # ------------------------------------------------------------------ each evaluation
    def at_evaluation(self, model: Any, *, elapsed: float, final: bool) -> dict[str, float]:
        """The probes of one evaluation, or {} when the overhead budget says to skip them
        (`elapsed`: wall seconds since training began; the decision is the same on every
        rank, which matters under ZeRO-3)."""
        s = self.settings
        spent = sum(self.watch.seconds.values())
        if not should_probe(
            spent=spent,
            next_cost=self.last_round if self.rounds else self._first_round_estimate(),
            elapsed=elapsed,
            max_overhead=s.max_overhead,
            # The first evaluation always probes too: every run reports its figures (a run
            # the operator stops between evaluations has no probing final evaluation).
            final=final or self.rounds == 0,
        ):
            self.skipped += 1
            return {}
        self.rounds += 1
        out: dict[str, float] = {}
        rows = [*self.train_sample, *self.heldout_sample]
        if rows:
            with self.watch.time("memorization"):
                train, heldout = probes.memorization_split(
                    model,
                    rows,
                    len(self.train_sample),
                    k=s.prefix_tokens,
                    m=s.continuation_tokens,
                    near_distance=s.near_verbatim_distance,
                    pad_id=self.pad_id,
                    device=self.device,
                    synced=self.synced,
                )
            for split, result in (("train", train), ("heldout", heldout)):
                if result.samples:
                    out[f"memorization_rate_{split}"] = result.exact_rate
                    out[f"near_verbatim_rate_{split}"] = result.near_rate
        if self.general_rows:
            with self.watch.time("general_perplexity"):
                general = self._perplexity(model, self.general_rows)
            out["general_perplexity"] = general.perplexity
            base = self.base.get("general_perplexity_base")
            if base:
                out["general_perplexity_ratio"] = general.perplexity / base
        self.last_round = sum(self.watch.seconds.values()) - spent
        return out

    def _first_round_estimate(self) -> float:
        """Before any round: the general-text probe's time before training, scaled by the
        tokens a round reads (its general-text pass plus the memorisation prompts and their
        continuations, each decoded token a forward pass over a short batch)."""
        seconds = self.watch.seconds.get("general_perplexity", 0.0)
        general = sum(len(r["input_ids"]) for r in self.general_rows) or 1
        prompts = len(self.train_sample) + len(self.heldout_sample)
        decoded = prompts * (self.settings.prefix_tokens + 2 * self.settings.continuation_tokens)
        return seconds * (general + decoded) / general

    def _perplexity(self, model: Any, rows: Sequence[probes.Row]) -> PerplexitySummary:
        nlls = probes.token_nlls(model, rows, self.device)
        return perplexity_summary(nlls, self.settings.high_perplexity_threshold)
