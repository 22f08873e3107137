"""Several training files mixed with weights (spec.dataset.sources, kubetune.data.mixture):
the weights as repeat factors, the split before them (no row on both sides), each file with its
own format and mapping, and the plan counting what the trainer trains on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetune.data import DataError, Example
from kubetune.data.mixture import Source, training_rows, weighted
from kubetune.planning.job import build_plan, known_model_config
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

QWEN = known_model_config("hf://Qwen/Qwen2-0.5B")
GPU = (24.0, "GPU memory 24 GiB from a test")


def examples(n: int, tag: str) -> list[Example]:
    return [Example(i + 1, f"{tag} {i}?", f" answer {tag} {i}") for i in range(n)]


@pytest.mark.parametrize(
    ("weight", "size", "each"),
    [(1.0, 10, {1}), (2.0, 10, {2}), (3.0, 4, {3}), (0.5, 10, {0, 1}), (1.5, 10, {1, 2})],
)
def test_weights_are_repeat_factors(weight: float, size: int, each: set[int]) -> None:
    rows = list(range(size))
    out = weighted(rows, weight, seed=3)
    assert len(out) == round(weight * size)
    counts = Counter(out)
    assert {counts[r] for r in rows} == each
    assert weighted(rows, weight, seed=3) == out  # seeded
    if weight % 1:
        assert weighted(rows, weight, seed=4) != out or size < 3


def test_the_split_comes_before_the_weights() -> None:
    a, b = examples(30, "a"), examples(10, "b")
    train, held = training_rows([Source("a", a, 1.0), Source("b", b, 3.0)], None, 0.2, seed=7)
    assert len(held) == 8  # 20% of the 40 rows, from both files
    assert not {id(ex) for ex in held} & {id(ex) for ex in train}
    b_train = [ex for ex in b if all(ex is not h for h in held)]
    assert sum(1 for ex in train if ex in b_train) == 3 * len(b_train)
    assert len(train) == (30 + 10 - 8) + 2 * len(b_train)
    # A validation file: no split, every row trained on.
    train, held = training_rows([Source("a", a, 0.5)], examples(2, "v"), 0.2, seed=7)
    assert (len(train), len(held)) == (15, 2)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def spec(**dataset: Any) -> Any:
    base = {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": {"uri": "file:///d/a.jsonl"}}
    base["dataset"].update(dataset)
    return spec_from(base, "demo", "ns")


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def pc(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {"prompt": f"{tag} question {i}?", "completion": f" {tag} answer {i}."} for i in range(n)
    ]


def test_the_plan_mixes_files_of_their_own_format_and_mapping(tmp_path: Path) -> None:
    assert QWEN is not None
    csv = "q,a\n" + "".join(f"B question {i}?,B answer {i}.\n" for i in range(10))
    sources = [
        {"uri": "file:///d/b.csv", "weight": 2, "columns": {"prompt": "q", "completion": "a"}},
        {"uri": "file:///d/c.json", "weight": 0.5},
    ]
    extra = [(csv, "/d/b.csv"), (json.dumps(pc(20, "C")), "/d/c.json")]
    s = spec(sources=sources, validationSplit=0.1)
    plan = build_plan(s, jsonl(pc(30, "A")), "/d/a.jsonl", QWEN, "q", GPU, extra_sources=extra)
    # 60 rows, 6 held out; the trainer's own function gives the same count.
    from kubetune.data.formats import read_dataset

    rows = [
        Source("/d/a.jsonl", read_dataset(jsonl(pc(30, "A")), "/d/a.jsonl")[1], 1.0),
        Source(
            "/d/b.csv",
            read_dataset(csv, "/d/b.csv", columns={"prompt": "q", "completion": "a"})[1],
            2.0,
        ),
        Source("/d/c.json", read_dataset(json.dumps(pc(20, "C")), "/d/c.json")[1], 0.5),
    ]
    train, held = training_rows(rows, None, 0.1, 42)
    assert plan.example_count == len(train)
    assert len(held) == 6
    assert 30 + 2 * 10 + 10 - 6 - 6 <= plan.example_count <= 30 + 20 + 10
    mixture = plan.decision("data.mixture")
    assert mixture is not None
    assert mixture.value == "3"
    assert "/d/b.csv x2: " in mixture.sentence
    # Weighted copies are not reported as duplicates.
    assert not any("duplicate" in w for w in plan.warnings)


def test_every_file_must_hold_the_same_row_format() -> None:
    assert QWEN is not None
    s = spec(sources=[{"uri": "file:///d/t.txt"}])
    with pytest.raises(DataError, match=r"^/d/t\.txt: a plain text file holds Text rows"):
        build_plan(
            s, jsonl(pc(5, "A")), "/d/a.jsonl", QWEN, "q", GPU, extra_sources=[("x\n", "/d/t.txt")]
        )
    s = spec(sources=[{"uri": "file:///d/b.jsonl"}])
    chat = jsonl(
        [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    )
    with pytest.raises(DataError, match=r"^/d/b\.jsonl line 1: this row is Chat"):
        build_plan(
            s, jsonl(pc(5, "A")), "/d/a.jsonl", QWEN, "q", GPU, extra_sources=[(chat, "/d/b.jsonl")]
        )


def test_kubetune_plan_reads_every_source(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kubetune.cli import main

    a = write(tmp_path / "a.jsonl", jsonl(pc(20, "A")))
    b = write(tmp_path / "b.jsonl", jsonl(pc(10, "B")))
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
            "dataset": {
                "uri": f"file://{a}",
                "validationSplit": 0.1,
                "sources": [{"uri": f"file://{b}", "weight": 3}],
            },
            "planOnly": True,
        },
    }
    job = write(tmp_path / "job.yaml", json.dumps(manifest))
    result = CliRunner().invoke(main, ["plan", str(job), "-o", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # 30 rows, 3 held out; B's remaining rows three times.
    assert 20 + 30 - 3 * 3 <= plan["exampleCount"] <= 20 + 30 - 3
    assert any(d["key"] == "data.mixture" for d in plan["decisions"])
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert "30 PromptCompletion examples in 2 files" in result.output
    b.unlink()
    result = CliRunner().invoke(main, ["plan", str(job)])
    assert result.exit_code != 0
    assert f"spec.dataset.sources[0].uri: {b} does not exist" in result.output
