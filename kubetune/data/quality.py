"""Data quality on the pooled training rows, before the split and the weights: duplicate
removal (`kubetune.data.dedup`), a validation split that keeps each duplicate group on one
side, and train/validation leakage measured for every split, with counts and a few named
examples for the plan (`QualityReport`).

Pure; `kubetune.data.mixture.training_rows` runs it for the planner and the trainer alike.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubetune.data.dedup import (
    MAX_EXAMPLES,
    DedupSettings,
    Hasher,
    Match,
    cross_matches,
    group_rows,
)
from kubetune.data.stats import Example, holdout_count


@dataclass(frozen=True)
class QualityReport:
    """What was found: duplicates among the `rows` training rows (exact, near; removed or
    kept as `settings` says) and validation rows that duplicate a training row."""

    settings: DedupSettings
    rows: int = 0
    exact: int = 0
    near: int = 0
    removed_exact: int = 0
    removed_near: int = 0
    examples: list[str] = field(default_factory=list)
    #: "split" (held out from the pool) or "file" (spec.dataset.validationUri).
    validation: str = "split"
    validation_rows: int = 0
    leaked_exact: int = 0
    leaked_near: int = 0
    leakage_examples: list[str] = field(default_factory=list)

    @property
    def kept_duplicates(self) -> int:
        return self.exact + self.near - self.removed_exact - self.removed_near

    @property
    def leaked(self) -> int:
        return self.leaked_exact + self.leaked_near


def grouped_split(
    group_of: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """The training and validation row indexes of a seeded split that never separates a
    group (`group_of[i]`: row i's group representative). Whole groups are taken in a seeded
    order while they fit in `holdout_count` rows; with no duplicates this is the plain seeded
    split of the rows. Both sides keep the rows' order."""
    n_val = holdout_count(len(group_of), fraction)
    if n_val == 0:
        return list(range(len(group_of))), []
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for g in order:
        if len(held) + len(members[g]) <= n_val:
            held += members[g]
            if len(held) == n_val:
                break
    if not held:  # every group is larger than the share: the smallest that leaves training rows
        smallest = min(order, key=lambda g: len(members[g]))
        if len(members[smallest]) < len(group_of):
            held = members[smallest]
    chosen = set(held)
    return [i for i in range(len(group_of)) if i not in chosen], sorted(chosen)


#: A row's name in examples: its file and its place there ("a.jsonl", "line 3").
Label = tuple[str, str]


def describe(match: Match, row: Label, of: Label) -> str:
    """ "b.jsonl line 9 = a.jsonl line 2" (exact), "a.jsonl line 12 ~ line 4 (0.93)" (near:
    the Jaccard similarity); the file is named once when both rows are in it."""
    other = of[1] if of[0] == row[0] else f"{of[0]} {of[1]}"
    sign = "=" if match.kind == "exact" else "~"
    similarity = "" if match.kind == "exact" else f" ({match.similarity:.2f})"
    return f"{row[0]} {row[1]} {sign} {other}{similarity}"


@dataclass(frozen=True)
class Curated:
    """Indexes into the pool: the training rows and (for a split) the validation rows;
    with a validation file, `held` is empty and the file's rows are the validation rows."""

    train: list[int]
    held: list[int]
    report: QualityReport


def curate(
    pool: Sequence[Example],
    labels: Sequence[Label],
    validation: Sequence[Example] | None,
    validation_name: str,
    split: float,
    seed: int,
    settings: DedupSettings,
) -> Curated:
    """Remove the duplicates `settings` removes, split off the validation rows (grouped)
    unless `validation` is given, and measure the leakage between the two sides. `labels`
    name the pool's rows (file, place) for the examples."""
    hasher = Hasher()
    groups = group_rows(pool, settings.threshold, hasher)
    kept = groups.kept(settings)
    kept_set = set(kept)
    dups = groups.duplicates()
    removed = [m for m in dups if m.row not in kept_set]
    # A copy removed only because its class is a near duplicate counts as near.
    removed_exact = sum(1 for m in removed if m.kind == "exact" and settings.exact)
    examples = [describe(m, labels[m.row], labels[m.of]) for m in dups[:MAX_EXAMPLES]]
    if validation is None:
        local_groups = [groups.group_of[i] for i in kept]
        train_pos, held_pos = grouped_split(local_groups, split, seed)
        train = [kept[p] for p in train_pos]
        held = [kept[p] for p in held_pos]
        val_rows = [pool[i] for i in held]
        val_labels = [labels[i] for i in held]
    else:
        train, held = kept, []
        val_rows = list(validation)
        val_labels = [(validation_name, ex.where) for ex in val_rows]
    leaks = cross_matches(val_rows, [pool[i] for i in train], settings.threshold, hasher)
    report = QualityReport(
        settings=settings,
        rows=len(pool),
        exact=groups.count("exact"),
        near=groups.count("near"),
        removed_exact=removed_exact,
        removed_near=len(removed) - removed_exact,
        examples=examples,
        validation="split" if validation is None else "file",
        validation_rows=len(val_rows),
        leaked_exact=sum(1 for m in leaks if m.kind == "exact"),
        leaked_near=sum(1 for m in leaks if m.kind == "near"),
        leakage_examples=[
            describe(m, val_labels[m.row], labels[train[m.of]]) for m in leaks[:MAX_EXAMPLES]
        ],
    )
    return Curated(train, held, report)
