"""What every pod of a FineTuneJob has: the security contexts, the placement the spec asks
for, the environment (the job, its inputs and output, the pod's own name and address), the
failure policy and the spec as the pods read it."""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import (
    CONFIG_MOUNT,
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    INPUT_ENV,
    SECRET_FILE_SUFFIX,
    SECRETS_MOUNT,
    Env,
)
from kubetune.operator.builders.names import JobRef
from kubetune.operator.builders.storage import Storage
from kubetune.operator.settings import OperatorSettings

SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    # The image is never written to: every path the trainer writes is a volume below.
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
}


#: The trainer image's HOME (Dockerfile.trainer): HF_HOME's caches, torch's and DeepSpeed's
#: compiled-kernel caches (~/.cache/torch_extensions, ~/.triton), matplotlib's config and
#: the built-in models' cache (~/.cache/kubetune) are under it.
TRAINER_HOME = "/home/kubetune"
#: Every path a prepare or training pod writes besides its output and its inputs' scratch
#: (`objects.work_volume`) and /dev/shm: (volume name, mount path). emptyDirs, since the root
#: filesystem is read-only; no size limit on HOME (a hub model downloaded without a model
#: cache lands there).
WRITABLE_DIRS = (("tmp", "/tmp"), ("home", TRAINER_HOME))
#: A pod's secrets, mounted as files (`contract.secret_value` reads them).
HF_TOKEN_KEY = "HF_TOKEN"
#: huggingface_hub's own variable for its token file: hub calls that kubetune makes
#: without a token argument (inside transformers or datasets) read the same file.
HF_TOKEN_PATH_ENV = "HF_TOKEN_PATH"


def writable_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The emptyDirs (and mounts) of `WRITABLE_DIRS`."""
    return (
        [{"name": name, "emptyDir": {}} for name, _ in WRITABLE_DIRS],
        [{"name": name, "mountPath": path} for name, path in WRITABLE_DIRS],
    )


def secret_files(
    volume: str, secret: str, keys: tuple[str, ...], env_names: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """A Secret's keys as read-only files under SECRETS_MOUNT/<volume>/ (readable by the
    pod's user and group only): its volume, its mount, and the NAME_FILE variables that
    point at each file (NAME is the key, or the same position of `env_names`)."""
    base = f"{SECRETS_MOUNT}/{volume}"
    names = env_names or keys
    return (
        {
            "name": volume,
            "secret": {
                "secretName": secret,
                "items": [{"key": k, "path": k} for k in keys],
                "defaultMode": 0o440,
                "optional": False,
            },
        },
        {"name": volume, "mountPath": base, "readOnly": True},
        [
            {"name": name + SECRET_FILE_SUFFIX, "value": f"{base}/{key}"}
            for name, key in zip(names, keys, strict=True)
        ],
    )


def hub_token_files(
    spec: FineTuneJobSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.model.secretRef's HF_TOKEN as a file: volumes, mounts and env (none without)."""
    if spec.model.secret_ref is None:
        return [], [], []
    volume, mount, env = secret_files("hf-token", spec.model.secret_ref.name, (HF_TOKEN_KEY,))
    env.append({"name": HF_TOKEN_PATH_ENV, "value": env[0]["value"]})
    return [volume], [mount], env


def spec_document(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The spec as JSON-ready camelCase, unset fields left out (it parses back the same)."""
    doc: dict[str, Any] = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    return doc


def placement(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Node selector, tolerations, priority class and service account, as the spec says."""
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        out["serviceAccountName"] = spec.service_account_name
    else:
        # The trainer and the prepare step never call the Kubernetes API: no token in the
        # pod (a user who names a service account decides for themselves).
        out["automountServiceAccountToken"] = False
    return out


def pod_env(
    ref: JobRef, spec: FineTuneJobSpec, storages: dict[str, Storage]
) -> list[dict[str, Any]]:
    """The job, its inputs' and output's paths, the pod's name and address (the hub token
    is a file: `hub_token_files`)."""
    env: list[dict[str, Any]] = [
        {"name": Env.JOB_NAME, "value": ref.name},
        {"name": Env.JOB_NAMESPACE, "value": ref.namespace},
        {"name": Env.CONFIG_DIR, "value": CONFIG_MOUNT},
    ]
    env += [
        {"name": INPUT_ENV[role], "value": storages[role].path}
        for role in INPUT_ENV
        if role in storages
    ]
    if "output" in storages:
        env.append({"name": Env.OUTPUT_PATH, "value": storages["output"].path})
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    return env


def pod_failure_policy(container: str, ignore_disruptions: bool = True) -> dict[str, Any]:
    """A child Job's podFailurePolicy (it requires restartPolicy Never). A multi-node
    training Job does not ignore disruptions: its pods restart as a gang, by the operator,
    which tells an interruption from a crash itself."""
    rules: list[dict[str, Any]] = [
        # Bad config or data: retrying cannot help.
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": container,
                "operator": "In",
                "values": [EXIT_CONFIG_ERROR],
            },
        },
    ]
    if ignore_disruptions:
        # Preemption, node drain or deletion: not the job's fault.
        rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
        # Stopped by SIGTERM (a pod deleted without a DisruptionTarget condition, by a user
        # or a controller): the trainer saved a checkpoint first; not counted either.
        rules.append(
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_INTERRUPTED],
                },
            }
        )
    return {"rules": rules}


def job_pod(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    **pod_fields: Any,
) -> dict[str, Any]:
    """A child Job's pod spec: never restarted in place, non-root, placed as the spec asks,
    with one container (`container` named first, given the image and the security context
    every child container has) whose root filesystem is read-only, with the writable
    emptyDirs of `WRITABLE_DIRS`."""
    tmp_volumes, tmp_mounts = writable_volumes()
    container = {
        **container,
        "volumeMounts": [*container.get("volumeMounts", []), *tmp_mounts],
    }
    return {
        "restartPolicy": "Never",
        **pod_fields,
        "securityContext": POD_SECURITY_CONTEXT,
        **placement(spec),
        "volumes": [*volumes, *tmp_volumes],
        "containers": [
            {
                "name": container["name"],
                "image": spec.image or settings.trainer_image,
                **container,
                "securityContext": SECURITY_CONTEXT,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
    }
