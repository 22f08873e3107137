"""The trainer reads the data files the planner read (kubetune.data.formats through the
datasets library) with the spec's column mapping, and leaves out the rows the plan dropped as
too long (spec.dataset.overlongRows: Drop): its datasets hold what the plan counted."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.trainer.conftest import MakeRun

pytestmark = pytest.mark.trainer


def _parquet(rows: list[dict[str, str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


@pytest.mark.parametrize("overlong", ["Drop", "Truncate"])
def test_a_mapped_parquet_file_with_overlong_rows(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, overlong: str
) -> None:
    from kubetune.trainer.config import load_config
    from kubetune.trainer.setup import load_inputs

    rows = [{"q": f"Define term {i}: ", "a": f"Term {i} means item {i}."} for i in range(40)]
    long = " ".join(f"item {i}" for i in range(60))  # well over maxSeqLength 32
    rows[5]["a"] = rows[17]["a"] = long
    run = make_run(
        data_file=("train.parquet", _parquet(rows)),
        spec_extra={
            "dataset": {
                "uri": "file:///data/train.parquet",
                "columns": {"prompt": "q", "completion": "a"},
                "maxSeqLength": 32,
                "overlongRows": overlong,
            }
        },
    )
    plan = run.plan
    assert plan["tokenCountEstimated"] is False  # the tiny model's tokenizer.json
    if overlong == "Drop":
        dropped = next(d for d in plan["decisions"] if d["key"] == "data.overlong")
        assert dropped["value"] == "2"
        assert "row 6" in dropped["sentence"]  # Parquet rows are counted from 1
    else:
        [warning] = [w for w in plan["warnings"] if "longer than the planned" in w]
        assert warning.startswith("2 of ")
        assert "row 6, " in warning
    config_dir = Path(run.env["KUBETUNE_OUTPUT_PATH"]).parent / "config"
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    inputs = load_inputs(load_config(config_dir))
    rows_left = 38 if overlong == "Drop" else 40
    held_out = round(rows_left * 0.1)
    assert len(inputs.train_ds) == plan["exampleCount"] == rows_left - held_out
    assert inputs.val_ds is not None
    assert len(inputs.val_ds) == held_out
    assert inputs.train_ds.token_count == plan["tokenCount"]
    seq_len = plan["hyperparameters"]["sequenceLength"]
    assert max(len(r["input_ids"]) for r in inputs.train_ds.rows) <= seq_len


def test_weighted_sources_give_the_trainer_the_rows_the_plan_counted(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from kubetune.trainer.config import load_config
    from kubetune.trainer.setup import load_inputs

    main = [
        {"prompt": f"Define term {i}: ", "completion": f"Term {i} means item {i}."}
        for i in range(30)
    ]
    csv = "question,answer\n" + "".join(f"Name {i}?,Name {i} is thing {i}.\n" for i in range(12))
    chat = [
        {"prompt": f"Refer to {i}: ", "completion": f"Term {i} refers to object {i}."}
        for i in range(10)
    ]
    run = make_run(
        data="\n".join(json.dumps(r) for r in main),
        source_files=[("extra.csv", csv.encode()), ("more.json", json.dumps(chat).encode())],
        spec_extra={
            "dataset": {
                "uri": "file:///data/train.jsonl",
                "sources": [
                    {
                        "uri": "file:///data/extra.csv",
                        "weight": 2,
                        "columns": {"prompt": "question", "completion": "answer"},
                    },
                    {"uri": "file:///data/more.json", "weight": 0.5},
                ],
            }
        },
    )
    plan = run.plan
    config_dir = Path(run.env["KUBETUNE_OUTPUT_PATH"]).parent / "config"
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    inputs = load_inputs(load_config(config_dir))
    assert len(inputs.train_ds) == plan["exampleCount"]
    assert inputs.val_ds is not None
    assert len(inputs.val_ds) == 5  # 10% of the 52 rows, before the weights
    assert inputs.train_ds.token_count == plan["tokenCount"]
    decision = next(d for d in plan["decisions"] if d["key"] == "data.mixture")
    assert "extra.csv x2: " in decision["sentence"]
