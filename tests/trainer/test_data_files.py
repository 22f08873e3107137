"""The trainer reads the data files the planner read (kubetune.data.formats through the
datasets library) with the spec's column mapping, and leaves out the rows the plan dropped as
too long (spec.dataset.overlongRows: Drop): its datasets hold what the plan counted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

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
    # Well over maxSeqLength 32, and different (two equal ones would be near duplicates).
    rows[5]["a"] = " ".join(f"item {i}" for i in range(60))
    rows[17]["a"] = " ".join(f"piece {i}" for i in range(60, 120))
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


def _inputs(run: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from kubetune.trainer.config import load_config
    from kubetune.trainer.setup import load_inputs

    config_dir = Path(run.env["KUBETUNE_OUTPUT_PATH"]).parent / "config"
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    return load_inputs(load_config(config_dir))


@pytest.mark.parametrize("remove", [True, False])
def test_duplicates_are_removed_and_kept_on_one_side_as_the_plan_says(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, remove: bool
) -> None:
    import json

    from tests.unit.test_data_dedup import distinct

    rows = [{"prompt": e.prompt, "completion": e.target} for e in distinct(40)]
    rows += [dict(rows[3]) for _ in range(3)]  # exact copies
    rows += [{"prompt": rows[7]["prompt"] + "!", "completion": rows[7]["completion"]}]  # near
    run = make_run(
        data="\n".join(json.dumps(r) for r in rows),
        spec_extra={
            "dataset": {
                "uri": "file:///data/train.jsonl",
                "validationSplit": 0.25,
                "deduplicate": {"exact": remove, "near": remove},
            }
        },
    )
    plan = run.plan
    found = next(d for d in plan["decisions"] if d["key"] == "data.duplicates")
    assert found["value"] == "4"
    assert "train.jsonl line 42 = line 4" in found["sentence"]
    leakage = next(d for d in plan["decisions"] if d["key"] == "data.leakage")
    assert leakage["value"] == "0"
    inputs = _inputs(run, monkeypatch)
    assert len(inputs.train_ds) == plan["exampleCount"]
    assert inputs.val_ds is not None
    assert len(inputs.train_ds) + len(inputs.val_ds) == (40 if remove else 44)
    assert inputs.train_ds.token_count == plan["tokenCount"]
    train_rows = {tuple(r["input_ids"]) for r in inputs.train_ds.rows}
    assert not any(tuple(r["input_ids"]) in train_rows for r in inputs.val_ds.rows)
    if not remove:
        assert any("duplicate training examples kept" in w for w in plan["warnings"])


def test_a_hub_dataset_gives_the_trainer_the_rows_the_plan_counted(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Parquet dataset repository in the hub cache, offline: the planner (as the prepare
    step reads it) and the trainer read the same split and the same rows."""
    import json

    from kubetune.api import parse_job
    from kubetune.data.hub import HubDataset
    from kubetune.planning.job import build_plan
    from tests.unit.hubcache import hub_env, parquet_dataset_repo

    parquet_dataset_repo(tmp_path / "hub", "acme/flowers", rows=40, validation=6)
    run = make_run(rows=10)
    config_dir = Path(run.env["KUBETUNE_OUTPUT_PATH"]).parent / "config"
    spec_dict = json.loads((config_dir / "spec.json").read_text())
    spec_dict["dataset"] = {
        "uri": "hf://datasets/acme/flowers",
        "validationUri": "hf://datasets/acme/flowers",
        "columns": {"prompt": "question", "completion": "answer"},
        "hub": {"revision": "main"},
    }
    job = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}}
    spec = parse_job({**job, "spec": spec_dict}).spec
    model = Path(run.env["KUBETUNE_MODEL_PATH"])
    with hub_env(monkeypatch, tmp_path / "hub"):
        uri = "hf://datasets/acme/flowers"
        plan = build_plan(
            spec,
            HubDataset(uri, revision="main"),
            uri,
            json.loads((model / "config.json").read_text()),
            str(model),
            (8.0, "test"),
            HubDataset(uri, split="validation", revision="main"),
            uri,
        ).to_json()
        (config_dir / "spec.json").write_text(json.dumps(spec_dict))
        (config_dir / "plan.json").write_text(json.dumps(plan))
        run.env["KUBETUNE_DATASET_PATH"] = run.env["KUBETUNE_VALIDATION_PATH"] = uri
        inputs = _inputs(run, monkeypatch)
    assert plan["exampleCount"] == len(inputs.train_ds) == 40
    assert inputs.val_ds is not None
    assert len(inputs.val_ds) == 6
    assert inputs.train_ds.token_count == plan["tokenCount"]
