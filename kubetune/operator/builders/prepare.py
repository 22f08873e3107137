"""The prepare Job: a small CPU Job that validates the data, reads the model config and
writes the plan to its termination message, for when the operator cannot plan in-process."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import PREPARE_CONTAINER, Env
from kubetune.operator.builders.names import JobRef, labels, object_meta, prepare_name
from kubetune.operator.builders.objects import (
    model_cache,
    s3_credential_files,
    s3_env,
    work_volume,
)
from kubetune.operator.builders.pod import (
    hub_token_files,
    job_pod,
    pod_env,
    pod_failure_policy,
    spec_document,
)
from kubetune.operator.builders.storage import job_storages, volumes_and_mounts
from kubetune.operator.settings import OperatorSettings


def prepare_job(
    ref: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings, gpu_memory_gib: float
) -> dict[str, Any]:
    """A small CPU Job that validates the data, reads the model config and writes the plan
    to its termination message."""
    storages = job_storages(ref, spec, settings)
    storages.pop("output")  # it only reads
    volumes, mounts = volumes_and_mounts(storages)
    work_volumes, work_mounts = work_volume(storages)
    volumes, mounts = [*volumes, *work_volumes], [*mounts, *work_mounts]
    env = pod_env(ref, spec, storages) + s3_env(spec, storages)
    for extra_volumes, extra_mounts, extra_env in (
        hub_token_files(spec),
        s3_credential_files(spec, storages),
    ):
        volumes, mounts, env = [*volumes, *extra_volumes], [*mounts, *extra_mounts], env + extra_env
    cache = model_cache(ref, spec, read_only=False)
    if cache is not None:
        # The base model is downloaded here, once for the job; the training pods read it.
        volumes.append(cache.volume)
        mounts.append(cache.mount)
        env.append({"name": Env.MODEL_FETCH_DIR, "value": cache.path})
    env.append({"name": Env.GPU_MEMORY_GIB, "value": str(gpu_memory_gib)})
    env.append({"name": Env.SPEC_JSON, "value": json.dumps(spec_document(spec), sort_keys=True)})
    container = {
        "name": PREPARE_CONTAINER,
        "command": ["python", "-m", "kubetune.prepare"],
        "env": env,
        "volumeMounts": mounts,
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"memory": "4Gi"},
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(ref, prepare_name(ref), "prepare"),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 1800,
            "ttlSecondsAfterFinished": 3600,
            "podFailurePolicy": pod_failure_policy(PREPARE_CONTAINER),
            "template": {
                "metadata": {"labels": labels(ref, "prepare")},
                "spec": job_pod(spec, settings, container, volumes),
            },
        },
    }
