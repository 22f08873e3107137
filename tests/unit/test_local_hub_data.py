"""`kubetune plan` and `kubetune validate` read hub datasets on this machine as the prepare pod
does (kubetune.local_inputs.read_data): a whole repository `hf://datasets/org/name` with
spec.dataset.hub's config and split, a hub validationUri at its split "validation" and a hub
dataset among spec.dataset.sources, all through a hub cache the test lays out (HF_HUB_OFFLINE=1); a
repository the cache (or the hub) does not have fails, naming the source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from kubetune.cli import main
from tests.unit.hubcache import hub_env, parquet_dataset_repo

pytestmark = pytest.mark.unit

COLUMNS = {"prompt": "question", "completion": "answer"}


def cli(tmp_path: Path, command: str, dataset: dict[str, Any], *args: str) -> Result:
    job = tmp_path / "job.yaml"
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": dataset},
    }
    job.write_text(json.dumps(manifest))
    return CliRunner().invoke(main, [command, str(job), *args])


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    parquet_dataset_repo(tmp_path / "hub", "acme/support", rows=30, validation=6)
    with hub_env(monkeypatch, tmp_path / "hub"):
        yield


@pytest.mark.usefixtures("hub")
def test_plan_reads_a_parquet_hub_dataset_and_its_validation_split(tmp_path: Path) -> None:
    dataset = {"uri": "hf://datasets/acme/support", "columns": COLUMNS}
    result = cli(tmp_path, "plan", dataset, "-o", "json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["exampleCount"] == 27  # 3 of the 30 train rows are the random validation split
    assert plan["datasetFormat"] == "PromptCompletion"
    # A hub validationUri is read at the split "validation", so all 30 train rows train.
    dataset["validationUri"] = "hf://datasets/acme/support"
    result = cli(tmp_path, "plan", dataset, "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["exampleCount"] == 30


@pytest.mark.usefixtures("hub")
def test_validate_reads_the_config_and_split_of_spec_dataset_hub(tmp_path: Path) -> None:
    dataset = {"uri": "hf://datasets/acme/support", "columns": COLUMNS}
    result = cli(tmp_path, "validate", dataset)
    assert result.exit_code == 0, result.output
    assert "hf://datasets/acme/support (train): 30 PromptCompletion examples" in result.output
    hub = {"config": "default", "split": "validation", "revision": "main"}
    result = cli(tmp_path, "validate", {"uri": "hf://acme/support", "hub": hub, "columns": COLUMNS})
    assert result.exit_code == 0, result.output
    assert "hf://acme/support@main (default, validation): 6 PromptCompletion" in result.output
    # Without the mapping the Parquet columns are not rows kubetune knows: named with the row.
    result = cli(tmp_path, "validate", {"uri": "hf://datasets/acme/support"})
    assert result.exit_code == 1
    assert "hf://datasets/acme/support (train) row 1: " in result.output
    result = cli(tmp_path, "validate", {**dataset, "hub": {"split": "test"}})
    assert result.exit_code == 1
    assert 'Unknown split "test"' in result.output
    assert "spec.dataset.hub" in result.output


@pytest.mark.usefixtures("hub")
def test_a_hub_dataset_as_one_of_the_mixed_sources(tmp_path: Path) -> None:
    source = {"uri": "hf://datasets/acme/support", "columns": COLUMNS, "weight": 2}
    data = tmp_path / "local.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}."}) + "\n" for i in range(8))
    )
    result = cli(tmp_path, "validate", {"uri": f"file://{data}", "sources": [source]})
    assert result.exit_code == 0, result.output
    assert "38 PromptCompletion examples in 2 files" in result.output


@pytest.mark.usefixtures("hub")
def test_a_hub_dataset_that_is_not_there_fails_naming_it(tmp_path: Path) -> None:
    for command in ("validate", "plan"):
        result = cli(tmp_path, command, {"uri": "hf://datasets/acme/nothing"})
        assert result.exit_code == 1, result.output
        assert "hf://datasets/acme/nothing (train): cannot fetch the dataset repository" in (
            result.output
        )
        assert "HF_HUB_OFFLINE=1" in result.output
