"""The rows a run trains and evaluates on: the held-out split and the weighted mixture of the
training files (spec.dataset.uri and spec.dataset.sources), one pure function the planner and
the trainer share so that the plan counts what the trainer trains on.

Every file's rows are pooled; the validation rows are held out from the pool (a seeded split,
`holdout_count` of them) unless a validation file is given; then each training row is used
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


def training_rows(
    sources: Sequence[Source],
    validation: list[Example] | None,
    split: float,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """The weighted training rows and the validation rows: `validation` when a validation
    file is given, else the seeded split of all the files' rows."""
    pooled = [(i, ex) for i, source in enumerate(sources) for ex in source.examples]
    if validation is None:
        train, held = split_holdout(pooled, split, seed)
        held_out = [ex for _, ex in held]
    else:
        train, held_out = pooled, validation
    if all(source.weight == 1 for source in sources):
        return [ex for _, ex in train], held_out
    out: list[Example] = []
    for i, source in enumerate(sources):
        mine = [ex for j, ex in train if j == i]
        out += weighted(mine, source.weight, seed + i)
    return out, held_out
