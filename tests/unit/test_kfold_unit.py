"""k-fold cross-validation of the epoch count, the pure parts: when it runs, the folds, the
choice of epoch, how far the folds look and what they cost."""

from __future__ import annotations

import math

import pytest

from kubetune.planning.kfold import (
    KFOLD_BELOW,
    MAX_MAX_EPOCHS,
    choose_epoch,
    cost_sentence,
    fold_indices,
    max_epochs_for,
    mode_on,
)

pytestmark = pytest.mark.unit


# ---- mode_on ----------------------------------------------------------------------------------


def test_auto_is_on_for_tiny_sets_without_epochs() -> None:
    on, why = mode_on("Auto", KFOLD_BELOW - 1, epochs_set=False)
    assert on
    assert "199" in why
    assert str(KFOLD_BELOW) in why
    assert why.endswith(".")


@pytest.mark.parametrize("examples", [KFOLD_BELOW, 5000])
def test_auto_is_off_from_the_threshold_on(examples: int) -> None:
    on, why = mode_on("Auto", examples, epochs_set=False)
    assert not on
    assert f"{examples:,}" in why
    assert "not fewer" in why


def test_auto_is_off_when_epochs_are_set() -> None:
    on, why = mode_on("Auto", 40, epochs_set=True)
    assert not on
    assert "epochs is set" in why


@pytest.mark.parametrize("epochs_set", [False, True])
def test_on_is_on_whatever_the_size(epochs_set: bool) -> None:
    on, why = mode_on("On", 10_000, epochs_set=epochs_set)
    assert on
    assert ("in place of spec.hyperparameters.epochs" in why) == epochs_set


@pytest.mark.parametrize("examples", [0, 40, 10_000])
def test_off_is_off(examples: int) -> None:
    assert mode_on("Off", examples, epochs_set=False) == (
        False,
        "Cross-validation: off, as crossValidation.mode says.",
    )


@pytest.mark.parametrize("mode", ["Auto", "On"])
@pytest.mark.parametrize("examples", [0, 1])
def test_fewer_than_two_examples_cannot_be_folded(mode: str, examples: int) -> None:
    on, why = mode_on(mode, examples, epochs_set=False)
    assert not on
    assert "cannot be split" in why


def test_an_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="Auto, On or Off"):
        mode_on("auto", 40, epochs_set=False)


# ---- fold_indices -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(2, 2), (10, 3), (40, 4), (41, 4), (199, 10), (7, 7)])
def test_every_index_is_held_out_exactly_once_in_even_folds(n: int, k: int) -> None:
    folds = fold_indices(n, k, seed=3)
    assert len(folds) == k
    held = [j for _, h in folds for j in h]
    assert sorted(held) == list(range(n))
    sizes = [len(h) for _, h in folds]
    assert max(sizes) - min(sizes) <= 1
    for train, h in folds:
        assert train == sorted(train)
        assert h == sorted(h)
        assert sorted(train + h) == list(range(n))
        assert not set(train) & set(h)


def test_folds_are_deterministic_and_shuffled_by_the_seed() -> None:
    assert fold_indices(40, 4, seed=7) == fold_indices(40, 4, seed=7)
    assert fold_indices(40, 4, seed=7) != fold_indices(40, 4, seed=8)
    # Shuffled: the first fold is not simply a block of consecutive indices.
    held = fold_indices(40, 4, seed=7)[0][1]
    assert held != list(range(held[0], held[0] + len(held)))


@pytest.mark.parametrize(("n", "k", "folds"), [(3, 10, 3), (1, 4, 1), (0, 4, 0)])
def test_k_is_clamped_to_n(n: int, k: int, folds: int) -> None:
    result = fold_indices(n, k, seed=0)
    assert len(result) == folds
    assert all(len(h) == 1 for _, h in result)


@pytest.mark.parametrize(("n", "k"), [(-1, 2), (10, 0)])
def test_bad_fold_arguments_are_errors(n: int, k: int) -> None:
    with pytest.raises(ValueError, match="fold_indices needs"):
        fold_indices(n, k, seed=0)


# ---- choose_epoch -----------------------------------------------------------------------------


def test_the_epoch_with_the_lowest_mean_is_chosen() -> None:
    best, mean = choose_epoch([[3.0, 2.0, 2.5], [3.0, 2.4, 1.9]])
    assert mean == pytest.approx([3.0, 2.2, 2.2])
    assert best == 2  # a tie between epochs 2 and 3 goes to fewer epochs


def test_ties_go_to_fewer_epochs() -> None:
    assert choose_epoch([[1.0, 1.0, 1.0]]) == (1, [1.0, 1.0, 1.0])


def test_a_steadily_falling_curve_chooses_the_last_epoch() -> None:
    assert choose_epoch([[4.0, 3.0, 2.0, 1.5], [4.2, 3.1, 2.2, 1.4]])[0] == 4


def test_short_curves_cut_the_mean_to_the_shortest() -> None:
    best, mean = choose_epoch([[3.0, 2.0, 1.0, 0.5], [3.0, 2.5]])
    assert mean == pytest.approx([3.0, 2.25])
    assert best == 2


def test_a_diverged_epoch_is_never_chosen() -> None:
    best, mean = choose_epoch([[2.0, 1.0, math.nan], [2.0, 1.5, 0.1]])
    assert best == 2
    assert mean[2] == math.inf
    assert choose_epoch([[math.inf, math.nan]])[0] == 1


@pytest.mark.parametrize("curves", [[], [[]], [[1.0], []]])
def test_empty_curves_are_errors(curves: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="non-empty curve"):
        choose_epoch(curves)


# ---- max_epochs_for and cost_sentence ---------------------------------------------------------


@pytest.mark.parametrize(
    ("planned", "expected"),
    [(0.5, 2), (1, 2), (2, 3), (3, 5), (4, 6), (10, 15), (2.5, 4), (100, MAX_MAX_EPOCHS)],
)
def test_the_folds_look_half_again_as_far_as_planned(planned: float, expected: int) -> None:
    assert max_epochs_for(planned) == expected


@pytest.mark.parametrize("planned", [0, -1.0])
def test_planned_epochs_must_be_positive(planned: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        max_epochs_for(planned)


def test_the_cost_sentence_counts_the_epochs_over_the_whole_set() -> None:
    text = cost_sentence(4, 15, 120)
    assert text.startswith("Cross-validation trains 4 folds x 15 epochs, each on 3/4 of the 120")
    assert "45 epochs over the whole set" in text
    assert "15 evaluation passes" in text
    assert text.endswith(".")
    assert text.count(".") == 1


def test_the_cost_sentence_compares_with_the_planned_training() -> None:
    text = cost_sentence(4, 15, 120, planned_epochs=10)
    # (k - 1) x 1.5: folds x max_epochs epochs over (k-1)/k of the rows.
    assert "about 4.5 times the planned 10 epochs" in text


def test_the_cost_sentence_clamps_the_folds_to_the_rows() -> None:
    assert "trains 3 folds x 2 epochs, each on 2/3 of the 3 rows" in cost_sentence(10, 2, 3)


def test_grouped_folds_keep_augmented_rows_with_their_source() -> None:
    from kubetune.planning.kfold import grouped_folds

    # rows 0-3 are originals (lines 1-4), rows 4-7 their augmented copies, in that order
    lines = [1, 2, 3, 4, 1, 2, 3, 4]
    folds = grouped_folds(lines, len(lines), 2, seed=0)
    assert len(folds) == 2
    held_all: list[int] = []
    for train, held in folds:
        held_lines = {lines[i] for i in held}
        assert not held_lines & {lines[i] for i in train}  # no copy of a held-out source
        assert all(i < 4 for i in held)  # only the originals are judged
        assert len(train) == 2 * (4 - len(held))
        held_all += held
    assert sorted(held_all) == [0, 1, 2, 3]
    assert grouped_folds(None, 5, 2, seed=0) == fold_indices(5, 2, 0)
