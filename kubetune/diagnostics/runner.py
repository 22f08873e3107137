"""The diagnostics of one training run: the base model's figures before training (general
text, training data), and at each evaluation the memorisation rates (training sample and
held-out baseline) and the general-text perplexity with its ratio to the base model's.

The general text is given (dataset.generalTextUri, or the shipped English text), or drawn
from the base model itself (`BaseSamples`): seeded samples generated once before training,
cached in the run's output for its later starts, their cost counted with the probes'."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
#: The cache of the base model's samples in the run's output (rank 0's).
SAMPLES_FILE = "base-model-samples.json"

T = TypeVar("T")


def _same(value: T) -> T:
    return value


@dataclass(frozen=True)
class BaseSamples:
    """How to draw the forgetting probe's text from the base model: `samples` sequences of
    at most `length` tokens after `start_id` (`probes.sample_tokens`), seeded; `key` names
    the base model, the seed and these settings (a cache made otherwise is not used)."""

    key: str
    samples: int
    length: int
    seed: int
    start_id: int
    eos_id: int | None = None
    #: Token ids -> text, for the people reading the cache.
    decode: Callable[[list[int]], str] | None = None

    @property
    def tokens(self) -> int:
        """The most tokens the samples can hold (the cost's bound)."""
        return self.samples * self.length


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
        base_samples: BaseSamples | None = None,
        share: Callable[[Any], Any] = _same,
        general_source: str = "Uri",
    ) -> None:
        self.settings = settings
        n = settings.memorization_samples
        self.train_sample = probes.sample_rows(train_rows, n, seed)
        self.heldout_sample = probes.sample_rows(heldout_rows, n, seed)
        self.data_rows = probes.budget_rows(train_rows, token_budget, seed)
        self.general_rows = list(general_rows)
        self.base_samples = base_samples
        #: Every rank's copy of rank 0's value (a broadcast under several processes).
        self.share = share
        #: What the general text is, for the report: its source and, for the base model's
        #: samples, their count, tokens, the seconds they took and whether they were cached.
        self.general_text: dict[str, Any] = {
            "source": "BaseModel" if base_samples is not None else general_source,
            "tokens": _targets(self.general_rows),
        }
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
            if self.base_samples is not None and not self.general_rows:
                self.general_rows = self._sampled_rows(model, can_sample=fresh or is_adapter)
            if not (fresh or is_adapter):
                if saved is not None and saved.exists():
                    self.base = json.loads(saved.read_text())
                    kept = self.base.pop("warning", None)
                    notes = [str(kept)] if kept else []
                    self.warning = "; ".join([*notes, *filter(None, [self.warning])]) or None
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

    def _sampled_rows(self, model: Any, *, can_sample: bool) -> list[probes.Row]:
        """The base model's samples as general-text rows: rank 0's cache when it was made
        with the same key, else drawn now on every rank (in step under ZeRO-3) and rank
        0's taken by all, then cached. A resumed full fine-tune has no base left to sample:
        without a cache the forgetting probe is off (a warning says so)."""
        bs = self.base_samples
        assert bs is not None
        path = self.output / SAMPLES_FILE if self.output is not None else None
        cached = self.share(_read_samples(path, bs.key) if path is not None else None)
        info: dict[str, Any]
        if cached is not None:
            seqs = [list(map(int, x)) for x in cached["samples"]]
            info = {"cached": True, "seconds": float(cached.get("seconds", 0.0))}
        elif can_sample:
            start = time.perf_counter()
            with self.watch.time("base_samples"):
                drawn = probes.sample_tokens(
                    model,
                    start_id=bs.start_id,
                    eos_id=bs.eos_id,
                    samples=bs.samples,
                    length=bs.length,
                    seed=bs.seed,
                    pad_id=self.pad_id,
                    device=self.device,
                    synced=self.synced,
                )
            seqs = self.share(drawn)
            seconds = time.perf_counter() - start
            info = {"cached": False, "seconds": seconds}
            if path is not None:
                _write_samples(path, bs, seqs, seconds)
        else:
            self.warning = (
                "the base model's samples (the forgetting probe's text) are not in the "
                "output and a resumed full fine-tune has no base model left to draw them "
                "from: the forgetting probe is off for this start"
            )
            self.general_text.update(samples=0, tokens=0)
            return []
        rows = [
            {"input_ids": [bs.start_id, *seq], "labels": [probes.IGNORE_INDEX, *seq]}
            for seq in seqs
            if seq
        ]
        self.general_text.update(
            samples=len(rows),
            tokens=_targets(rows),
            maxTokens=bs.tokens,
            seconds=round(info["seconds"], 3),
            cached=info["cached"],
            **({"file": str(path)} if path is not None else {}),
        )
        log.info(
            "general text: %d samples of the base model (%d tokens, %s)",
            len(rows),
            _targets(rows),
            "cached" if info["cached"] else f"drawn in {info['seconds']:.1f} s",
        )
        return rows

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


def _targets(rows: Sequence[probes.Row]) -> int:
    return sum(1 for r in rows for x in r["labels"] if x != probes.IGNORE_INDEX)


def _read_samples(path: Path, key: str) -> dict[str, Any] | None:
    """The cached samples made with `key`, or None (missing, unreadable or another key)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _write_samples(path: Path, bs: BaseSamples, seqs: list[list[int]], seconds: float) -> None:
    data: dict[str, Any] = {
        "key": bs.key,
        "seed": bs.seed,
        "length": bs.length,
        "samples": seqs,
        "tokens": sum(len(x) for x in seqs),
        "seconds": round(seconds, 3),
    }
    if bs.decode is not None:
        data["text"] = [bs.decode(x) for x in seqs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
