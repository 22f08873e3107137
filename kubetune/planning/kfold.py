"""k-fold cross-validation that chooses the epoch count for tiny training sets: the pure part.

With fewer than a couple of hundred examples one held-out split is too small to say when
training starts to memorise. Before the real run the training rows are split into k folds;
each fold trains a fresh copy of the base model (method applied, as planned) on the other
k-1 folds for `max_epochs` epochs and records its loss on the held-out fold after every
epoch. The epoch with the lowest mean held-out loss over the folds is the epoch count of
the real run.

Here: the decision, the folds, the choice and the cost sentence (no torch). The folds run in
`kubetune.trainer.remedies.kfold`."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

#: Auto cross-validates training sets with fewer examples than this.
KFOLD_BELOW = 200
#: The folds look this much further than the planned epoch count ...
LOOK_AHEAD = 1.5
#: ... and at least this many epochs (one epoch leaves nothing to choose) ...
MIN_MAX_EPOCHS = 2
#: ... and at most this many (a bound on the cost of an explicit `On` with many epochs).
MAX_MAX_EPOCHS = 30

Row = dict[str, list[int]]
Fold = tuple[list[int], list[int]]


# ---- pure: the decision, the folds, the choice, the cost --------------------------------------


def mode_on(mode: str, examples: int, epochs_set: bool) -> tuple[bool, str]:
    """Whether to cross-validate, and one sentence why. Auto: on for fewer than
    KFOLD_BELOW training examples when spec.hyperparameters.epochs is unset; On: on (the
    folds then choose the epoch count even if it is set); Off: off. Fewer than two examples
    cannot be split into folds."""
    if mode not in ("Auto", "On", "Off"):
        raise ValueError(f"crossValidation.mode must be Auto, On or Off, not {mode!r}")
    if mode == "Off":
        return False, "Cross-validation: off, as crossValidation.mode says."
    if examples < 2:
        return False, (
            f"Cross-validation: off, {examples} training example(s) cannot be split into folds."
        )
    if mode == "On":
        override = ", in place of spec.hyperparameters.epochs" if epochs_set else ""
        return True, (
            f"Cross-validation: on, as crossValidation.mode says; the folds choose the "
            f"epoch count for the {examples:,} training examples{override}."
        )
    if epochs_set:
        return False, "Cross-validation: off, spec.hyperparameters.epochs is set."
    if examples >= KFOLD_BELOW:
        return False, (
            f"Cross-validation: off, {examples:,} training examples are not fewer than "
            f"{KFOLD_BELOW}, so the held-out split alone guides the run."
        )
    return True, (
        f"Cross-validation: on, {examples:,} training examples are fewer than {KFOLD_BELOW} "
        f"and spec.hyperparameters.epochs is unset, so the folds choose the epoch count."
    )


def fold_indices(n: int, k: int, seed: int) -> list[Fold]:
    """k folds of range(n) as (training indices, held-out indices), both sorted: a
    deterministic shuffle by `seed` dealt round-robin, so every index is held out exactly
    once and the held-out sizes differ by at most one. k is clamped to n (no empty fold);
    n == 0 gives no folds."""
    if n < 0 or k < 1:
        raise ValueError(f"fold_indices needs n >= 0 and k >= 1, not n={n}, k={k}")
    k = min(k, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    folds: list[Fold] = []
    for i in range(k):
        held = sorted(order[i::k])
        held_set = set(held)
        folds.append(([j for j in range(n) if j not in held_set], held))
    return folds


def grouped_folds(lines: Sequence[int] | None, n: int, k: int, seed: int) -> list[Fold]:
    """Folds over source examples rather than rows: rows that share a source line (an
    example and its augmented copies) stay on one side, and a held-out fold keeps only
    each source's first row (the original), so no paraphrase of a held-out example trains
    the fold that judges it. Without lines, every row is its own source."""
    if lines is None or len(lines) != n:
        return fold_indices(n, k, seed)
    sources = list(dict.fromkeys(lines))
    out: list[Fold] = []
    for train_src, held_src in fold_indices(len(sources), k, seed):
        train_lines = {sources[i] for i in train_src}
        held_lines = {sources[i] for i in held_src}
        train = [i for i, line in enumerate(lines) if line in train_lines]
        first: dict[int, int] = {}
        for i, line in enumerate(lines):
            if line in held_lines:
                first.setdefault(line, i)
        out.append((train, sorted(first.values())))
    return out


def choose_epoch(curves: Sequence[Sequence[float]]) -> tuple[int, list[float]]:
    """The 1-based epoch with the lowest mean held-out loss, and the mean curve. Curves are
    cut to the shortest one (a mean over different folds at different epochs would not
    compare); a loss that is not finite (diverged) counts as infinite; ties go to fewer
    epochs."""
    if not curves or not all(curves):
        raise ValueError("choose_epoch needs at least one non-empty curve")
    length = min(len(c) for c in curves)
    mean = [
        math.fsum(float(c[e]) for c in curves) / len(curves)
        if all(math.isfinite(float(c[e])) for c in curves)
        else math.inf
        for e in range(length)
    ]
    best = min(range(length), key=lambda e: (mean[e], e))
    return best + 1, mean


def max_epochs_for(planned_epochs: float) -> int:
    """How many epochs the folds train: ceil(LOOK_AHEAD x planned), at least MIN_MAX_EPOCHS
    and at most MAX_MAX_EPOCHS."""
    if not planned_epochs > 0:
        raise ValueError(f"planned epochs must be positive, not {planned_epochs}")
    want = math.ceil(LOOK_AHEAD * planned_epochs - 1e-9)
    return max(MIN_MAX_EPOCHS, min(MAX_MAX_EPOCHS, want))


def cost_sentence(
    folds: int, max_epochs: int, rows: int, planned_epochs: float | None = None
) -> str:
    """What the folds cost, in one sentence: each of the k folds trains max_epochs epochs on
    (k-1)/k of the rows, (k-1) x max_epochs epochs over the whole set in all (about
    (k-1) x LOOK_AHEAD times the planned training), plus one held-out evaluation pass over
    the rows per epoch."""
    k = min(folds, rows)
    whole = (k - 1) * max_epochs
    ratio = (
        f", about {whole / planned_epochs:.1f} times the planned {planned_epochs:g} epochs"
        if planned_epochs
        else ""
    )
    return (
        f"Cross-validation trains {k} folds x {max_epochs} epochs, each on {k - 1}/{k} of the "
        f"{rows:,} rows: {whole} epochs over the whole set before the real run{ratio}, "
        f"plus {max_epochs} evaluation passes over the rows."
    )
