"""s3:// URIs: parsing, settings from the spec and the environment, the messages of the
object store's errors, the spec's checks, and what the builders give the pods (the S3
settings and credentials from the Secret, the scratch volume, the model cache volume)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import SpecError
from kubetune.contract import Env
from kubetune.data.objectstore import (
    ObjectStoreError,
    S3Location,
    S3Settings,
    endpoint_parts,
    explain,
    parse_s3_uri,
)
from kubetune.operator import builders as b
from kubetune.operator.builders import JobRef
from kubetune.operator.settings import OperatorSettings
from tests.plans import plan_document
from tests.unit.specs import secret_file_source, spec_from

pytestmark = pytest.mark.unit

REF = JobRef(name="demo", namespace="team-a", uid="uid-1", generation=1)
SETTINGS = OperatorSettings()
BASE: dict[str, Any] = {
    "model": {"uri": "s3://models-bucket/llama/7b"},
    "dataset": {"uri": "s3://data-bucket/support/train.jsonl"},
    "output": {"uri": "s3://out-bucket/runs/demo"},
    "storage": {
        "s3": {
            "credentialsSecret": "s3-creds",
            "endpointUrl": "http://object-store.storage.svc:8333",
            "region": "eu-west-1",
        }
    },
}


def _spec(**extra: Any) -> Any:
    return spec_from(BASE, REF.name, REF.namespace, **extra)


# ---- URIs and settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "key"),
    [
        ("s3://my-bucket/a/b.jsonl", "my-bucket", "a/b.jsonl"),
        ("s3://my.bucket.v2/prefix/", "my.bucket.v2", "prefix"),
        ("s3://abc", "abc", ""),
    ],
)
def test_parse_s3_uri(uri: str, bucket: str, key: str) -> None:
    location = parse_s3_uri(uri, "spec.dataset.uri")
    assert (location.bucket, location.key) == (bucket, key)
    assert location.uri == uri.rstrip("/")


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("gs://bucket/x", "is not an s3://bucket/key URI"),
        ("s3://ab/x", "is not a bucket name"),
        ("s3://Upper/x", "is not a bucket name"),
        ("s3://bucket/a//b", "empty, . or .. part"),
        ("s3://bucket/a/../b", "empty, . or .. part"),
    ],
)
def test_bad_s3_uris_name_the_field(uri: str, words: str) -> None:
    with pytest.raises(ObjectStoreError) as err:
        parse_s3_uri(uri, "spec.model.uri")
    assert str(err.value).startswith("spec.model.uri: ")
    assert words in str(err.value)


def test_location_join_and_name() -> None:
    root = S3Location("b", "runs/x")
    assert root.join("checkpoints/checkpoint-4").uri == "s3://b/runs/x/checkpoints/checkpoint-4"
    assert S3Location("b").join("k").path == "b/k"
    assert S3Location("b", "d/train.parquet").name == "train.parquet"


def test_settings_from_env_and_back() -> None:
    env = {
        Env.S3_ENDPOINT_URL: "http://127.0.0.1:9000",
        Env.S3_REGION: "eu-west-1",
        Env.S3_PATH_STYLE: "false",
        "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "sk",
    }
    settings = S3Settings.from_env(env)
    assert settings == S3Settings("http://127.0.0.1:9000", "eu-west-1", False, "ak", "sk")
    assert S3Settings.from_env(settings.env()) == settings
    assert S3Settings.from_env({}) == S3Settings()
    assert S3Settings.from_env({"AWS_ENDPOINT_URL": "http://h:1"}).endpoint_url == "http://h:1"


def test_the_spec_wins_over_the_environment_but_keeps_its_credentials() -> None:
    env = S3Settings("http://env:1", "us-east-1", True, "ak", "sk")
    merged = env.with_spec("http://spec:2", None, False)
    assert merged == S3Settings("http://spec:2", "us-east-1", False, "ak", "sk")


def test_endpoint_parts() -> None:
    assert endpoint_parts("http://127.0.0.1:8333") == ("http", "127.0.0.1:8333")
    assert endpoint_parts("https://s3.example.internal/") == ("https", "s3.example.internal")
    with pytest.raises(ObjectStoreError, match=r"storage\.s3\.endpointUrl"):
        endpoint_parts("127.0.0.1:8333")


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ("AWS Error ACCESS_DENIED during HeadObject operation", "access denied"),
        ("AWS Error NO_SUCH_BUCKET during ListObjectsV2", "the bucket 'b-1' does not exist"),
        ("curl error: Couldn't connect to server", "cannot be reached"),
        ("something else", "cannot read it (something else)"),
    ],
)
def test_explain_names_field_and_uri(error: str, words: str) -> None:
    text = explain(OSError(error), "spec.dataset.uri", "s3://b-1/x.jsonl")
    assert text.startswith("spec.dataset.uri: s3://b-1/x.jsonl: ")
    assert words in text


# ---- the spec ------------------------------------------------------------------------------


def test_s3_uris_and_storage_parse() -> None:
    spec = _spec(model={"from": "s3://out-bucket/runs/previous"})
    assert spec.storage is not None
    assert spec.storage.s3 is not None
    assert spec.storage.s3.path_style is True
    assert spec.model.from_ == "s3://out-bucket/runs/previous"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"storage": {"s3": {"endpointUrl": "ftp://x"}}}, "spec.storage.s3.endpointUrl"),
        ({"storage": {"modelCache": {"claimName": "Bad_Name"}}}, "storage.modelCache.claimName"),
        ({"output": {"uri": "s3://x/y"}}, "spec.output.uri"),
        ({"dataset": {"sources": [{"uri": "s3://UP/y"}]}}, "dataset.sources.uri must be"),
    ],
)
def test_bad_storage_fields_are_named(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError) as err:
        _spec(**extra)
    assert words in str(err.value)


# ---- builders ------------------------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def test_prepare_pod_gets_the_s3_settings_and_the_credentials_secret() -> None:
    pod = _pod(b.prepare_job(REF, _spec(), SETTINGS, 80.0))
    env = _env(pod["containers"][0])
    assert env[Env.DATASET_PATH] == "s3://data-bucket/support/train.jsonl"
    assert env[Env.MODEL_PATH] == "s3://models-bucket/llama/7b"
    assert env[Env.S3_ENDPOINT_URL] == "http://object-store.storage.svc:8333"
    assert env[Env.S3_REGION] == "eu-west-1"
    assert env[Env.S3_PATH_STYLE] == "true"
    job = b.prepare_job(REF, _spec(), SETTINGS, 80.0)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret_file_source(job, key) == ("s3-creds", key)
    assert env[Env.WORK_DIR] == "/mnt/work"
    assert {"name": "work", "emptyDir": {}} in pod["volumes"]
    assert Env.MODEL_FETCH_DIR not in env  # no cache named: each pod downloads


def test_training_pods_upload_to_the_s3_output() -> None:
    job = b.training_job(REF, _spec(), plan_document(), SETTINGS)
    env = _env(_pod(job)["containers"][0])
    assert env[Env.OUTPUT_PATH] == "s3://out-bucket/runs/demo"
    assert secret_file_source(job, "AWS_SECRET_ACCESS_KEY") == ("s3-creds", "AWS_SECRET_ACCESS_KEY")


def test_no_s3_env_without_s3_uris() -> None:
    spec = spec_from(
        {"model": {"uri": "hf://Qwen/Qwen2-0.5B"}, "dataset": {"uri": "pvc://d/train.jsonl"}},
        REF.name,
        REF.namespace,
        storage={"s3": {"credentialsSecret": "s3-creds"}},
    )
    pod = _pod(b.prepare_job(REF, spec, SETTINGS, 80.0))
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID_FILE", Env.S3_ENDPOINT_URL, Env.WORK_DIR}
    assert all(v["name"] != "s3-credentials" for v in pod["volumes"])
    assert all(v["name"] != "work" for v in pod["volumes"])


@pytest.mark.parametrize("model", ["s3://models-bucket/llama/7b", "hf://Qwen/Qwen2-0.5B"])
def test_model_cache_is_filled_by_the_prepare_pod_and_read_by_the_training_pods(
    model: str,
) -> None:
    spec = _spec(model={"uri": model}, storage={"modelCache": {"claimName": "model-cache"}})
    path = "/mnt/model-cache/team-a/demo/model"
    prepare = _pod(b.prepare_job(REF, spec, SETTINGS, 80.0))
    assert _env(prepare["containers"][0])[Env.MODEL_FETCH_DIR] == path
    assert {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "model-cache", "readOnly": False},
    } in prepare["volumes"]
    assert {"name": "model-cache", "mountPath": "/mnt/model-cache", "readOnly": False} in (
        prepare["containers"][0]["volumeMounts"]
    )
    train = _pod(b.training_job(REF, spec, plan_document(), SETTINGS))
    env = _env(train["containers"][0])
    assert env[Env.MODEL_PATH] == path  # read from the cache, not downloaded again
    assert {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "model-cache", "readOnly": True},
    } in train["volumes"]
    assert {"name": "model-cache", "mountPath": "/mnt/model-cache", "readOnly": True} in (
        train["containers"][0]["volumeMounts"]
    )


@pytest.mark.parametrize("model", ["pvc://models/llama", "hf://kubetune/tiny-llama-en"])
def test_no_model_cache_for_a_mounted_or_built_model(model: str) -> None:
    spec = _spec(model={"uri": model}, storage={"modelCache": {"claimName": "model-cache"}})
    assert b.model_cache(REF, spec, read_only=True) is None
    train = _pod(b.training_job(REF, spec, plan_document(), SETTINGS))
    assert all(v["name"] != "model-cache" for v in train["volumes"])
