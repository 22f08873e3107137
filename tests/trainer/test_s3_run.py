"""`kubetune run` against a real S3-compatible server (SeaweedFS on 127.0.0.1): the model
and the dataset are read from a bucket, each checkpoint and the final output are written
back to it, a second run resumes from the checkpoint in the bucket, and wrong credentials
or a missing key stop `kubetune validate|run` with the field and the URI named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.data.objectstore import S3Settings, fetch, list_prefixes, upload
from tests.tinymodel import rows

pytestmark = pytest.mark.trainer

KUBETUNE = [sys.executable, "-m", "kubetune"]


def _settings(server: Any) -> S3Settings:
    return S3Settings(
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )


def _env(server: Any, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        **extra,
    }


def _job(path: Path, server: Any, bucket: str, **spec: Any) -> Path:
    doc = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "s3run"},
        "spec": {
            "model": {"uri": f"s3://{bucket}/models/tiny"},
            "dataset": {"uri": f"s3://{bucket}/data/train.jsonl"},
            "output": {"uri": f"s3://{bucket}/runs/s3run"},
            "storage": {"s3": {"endpointUrl": server.endpoint_url}},
            "method": {"type": "LoRA"},
            "resources": {"numNodes": 1, "gpusPerNode": 0},
            "earlyStopping": {"enabled": False},
            "diagnostics": {"enabled": False},
            "remedies": {
                k: {"mode": "Off"}
                for k in ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
            },
            "hyperparameters": {
                "crossValidation": {"mode": "Off"},
                "epochs": 2,
                "microBatchSize": 8,
                "gradientAccumulationSteps": 1,
                "evalSteps": 5,
            },
            **spec,
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def bucket_with_inputs(s3_server: Any, s3_bucket: str, tiny_model: Path, tmp_path: Path) -> str:
    settings = _settings(s3_server)
    upload(tiny_model, f"s3://{s3_bucket}/models/tiny", "test", settings)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(64)))
    upload(data, f"s3://{s3_bucket}/data/train.jsonl", "test", settings)
    return s3_bucket


def _run(job: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KUBETUNE, "run", str(job), "--quiet"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_run_reads_from_and_writes_to_the_bucket_and_resumes_from_it(
    s3_server: Any, bucket_with_inputs: str, tmp_path: Path
) -> None:
    bucket, settings = bucket_with_inputs, _settings(s3_server)
    job = _job(tmp_path / "job.yaml", s3_server, bucket)
    cache = tmp_path / "cache"
    env = _env(s3_server, KUBETUNE_MODEL_CACHE=str(cache))
    first = _run(job, tmp_path, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = f"s3://{bucket}/runs/s3run"
    got = fetch(out, tmp_path / "got", "test", settings)
    assert (got / "final" / "adapter_config.json").is_file()
    assert (got / "report.json").is_file()
    assert (got / "metrics.jsonl").is_file()
    checkpoints = list_prefixes(f"{out}/checkpoints", "test", settings)
    assert checkpoints
    assert all(c.startswith("checkpoint-") for c in checkpoints)
    assert len(checkpoints) <= 2  # the Trainer's rotation is mirrored in the bucket
    last = max(checkpoints, key=lambda c: int(c.split("-")[1]))
    assert (got / "checkpoints" / last / "trainer_state.json").is_file()
    # The model was downloaded once into this machine's cache.
    assert (cache / "s3" / bucket / "models" / "tiny" / "config.json").is_file()
    report = json.loads((got / "report.json").read_text())["summary"]
    assert report["output"] == f"{out}/final"

    # An unfinished run: the bucket keeps a checkpoint but not the final output; a new run
    # (from another directory: nothing local) resumes from the bucket's checkpoint.
    from pyarrow.fs import S3FileSystem

    fs = S3FileSystem(
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),
        scheme="http",
    )
    for name in ("final", "report.json", "report.md"):
        info = fs.get_file_info(f"{bucket}/runs/s3run/{name}")
        if info.type.name == "Directory":
            fs.delete_dir(info.path)
        elif info.type.name == "File":
            fs.delete_file(info.path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    second = _run(job, elsewhere, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = fetch(out, tmp_path / "again", "test", settings)
    summary = json.loads((again / "report.json").read_text())["summary"]
    assert summary["resumedFrom"]
    assert summary["resumedFrom"].endswith(last)
    assert (again / "final" / "adapter_config.json").is_file()
    shutil.rmtree(cache)


def test_wrong_credentials_and_a_missing_key_name_the_field_and_the_uri(
    s3_server: Any, bucket_with_inputs: str, tmp_path: Path
) -> None:
    bucket = bucket_with_inputs
    job = _job(tmp_path / "job.yaml", s3_server, bucket)
    bad = _env(s3_server, AWS_SECRET_ACCESS_KEY="wrong")
    result = subprocess.run(
        [*KUBETUNE, "validate", str(job)], env=bad, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"spec.dataset.uri: s3://{bucket}/data/train.jsonl: access denied" in result.stderr

    missing = _job(
        tmp_path / "missing.yaml", s3_server, bucket, dataset={"uri": f"s3://{bucket}/nope.jsonl"}
    )
    result = subprocess.run(
        [*KUBETUNE, "validate", str(missing)],
        env=_env(s3_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"spec.dataset.uri: s3://{bucket}/nope.jsonl: no object" in result.stderr

    no_bucket = _job(
        tmp_path / "nobucket.yaml",
        s3_server,
        bucket,
        model={"uri": "s3://no-such-bucket-x/models/tiny"},
    )
    result = _run(no_bucket, tmp_path, _env(s3_server))
    assert result.returncode != 0
    assert "spec.model.uri: s3://no-such-bucket-x/models/tiny: the bucket" in result.stderr


def test_the_pod_launcher_downloads_the_inputs_and_uploads_the_output(
    s3_server: Any, bucket_with_inputs: str, make_run: Any, tmp_path: Path
) -> None:
    """What a training pod runs (`python -m kubetune.trainer.launch` + torchrun) with the
    s3:// paths the operator puts in its environment."""
    bucket, settings = bucket_with_inputs, _settings(s3_server)
    run = make_run(hp={"epochs": 1.0, "evalSteps": 4})
    work = tmp_path / "work"
    work.mkdir()
    out = f"s3://{bucket}/runs/pod"
    env = {
        **run.env,
        **settings.env(),
        "KUBETUNE_MODEL_PATH": f"s3://{bucket}/models/tiny",
        "KUBETUNE_DATASET_PATH": f"s3://{bucket}/data/train.jsonl",
        "KUBETUNE_OUTPUT_PATH": out,
        "KUBETUNE_WORK_DIR": str(work),
    }
    config_dir = next(a for a in run.command if a.startswith("--config-dir="))
    env["KUBETUNE_CONFIG_DIR"] = config_dir.removeprefix("--config-dir=")  # as in a pod
    command = [
        sys.executable,
        "-m",
        "kubetune.trainer.launch",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--master-addr=127.0.0.1",
        f"--master-port={_port()}",
        "-m",
        "kubetune.trainer",
        config_dir,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (staged,) = work.iterdir()  # one scratch directory: the inputs and the local output
    assert (staged / "inputs" / "model" / "config.json").is_file()
    assert (staged / "inputs" / "dataset" / "train.jsonl").is_file()
    got = fetch(out, tmp_path / "got", "test", settings)
    assert (got / "final" / "adapter_config.json").is_file()
    assert list_prefixes(f"{out}/checkpoints", "test", settings)

    # A missing input stops the launcher with the configuration-error code, naming it.
    env["KUBETUNE_DATASET_PATH"] = f"s3://{bucket}/data/none.jsonl"
    env["KUBETUNE_TERMINATION_MESSAGE_PATH"] = str(tmp_path / "term.json")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 78
    message = json.loads((tmp_path / "term.json").read_text())
    assert message["reason"] == "ConfigError"
    assert message["error"].startswith(f"spec.dataset.uri: s3://{bucket}/data/none.jsonl: ")


def _port() -> int:
    from kubetune.devcluster.cluster import free_port

    return free_port()
