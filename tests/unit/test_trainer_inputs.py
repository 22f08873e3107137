"""One contract for the trainer's inputs: every input a spec names reaches the trainer, in the
pod the operator builds and in `kubetune run`, under the variable `kubetune.contract` gives
its role, and the trainer's configuration reads it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.inputs import INPUT_FIELDS, trainer_input_uris
from kubetune.contract import INPUT_ENV, MAX_DATA_SOURCES, Env
from kubetune.local_run import prepare_local_run
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings
from kubetune.planning import bundled_architectures
from kubetune.trainer.config import load_config
from tests.plans import plan_document
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit


def _rows(first: int, count: int) -> str:
    return "".join(
        json.dumps({"prompt": f"What is herb {i}?", "completion": f" Herb {i}: a plant."}) + "\n"
        for i in range(first, first + count)
    )


def _every_input(root: Path) -> dict[str, Any]:
    """A spec that names every input the trainer reads, as local files."""
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(bundled_architectures()["pythia-160m"].read_text())
    previous = root / "previous"
    previous.mkdir()
    writer = root / "writer"
    writer.mkdir()
    (writer / "config.json").write_text((model / "config.json").read_text())
    for name, text in (
        ("train.jsonl", _rows(0, 40)),
        ("val.jsonl", _rows(40, 8)),
        ("general.txt", "Some text."),
    ):
        (root / name).write_text(text)
    sources = []
    for i in range(MAX_DATA_SOURCES):  # every source role, each file in its own format
        ext = ("json", "csv", "jsonl")[i % 3]
        rows = [json.loads(line) for line in _rows(100 + 10 * i, 3).splitlines()]
        path = root / f"extra{i}.{ext}"
        if ext == "json":
            path.write_text(json.dumps(rows))
        elif ext == "csv":
            path.write_text(
                "q,a\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in rows)
            )
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        source: dict[str, Any] = {"uri": f"file://{path}", "weight": 0.5 + i}
        if ext == "csv":
            source["columns"] = {"prompt": "q", "completion": "a"}
        sources.append(source)
    return {
        "model": {"uri": f"file://{model}", "from": f"file://{previous}"},
        "dataset": {
            "uri": f"file://{root / 'train.jsonl'}",
            "validationUri": f"file://{root / 'val.jsonl'}",
            "generalTextUri": f"file://{root / 'general.txt'}",
            "sources": sources,
        },
        "augmentation": {"paraphrases": 1, "modelUri": f"file://{writer}"},
    }


def test_every_role_has_a_variable_and_a_field() -> None:
    assert set(INPUT_ENV) == set(INPUT_FIELDS)


def test_a_spec_with_every_input_names_every_role(tmp_path: Path) -> None:
    spec = spec_from(_every_input(tmp_path), "demo", "team-a")
    assert set(trainer_input_uris(spec)) == set(INPUT_ENV)


def test_every_input_reaches_the_training_pod_and_the_prepare_pod(tmp_path: Path) -> None:
    spec = spec_from(_every_input(tmp_path), "demo", "team-a")
    ref = builders.JobRef(name="demo", namespace="team-a", uid="u-1")
    plan = plan_document()
    for job in (
        builders.training_job(ref, spec, plan, OperatorSettings()),
        builders.prepare_job(ref, spec, OperatorSettings(), 80.0),
    ):
        env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        missing = {role for role, name in INPUT_ENV.items() if name not in env}
        assert missing == set(), f"{job['metadata']['name']} lacks {missing}"


def test_every_input_reaches_a_local_run_and_the_trainer_reads_it(tmp_path: Path) -> None:
    spec = _every_input(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "demo"},
                "spec": spec,
            }
        )
    )
    run = prepare_local_run(job, nproc=1, output=tmp_path / "out", metrics_port=0)
    missing = {role for role, name in INPUT_ENV.items() if not run.env.get(name)}
    assert missing == set()
    # The job keeps its own name (not a source file's).
    assert (run.name, run.env[Env.JOB_NAME]) == ("demo", "demo")
    # The user's general text, not the shipped English text, is what the trainer reads.
    general = Path(run.env[Env.GENERAL_TEXT_PATH])
    assert general.read_text() == "Some text."
    cfg = load_config(run.config_dir, run.env)
    assert cfg.general_text == str(general)
    assert cfg.validation == run.env[Env.VALIDATION_PATH]
    assert Path(cfg.model) == tmp_path / "model"
    assert run.env[Env.PREVIOUS_PATH] == str(tmp_path / "previous")
    assert run.env[Env.AUGMENTATION_MODEL_PATH] == str(tmp_path / "writer")
    # Each source's copy keeps its format, and the trainer reads them as the plan did.
    assert [Path(p).suffix for p in cfg.sources] == [
        (".json", ".csv", ".jsonl")[i % 3] for i in range(MAX_DATA_SOURCES)
    ]
    from kubetune.trainer.data import read_sources, training_rows

    _, sources, validation = read_sources(cfg.spec, cfg.dataset, cfg.sources, cfg.validation)
    assert [len(s.examples) for s in sources] == [40] + [3] * MAX_DATA_SOURCES
    train, held = training_rows(sources, validation, 0.1, cfg.seed)
    assert len(held) == 8
    assert len(train) == cfg.plan.example_count


@pytest.mark.parametrize(
    ("installed", "problem"),
    [
        (None, "bitsandbytes, which is not installed"),
        ("0.45.1", "on the CPU needs bitsandbytes >= 0.46 (its CPU 4-bit path); 0.45.1"),
        ("0.50.2", None),
    ],
)
def test_a_local_qlora_run_needs_bitsandbytes_with_this_devices_4_bit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: str | None, problem: str | None
) -> None:
    from kubetune.local_inputs import InputError
    from kubetune.trainer import model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(bundled_architectures()["pythia-160m"].read_text())
    (tmp_path / "train.jsonl").write_text(_rows(0, 40))
    spec = {
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {"uri": f"file://{tmp_path / 'train.jsonl'}"},
        "method": {"type": "QLoRA"},
    }
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "spec": spec})
    )
    monkeypatch.setattr(model, "bitsandbytes_version", lambda: installed)
    monkeypatch.setattr("kubetune.local_run._cuda_devices", lambda: 0)
    if problem is None:
        run = prepare_local_run(job, nproc=1, output=tmp_path / "out", metrics_port=0)
        assert run.plan.method == "QLoRA"
        assert run.plan.hyperparameters.compute_dtype == "float32"
    else:
        with pytest.raises(InputError, match=r"^spec\.method\.type: ") as caught:
            prepare_local_run(job, nproc=1, output=tmp_path / "out", metrics_port=0)
        assert problem in str(caught.value)
