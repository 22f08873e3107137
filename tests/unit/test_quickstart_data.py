"""The quickstart's data: the checked-in files are exactly what the generator writes, the
ConfigMap in examples/quickstart.yaml inlines them, and the data is clean."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GENERATOR = EXAMPLES / "data" / "make_quickstart.py"
TRAIN = EXAMPLES / "data" / "quickstart-train.jsonl"
VALIDATION = EXAMPLES / "data" / "quickstart-validation.jsonl"
JOB = EXAMPLES / "quickstart.yaml"


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _config_map() -> dict[str, str]:
    docs = list(yaml.safe_load_all(JOB.read_text(encoding="utf-8")))
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(maps) == 1
    assert maps[0]["metadata"]["name"] == "quickstart-data"
    data: dict[str, str] = maps[0]["data"]
    return data


def test_generator_reproduces_the_checked_in_files(tmp_path: Path) -> None:
    yaml_out = tmp_path / "quickstart.yaml"
    subprocess.run(
        [sys.executable, str(GENERATOR), "--data-dir", str(tmp_path), "--yaml", str(yaml_out)],
        check=True,
        capture_output=True,
    )
    for committed in (TRAIN, VALIDATION):
        assert (tmp_path / committed.name).read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: run python {GENERATOR.relative_to(ROOT)}"
        )
    assert yaml_out.read_bytes() == JOB.read_bytes()


def test_config_map_inlines_the_files() -> None:
    data = _config_map()
    assert set(data) == {"train.jsonl", "validation.jsonl"}
    assert data["train.jsonl"] == TRAIN.read_text(encoding="utf-8")
    assert data["validation.jsonl"] == VALIDATION.read_text(encoding="utf-8")
    assert len(JOB.read_bytes()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB


def test_the_job_uses_the_config_map_and_the_builtin_model() -> None:
    docs = list(yaml.safe_load_all(JOB.read_text(encoding="utf-8")))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("v1", "ConfigMap"),
        ("kubetune.dev/v1alpha1", "FineTuneJob"),
    ]
    spec = docs[1]["spec"]
    assert spec["model"]["uri"] == "hf://kubetune/tiny-llama-en"
    assert spec["dataset"]["uri"] == "configmap://quickstart-data/train.jsonl"
    assert spec["dataset"]["validationUri"] == "configmap://quickstart-data/validation.jsonl"
    assert spec["dataset"]["format"] == "PromptCompletion"
    assert spec["resources"] == {"numNodes": 1, "gpusPerNode": 0}


def test_counts_duplicates_and_overlap() -> None:
    train, validation = _rows(TRAIN), _rows(VALIDATION)
    assert len(train) == 300
    assert len(validation) == 40
    for row in train + validation:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].strip()
        assert row["completion"].startswith(" ")
        assert row["completion"].rstrip().endswith(".")

    def key(row: dict[str, str]) -> str:
        return row["prompt"] + row["completion"]

    assert len({key(r) for r in train}) == len(train)
    assert len({key(r) for r in validation}) == len(validation)
    assert not {key(r) for r in train} & {key(r) for r in validation}
    # Stronger than no exact overlap: no plant name of the validation set is trained on.
    train_terms = {r["completion"].split(":")[0].strip() for r in train}
    val_terms = {r["completion"].split(":")[0].strip() for r in validation}
    assert len(train_terms) == len(train)
    assert len(val_terms) == len(validation)
    assert not train_terms & val_terms


def test_every_validation_part_is_taught_in_training() -> None:
    gen = runpy.run_path(str(GENERATOR))
    places, plants = gen["PLACES"], gen["PLANTS"]
    train_text = TRAIN.read_text(encoding="utf-8")
    for row in _rows(VALIDATION):
        term = row["completion"].split(":")[0].strip().lower()
        place = next(p for p in places if term.startswith(p))
        plant = term[len(place) :]
        assert plant in plants
        assert places[place][1] in train_text
        assert plants[plant][1] in train_text
