"""The rows a run trains and evaluates on: the held-out split and the weighted mixture of the
training files (spec.dataset.uri and spec.dataset.sources), one pure function the planner and
the trainer share so that the plan counts what the trainer trains on.

Every file's rows are pooled; duplicates are removed from the pool as
spec.dataset.deduplicate says (`kubetune.data.quality`: exact and near, the first occurrence
kept); the validation rows are held out from the pool (a seeded split, `holdout_count` of
them, each group of duplicates left on one side) unless a validation file is given, and the
leakage between the two sides is measured either way; then each training row is used
`weight` times, its file's weight: the whole part as copies, the fraction as a seeded sample of
that file's training rows (0.5: half of them). Weights apply after the split, so a repeated
row is never on both sides of it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from kubetune.data.dedup import DedupSettings
from kubetune.data.quality import QualityReport, curate
from kubetune.data.stats import Example, holdout_count

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One training file's rows and its weight; `name` is its URI, for messages."""

    name: str
    examples: list[Example]
    weight: float = 1.0


def split_holdout(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A deterministic held-out split (`holdout_count`: at least one example each side), in
    the rows' order on both sides."""
    n_val = holdout_count(len(examples), fraction)
    if n_val == 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def weighted(rows: Sequence[T], weight: float, seed: int) -> list[T]:
    """`rows` used `weight` times: floor(weight) copies of each, then a seeded sample of
    round(fraction x len(rows)) of them (in their order)."""
    whole = math.floor(weight)
    out = [row for _ in range(whole) for row in rows]
    extra = round((weight - whole) * len(rows))
    if extra:
        picked = sorted(random.Random(seed).sample(range(len(rows)), extra))
        out += [rows[i] for i in picked]
    return out


@dataclass(frozen=True)
class Rows:
    """What a run trains and evaluates on, and what the data-quality pass found."""

    train: list[Example]
    validation: list[Example]
    quality: QualityReport


def mixed_rows(
    sources: Sequence[Source],
    validation: list[Example] | None,
    split: float,
    seed: int,
    dedup: DedupSettings | None = None,
    validation_name: str = "",
) -> Rows:
    """The weighted training rows, the validation rows (`validation` when a validation file
    is given, else the seeded split of all the files' rows, each duplicate group on one
    side) and the quality report: duplicates removed as `dedup` says (default: exact and
    near, `DedupSettings()`) before the split, leakage measured after it."""
    pooled = [(i, ex) for i, source in enumerate(sources) for ex in source.examples]
    labels = [(sources[i].name, ex.where) for i, ex in pooled]
    curated = curate(
        [ex for _, ex in pooled],
        labels,
        validation,
        validation_name,
        split,
        seed,
        dedup or DedupSettings(),
    )
    train = [pooled[i] for i in curated.train]
    held_out = validation if validation is not None else [pooled[i][1] for i in curated.held]
    if all(source.weight == 1 for source in sources):
        return Rows([ex for _, ex in train], held_out, curated.report)
    out: list[Example] = []
    for i, source in enumerate(sources):
        mine = [ex for j, ex in train if j == i]
        out += weighted(mine, source.weight, seed + i)
    return Rows(out, held_out, curated.report)


def training_rows(
    sources: Sequence[Source],
    validation: list[Example] | None,
    split: float,
    seed: int,
    dedup: DedupSettings | None = None,
) -> tuple[list[Example], list[Example]]:
    """`mixed_rows`' training and validation rows."""
    rows = mixed_rows(sources, validation, split, seed, dedup)
    return rows.train, rows.validation
