"""Fixtures for the trainer tier: a tiny random Llama with its own BPE tokenizer, built
locally (no hub), and a helper that lays out one training run like the operator does."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import rows as tiny_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class Run:
    command: list[str]
    env: dict[str, str]
    output: Path
    plan: dict[str, Any]

    def termination(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.output / "termination.json").read_text())
        return data

    def history(self) -> list[dict[str, Any]]:
        lines = (self.output / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


MakeRun = Callable[..., Run]


@pytest.fixture
def make_run(tiny_model: Path, tmp_path: Path) -> MakeRun:
    """Lay out a run as the operator would (config dir, env), planned by our planner for the
    tiny Llama (or the model directory `model`), with
    hyperparameters overridden where a test needs a short, fast-learning run."""
    from kubetune.api import parse_job
    from kubetune.contract import INPUT_ENV, source_role
    from kubetune.planning.job import build_plan

    def make(
        *,
        method: str = "LoRA",
        zero: int | str = "Auto",
        nproc: int = 1,
        rows: int = 96,
        data: str | None = None,
        hp: dict[str, Any] | None = None,
        spec_extra: dict[str, Any] | None = None,
        model: Path | None = None,
        lora: dict[str, Any] | None = None,
        data_file: tuple[str, bytes] | None = None,
        source_files: list[tuple[str, bytes]] | None = None,
    ) -> Run:
        model_dir = model or tiny_model
        if data_file is not None:  # another file format: its name and bytes
            train = tmp_path / data_file[0]
            train.write_bytes(data_file[1])
        else:
            train = tmp_path / "train.jsonl"
            train.write_text(
                data if data is not None else "\n".join(json.dumps(r) for r in tiny_rows(rows))
            )
        spec_dict: dict[str, Any] = {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{train}"},
            "method": {
                "type": method,
                **(
                    {"lora": {"dropout": 0.0, **(lora or {})}}
                    if method in ("LoRA", "QLoRA")
                    else {}
                ),
            },
            "resources": {"numNodes": 1, "gpusPerNode": 0},
            "deepspeed": {"zeroStage": zero},
            "earlyStopping": {"enabled": False},
            # Remedies stay off unless a test asks: Auto would mix general text into these
            # runs (the tiny test model finds it surprising) and change what they measure.
            "remedies": {
                k: {"mode": "Off"}
                for k in ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
            },
            # Nor does cross-validation (Auto below 200 rows would train the folds first).
            "hyperparameters": {"crossValidation": {"mode": "Off"}},
            **(spec_extra or {}),
        }
        spec = parse_job(
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "t"},
                "spec": spec_dict,
            }
        ).spec
        config = json.loads((model_dir / "config.json").read_text())
        extra = []  # spec.dataset.sources' files (the spec names them), as the operator mounts them
        for name, content in source_files or []:
            (tmp_path / name).write_bytes(content)
            extra.append((content, str(tmp_path / name)))
        plan = build_plan(
            spec,
            train.read_bytes(),
            str(train),
            config,
            str(model_dir),
            (8.0, "test"),
            cpu_processes=nproc,
            extra_sources=extra,
        ).to_json()
        plan.setdefault("hyperparameters", {}).update(hp or {})
        out = tmp_path / "out"
        cfg = tmp_path / "config"
        cfg.mkdir(exist_ok=True)
        (cfg / "spec.json").write_text(
            json.dumps(spec.model_dump(by_alias=True, exclude_none=True, mode="json"))
        )
        (cfg / "plan.json").write_text(json.dumps(plan))
        env = {
            **os.environ,
            "KUBETUNE_MODEL_PATH": str(model_dir),
            "KUBETUNE_DATASET_PATH": str(train),
            "KUBETUNE_OUTPUT_PATH": str(out),
            "KUBETUNE_TERMINATION_MESSAGE_PATH": str(tmp_path / "termination.json"),
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_METRICS_HOST": "127.0.0.1",
            "KUBETUNE_CONTROL_TOKEN": "secret-token",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **{INPUT_ENV[source_role(i)]: path for i, (_, path) in enumerate(extra)},
        }
        from kubetune.local_run import trainer_command

        run = Run(command=trainer_command(cfg, nproc), env=env, output=out, plan=plan)
        run.output.mkdir(parents=True, exist_ok=True)
        # The termination message is written next to the output for the tests to read.
        run.env["KUBETUNE_TERMINATION_MESSAGE_PATH"] = str(out / "termination.json")
        return run

    return make
