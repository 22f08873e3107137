"""Duplicates (exact and near), the grouped validation split and train/validation leakage
(kubetune.data.dedup, kubetune.data.quality), through the path the planner and the trainer
share (kubetune.data.mixture.mixed_rows), and their spec fields."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec
from kubetune.data.dedup import DedupSettings, cross_matches, group_rows, normalise, row_key
from kubetune.data.mixture import Source, mixed_rows
from kubetune.data.quality import grouped_split
from kubetune.data.stats import Example

pytestmark = pytest.mark.unit


def ex(line: int, prompt: str, target: str) -> Example:
    return Example(line, prompt, target)


def distinct(n: int, start: int = 0) -> list[Example]:
    """Rows no two of which are near duplicates (different words, not only numbers)."""
    words = ["apple", "river", "stone", "cloud", "forest", "candle", "mirror", "garden"]
    return [
        ex(
            i + 1,
            f"Tell me about {words[i % 8]} number {i} and {words[(i * 3 + 1) % 8]} {i * 7}. ",
            f"The {words[(i + 5) % 8]} {i} sits beside {words[(i * 5 + 2) % 8]} {i * 11 % 97}.",
        )
        for i in range(start, start + n)
    ]


def test_exact_duplicates_are_equal_after_normalising() -> None:
    assert normalise("  Hello\u00a0 WORLD\n") == "hello world"
    assert row_key(ex(1, "Q: Hi", " There")) == row_key(ex(2, "q:   hi", "there "))
    assert row_key(ex(1, "ab", "c")) != row_key(ex(2, "a", "bc"))  # the boundary matters


def test_groups_link_exact_and_near_duplicates_to_the_first_row() -> None:
    rows = distinct(6)
    text = "Explain how photosynthesis turns sunlight, water and carbon dioxide into sugar"
    rows += [
        ex(7, text + ".", " Plants use chlorophyll."),
        ex(8, text.upper() + ".", " plants use chlorophyll."),  # exact after normalising
        ex(9, text + "!", " Plants use chlorophyll."),  # near: one character
    ]
    groups = group_rows(rows, 0.9)
    assert groups.exact_of[7] == 6
    assert groups.group_of[6:] == [6, 6, 6]
    assert groups.group_of[:6] == list(range(6))
    assert (groups.count("exact"), groups.count("near")) == (1, 1)
    [near] = [m for m in groups.duplicates() if m.kind == "near"]
    assert (near.row, near.of) == (8, 6)
    assert 0.9 <= near.similarity < 1
    assert groups.kept(DedupSettings()) == [0, 1, 2, 3, 4, 5, 6]
    assert groups.kept(DedupSettings(near=False)) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert groups.kept(DedupSettings(exact=False, near=False)) == list(range(9))
    # Without near detection (threshold None) only the exact class is a group.
    assert group_rows(rows, None).group_of[8] == 8


def test_the_threshold_decides_what_is_near() -> None:
    a = ex(1, "", "The quick brown fox jumps over the lazy dog near the river bank today")
    b = ex(2, "", "The quick brown fox jumps over the lazy cat near the river bank today")
    assert group_rows([a, b], 0.9).group_of == [0, 1]
    assert group_rows([a, b], 0.6).group_of == [0, 0]


def test_the_grouped_split_never_separates_a_group_and_is_seeded() -> None:
    group_of = [0, 0, 0, 3, 4, 5, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    for seed in range(30):
        train, held = grouped_split(group_of, 0.2, seed)
        assert sorted(train + held) == list(range(20))
        assert len(held) == 4
        assert not {group_of[i] for i in train} & {group_of[i] for i in held}
    assert grouped_split(group_of, 0.2, 5) == grouped_split(group_of, 0.2, 5)
    # No duplicates: the plain seeded split of the rows.
    import random

    order = list(range(20))
    random.Random(3).shuffle(order)
    assert grouped_split(list(range(20)), 0.1, 3)[1] == sorted(order[:2])


def test_mixed_rows_remove_duplicates_across_files_before_the_split() -> None:
    a = distinct(40)
    copy = ex(3, a[10].prompt, a[10].target)
    b = [*distinct(10, 40), copy]
    rows = mixed_rows([Source("a.jsonl", a), Source("b.jsonl", b)], None, 0.1, 42)
    q = rows.quality
    assert (q.rows, q.exact, q.removed_exact, q.near) == (51, 1, 1, 0)
    assert q.examples == ["b.jsonl line 3 = a.jsonl line 11"]
    assert len(rows.train) + len(rows.validation) == 50
    assert len(rows.validation) == 5
    assert q.leaked == 0
    kept = mixed_rows(
        [Source("a.jsonl", a), Source("b.jsonl", b)], None, 0.1, 42, DedupSettings(exact=False)
    )
    assert kept.quality.kept_duplicates == 1
    assert len(kept.train) + len(kept.validation) == 51
    # Kept duplicates are kept on one side of the split, whatever the seed.
    for seed in range(20):
        r = mixed_rows(
            [Source("a", a), Source("b", b)], None, 0.3, seed, DedupSettings(exact=False)
        )
        assert (copy in r.train) == (a[10] in r.train)
        assert r.quality.leaked == 0


def test_leakage_is_measured_against_a_validation_file() -> None:
    train = distinct(30)
    validation = [
        ex(1, train[4].prompt.upper(), train[4].target),  # exact after normalising
        ex(2, train[9].prompt.replace(".", "!"), train[9].target),  # near
        *distinct(3, 100),
    ]
    rows = mixed_rows([Source("t.jsonl", train)], validation, 0.1, 42, validation_name="v.jsonl")
    q = rows.quality
    assert (q.validation, q.validation_rows, q.leaked_exact, q.leaked_near) == ("file", 5, 1, 1)
    assert q.leakage_examples[0] == "v.jsonl line 1 = t.jsonl line 5"
    assert q.leakage_examples[1].startswith("v.jsonl line 2 ~ t.jsonl line 10 (0.")
    assert rows.validation == validation  # reported, not removed: the user's held-out set
    matches = cross_matches(validation, train, None)
    assert [m.kind for m in matches] == ["exact"]


def test_two_hundred_rows_cost_little() -> None:
    """The operator plans in-process: deduplicating 200 rows stays in milliseconds per row
    (measured about 0.1 ms a row; the bound leaves room for a loaded machine)."""
    rows = distinct(200)
    mixed_rows([Source("warm", rows[:5])], None, 0.1, 1)
    start = time.perf_counter()
    mixed_rows([Source("t", rows)], None, 0.1, 1)
    assert (time.perf_counter() - start) / len(rows) < 0.005


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_the_band_index_finds_what_datasketchs_lsh_finds(threshold: float) -> None:
    """The numpy band index (kubetune.data.dedup._band_ids) gives for every row exactly the
    candidates datasketch's MinHashLSH with the same bands and rows returns."""
    import random

    from datasketch import MinHashLSH

    from kubetune.data.dedup import NUM_PERM, Hasher, _band_ids, _bands, _shared_buckets

    rng = random.Random(7)
    base = distinct(60)
    rows = list(base)
    for i in range(120):  # edited copies: some near duplicates, some not
        src = rng.choice(base)
        words = src.prompt.split()
        for _ in range(rng.randint(0, 4)):
            words[rng.randrange(len(words))] = rng.choice(["x", "blue", "seven", "tide"])
        rows.append(ex(61 + i, " ".join(words), src.target))
    hashes = Hasher().minhashes(rows)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=_bands(threshold))
    for i, mh in enumerate(hashes):
        lsh.insert(i, mh)
    shared = _shared_buckets(_band_ids(hashes, threshold))
    for i, mh in enumerate(hashes):
        assert shared.get(i, {i}) == set(lsh.query(mh)), i
    assert any(len(v) > 1 for v in shared.values())  # the test has candidates at all


def spec(**dataset: object) -> dict[str, object]:
    return {"model": {"uri": "hf://org/name"}, "dataset": {"uri": "pvc://d/t.jsonl", **dataset}}


def test_spec_defaults_and_errors_name_the_field() -> None:
    parsed = FineTuneJobSpec.model_validate(spec())
    d = parsed.dataset.deduplicate
    assert (d.exact, d.near, d.threshold) == (True, True, 0.9)
    with pytest.raises(ValidationError, match=r"dataset\.deduplicate\.threshold"):
        FineTuneJobSpec.model_validate(spec(deduplicate={"threshold": 0.2}))
    with pytest.raises(ValidationError, match=r"dataset\.deduplicate\.exakt"):
        FineTuneJobSpec.model_validate(spec(deduplicate={"exakt": True}))
    hub = FineTuneJobSpec.model_validate(
        spec(uri="hf://datasets/acme/support", hub={"config": "tiny", "revision": "v1"})
    ).dataset.hub
    assert hub is not None
    assert (hub.config, hub.split, hub.revision) == ("tiny", "train", "v1")
    with pytest.raises(ValidationError, match=r"dataset\.uri must be .*hf://datasets/org/name"):
        FineTuneJobSpec.model_validate(spec(uri="hf://datasets/acme/support/more"))
    with pytest.raises(ValueError, match=r"spec\.dataset\.deduplicate\.threshold"):
        DedupSettings(threshold=0)


def test_kubetune_validate_reports_duplicates_and_leakage(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from kubetune.cli import main

    rows = [{"prompt": e.prompt, "completion": e.target} for e in distinct(30)]
    rows.append({"prompt": rows[2]["prompt"].upper(), "completion": rows[2]["completion"]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(rows[5]) + "\n" + json.dumps(rows[6]).replace(".", "!") + "\n")
    job = tmp_path / "job.yaml"

    def validate(**dataset: object) -> str:
        manifest = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
                "dataset": {"uri": f"file://{data}", **dataset},
            },
        }
        job.write_text(json.dumps(manifest))
        result = CliRunner().invoke(main, ["validate", str(job)])
        assert result.exit_code == 0, result.output
        return str(result.output)

    out = validate()
    assert "1 exact (removed)" in out
    assert f"{data} line 31 = line 3" in out
    assert "exact duplicates; they are trained on" not in out
    out = validate(validationUri=f"file://{val}", deduplicate={"near": False})
    assert "warning: 2 of 2 validation rows duplicate training rows (1 exact, 1 near" in out
