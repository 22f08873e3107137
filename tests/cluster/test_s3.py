"""The operator with s3:// data against a real S3-compatible server (SeaweedFS on
127.0.0.1): the prepare pod (on the local pod runner) reads the dataset and the model's
config from the bucket with the credentials of the job's Secret and plans; a missing key
fails the job with the field and the URI in its status; and a whole job trains from the
bucket (the real trainer in the training pod) and uploads its output there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.data.objectstore import S3Settings, upload
from kubetune.devcluster.components import local_runner_pod_placement
from tests.cluster.test_operator import (  # noqa: F401 - the operator fixture
    OperatorProcess,
    _create,
    _ftj,
    _get,
    _rows,
    _wait_cond,
    operator,
)

pytestmark = pytest.mark.cluster


def _s3_job(
    name: str, dev_cluster: Any, server: Any, bucket: str, dataset: str, **extra: Any
) -> dict[str, Any]:
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    return _ftj(
        name,
        planOnly=True,
        resources={"numNodes": 1, "gpusPerNode": 0},
        model={"uri": f"s3://{bucket}/models/pythia"},
        dataset={"uri": dataset},
        output={"uri": f"s3://{bucket}/runs/{name}"},
        storage={"s3": {"credentialsSecret": "s3-creds", "endpointUrl": server.endpoint_url}},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
        **extra,
    )


@pytest.fixture
def s3_inputs(
    s3_server: Any, s3_bucket: str, api: dict[str, Any], namespace: str, tmp_path: Path
) -> str:
    from kubetune.planning import bundled_architectures

    settings = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(bundled_architectures()["pythia-160m"].read_text())
    upload(model, f"s3://{s3_bucket}/models/pythia", "test", settings)
    data = tmp_path / "train.jsonl"
    data.write_text(_rows(500))
    upload(data, f"s3://{s3_bucket}/data/train.jsonl", "test", settings)
    api["core"].create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3_server.access_key,
                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            },
        },
    )
    return s3_bucket


def test_the_prepare_pod_plans_from_a_bucket(
    dev_cluster: Any,
    operator: OperatorProcess,  # noqa: F811
    api: dict[str, Any],
    namespace: str,
    s3_server: Any,
    s3_inputs: str,
) -> None:
    bucket = s3_inputs
    job = _s3_job("s3plan", dev_cluster, s3_server, bucket, f"s3://{bucket}/data/train.jsonl")
    _create(api, namespace, job, rows=None)
    done = _wait_cond(api, namespace, "s3plan", "Succeeded", timeout=180)
    assert done["reason"] == "PlanOnly"
    plan = _get(api, namespace, "s3plan")["status"]["plan"]
    assert plan["exampleCount"] == 450  # 500 rows less the 10% validation split
    assert plan["totalParameters"] > 100_000_000
    prepare = api["batch"].read_namespaced_job("s3plan-prepare", namespace)
    env = {e.name: e for e in prepare.spec.template.spec.containers[0].env}
    assert "AWS_SECRET_ACCESS_KEY" not in env  # a file of the Secret's volume
    volumes = {v.name: v for v in prepare.spec.template.spec.volumes}
    assert volumes["s3-credentials"].secret.secret_name == "s3-creds"
    assert env["AWS_SECRET_ACCESS_KEY_FILE"].value.startswith("/var/run/secrets/kubetune/")
    assert json.loads(env["KUBETUNE_SPEC_JSON"].value)["dataset"]["uri"].startswith("s3://")


def test_a_missing_key_fails_the_job_naming_the_field_and_the_uri(
    dev_cluster: Any,
    operator: OperatorProcess,  # noqa: F811
    api: dict[str, Any],
    namespace: str,
    s3_server: Any,
    s3_inputs: str,
) -> None:
    bucket = s3_inputs
    uri = f"s3://{bucket}/data/missing.jsonl"
    _create(api, namespace, _s3_job("s3miss", dev_cluster, s3_server, bucket, uri), rows=None)
    failed = _wait_cond(api, namespace, "s3miss", "Failed", timeout=180)
    assert failed["reason"] == "DataError"
    assert f"spec.dataset.uri: {uri}: no object or prefix with objects there" in (failed["message"])


def test_a_training_pod_trains_from_a_bucket_and_uploads_its_output(
    dev_cluster: Any,
    operator: OperatorProcess,  # noqa: F811
    api: dict[str, Any],
    namespace: str,
    s3_server: Any,
    s3_inputs: str,
    tmp_path: Path,
) -> None:
    """End to end on the local pod runner: the model and the dataset are objects in the
    bucket, the prepare pod plans from them and the training pod (the real trainer, on CPU)
    downloads them with the Secret's credentials and uploads its checkpoints, weights, plan
    and report under the s3:// output; nothing is written to a local output."""
    from kubetune.data.objectstore import fetch
    from tests.tinymodel import build_tiny_model, rows

    bucket = s3_inputs
    settings = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    upload(build_tiny_model(tmp_path / "tiny"), f"s3://{bucket}/models/tiny", "test", settings)
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(64)))
    upload(data, f"s3://{bucket}/data/tiny.jsonl", "test", settings)
    job = _s3_job(
        "s3train",
        dev_cluster,
        s3_server,
        bucket,
        f"s3://{bucket}/data/tiny.jsonl",
        method={"type": "LoRA"},
        hyperparameters={"epochs": 1},
        annotations={"standin": "real-trainer"},
    )
    job["spec"]["planOnly"] = False
    job["spec"]["model"] = {"uri": f"s3://{bucket}/models/tiny"}
    _create(api, namespace, job, rows=None)
    done = _wait_cond(api, namespace, "s3train", "Succeeded", timeout=420)
    assert done["reason"] == "Completed"
    status = _get(api, namespace, "s3train")["status"]
    assert status["metrics"]["evalLoss"] > 0
    train = api["batch"].read_namespaced_job("s3train-train", namespace)
    env = {e.name: e for e in train.spec.template.spec.containers[0].env}
    # The credentials reach the pod as files of the Secret's volume, never as variables.
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_SECRET_ACCESS_KEY_FILE"].value.startswith("/var/run/secrets/kubetune/")
    secrets = {
        v.secret.secret_name for v in train.spec.template.spec.volumes if v.secret is not None
    }
    assert "s3-creds" in secrets, secrets
    assert env["KUBETUNE_MODEL_PATH"].value == f"s3://{bucket}/models/tiny"
    assert env["KUBETUNE_DATASET_PATH"].value == f"s3://{bucket}/data/tiny.jsonl"
    assert env["KUBETUNE_OUTPUT_PATH"].value == f"s3://{bucket}/runs/s3train"
    out = fetch(f"s3://{bucket}/runs/s3train", tmp_path / "out", "test", settings)
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert "report.md" in names, sorted(names)
    assert json.loads((out / "plan.json").read_text())["method"] == "LoRA"
    assert any(n.startswith("final/") and n.endswith(".safetensors") for n in names), names
    assert any(n.startswith("checkpoints/") for n in names), sorted(names)
    assert "metrics.jsonl" in names, sorted(names)
