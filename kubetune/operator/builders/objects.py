"""What a pod needs for object storage and the job's model cache: the s3:// settings and
credentials (spec.storage.s3), a scratch directory to stage s3:// inputs and outputs in, and
the model cache volume (spec.storage.modelCache) the prepare pod fills once and the training
pods read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import Env
from kubetune.operator.builders.names import JobRef
from kubetune.operator.builders.pod import secret_files
from kubetune.operator.builders.storage import Storage

#: Where a pod stages s3:// inputs and an s3:// output (an emptyDir).
WORK_VOLUME: Final = "work"
WORK_MOUNT: Final = "/mnt/work"
MODEL_CACHE_VOLUME: Final = "model-cache"
MODEL_CACHE_MOUNT: Final = "/mnt/model-cache"
#: The Secret keys of spec.storage.s3.credentialsSecret (the standard AWS variable names).
CREDENTIAL_KEYS: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: A model kubetune builds itself in the trainer (nothing to download).
BUILTIN_MODEL_PREFIX: Final = "hf://kubetune/"


def uses_s3(storages: dict[str, Storage]) -> bool:
    """Whether any input or the output of the pod is an s3:// URI."""
    return any(s.path.startswith("s3://") for s in storages.values())


def s3_env(spec: FineTuneJobSpec, storages: dict[str, Storage]) -> list[dict[str, Any]]:
    """The endpoint, region and style of spec.storage.s3, for a pod with an s3:// input or
    output; nothing otherwise (the credentials are files: `s3_credential_files`)."""
    if not uses_s3(storages):
        return []
    s3 = spec.storage.s3 if spec.storage is not None else None
    env: list[dict[str, Any]] = [{"name": Env.WORK_DIR, "value": WORK_MOUNT}]
    if s3 is None:
        return env
    if s3.endpoint_url:
        env.append({"name": Env.S3_ENDPOINT_URL, "value": s3.endpoint_url})
    if s3.region:
        env.append({"name": Env.S3_REGION, "value": s3.region})
    env.append({"name": Env.S3_PATH_STYLE, "value": str(s3.path_style).lower()})
    return env


def s3_credential_files(
    spec: FineTuneJobSpec, storages: dict[str, Storage]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.storage.s3.credentialsSecret's keys as files (AWS_ACCESS_KEY_ID_FILE, ...), for a
    pod with an s3:// input or output: volumes, mounts and env (none otherwise)."""
    s3 = spec.storage.s3 if spec.storage is not None else None
    if not uses_s3(storages) or s3 is None or not s3.credentials_secret:
        return [], [], []
    volume, mount, env = secret_files("s3-credentials", s3.credentials_secret, CREDENTIAL_KEYS)
    return [volume], [mount], env


def work_volume(storages: dict[str, Storage]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The scratch emptyDir (and its mount) of a pod with s3:// inputs or output."""
    if not uses_s3(storages):
        return [], []
    return (
        [{"name": WORK_VOLUME, "emptyDir": {}}],
        [{"name": WORK_VOLUME, "mountPath": WORK_MOUNT}],
    )


@dataclass(frozen=True)
class ModelCache:
    """The cache PVC's volume, its mount (read-write in the prepare pod, read-only in the
    training pods) and the job's model directory on it."""

    volume: dict[str, Any]
    mount: dict[str, Any]
    path: str


def needs_fetch(uri: str) -> bool:
    """Whether a base model is downloaded (hub or bucket), rather than mounted or built."""
    return (uri.startswith("hf://") and not uri.startswith(BUILTIN_MODEL_PREFIX)) or uri.startswith(
        "s3://"
    )


def model_cache(ref: JobRef, spec: FineTuneJobSpec, read_only: bool) -> ModelCache | None:
    """spec.storage.modelCache for a model that is downloaded; None when there is none."""
    cache = spec.storage.model_cache if spec.storage is not None else None
    if cache is None or not needs_fetch(spec.model.uri):
        return None
    return ModelCache(
        volume={
            "name": MODEL_CACHE_VOLUME,
            "persistentVolumeClaim": {"claimName": cache.claim_name, "readOnly": read_only},
        },
        mount={"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_MOUNT, "readOnly": read_only},
        path=f"{MODEL_CACHE_MOUNT}/{ref.namespace}/{ref.name}/model",
    )
