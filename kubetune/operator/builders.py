"""Pure builders: a FineTuneJob (its identity, spec and plan) -> child manifests.

Children, all owned by the FineTuneJob and named deterministically:
- `<job>-prepare`  batch/v1 Job (CPU) that reads the data and model config and plans,
                   when the operator cannot plan in-process;
- `<job>-config`   ConfigMap with the resolved spec and the plan;
- `<job>-control`  Secret with the token the operator uses to talk to the trainer;
- `<job>-train`    headless Service for rendezvous, and the Indexed batch/v1 Job (one pod
                   per node) that runs torchrun + DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kubetune.api.inputs import trainer_input_uris
from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import (
    COMPONENT_LABEL,
    CONFIG_MOUNT,
    EXIT_CONFIG_ERROR,
    GROUP,
    INPUT_ENV,
    JOB_LABEL,
    KIND,
    MANAGED_BY,
    PREPARE_CONTAINER,
    STOP_POLICY_OPERATOR,
    SUSPEND_ANNOTATION,
    TRAINER_CONTAINER,
    VERSION,
    Env,
)
from kubetune.operator.settings import OperatorSettings

# Exit code of the trainer and the prepare step for configuration or data errors: the Job
# fails at once instead of retrying.
CONFIG_ERROR_EXIT_CODE = EXIT_CONFIG_ERROR


@dataclass(frozen=True)
class JobRef:
    """Identity of one FineTuneJob."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


def train_name(ref: JobRef) -> str:
    return f"{ref.name}-train"


def prepare_name(ref: JobRef) -> str:
    return f"{ref.name}-prepare"


def config_name(ref: JobRef) -> str:
    return f"{ref.name}-config"


def control_name(ref: JobRef) -> str:
    return f"{ref.name}-control"


def owner_reference(ref: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(ref: JobRef, component: str) -> dict[str, str]:
    return {**MANAGED_BY, JOB_LABEL: ref.name, COMPONENT_LABEL: component}


def _meta(
    ref: JobRef,
    name: str,
    component: str,
    extra_labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ref.namespace,
        "labels": {**(extra_labels or {}), **labels(ref, component)},
        "ownerReferences": [owner_reference(ref)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# ------------------------------------------------------------------ storage
@dataclass(frozen=True)
class Storage:
    """Where a URI is read from inside the pod, and the volume that provides it."""

    path: str
    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None


def _volume_name(role: str, key: str) -> str:
    safe = "".join(ch if ch.isalnum() else "-" for ch in key.lower()).strip("-")
    return f"{role}-{safe}"[:63].rstrip("-")


def storage_for(uri: str, role: str, read_only: bool = True, host: bool = False) -> Storage:
    """Map a `pvc://`, `configmap://`, `file://` or `hf://` URI to a path and volume.

    `file://` paths are used as they are (baked into the image or on the node); for
    outputs they are a hostPath of the same path so the node keeps what was written, and
    `host=True` mounts one read-only (a previous run's output, written the same way).
    `hf://` models and datasets are downloaded by the pod itself and need no volume.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme == "pvc":
        claim = parsed.netloc
        base = f"/mnt/{role}/{claim}"
        name = _volume_name(role, claim)
        return Storage(
            path=base + (parsed.path or ""),
            volume={
                "name": name,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
            },
            mount={"name": name, "mountPath": base, "readOnly": read_only},
        )
    if scheme == "configmap":
        cm, key = parsed.netloc, parsed.path.lstrip("/")
        base = f"/mnt/{role}/configmap-{cm}"
        name = _volume_name(role, "cm-" + cm)
        return Storage(
            path=f"{base}/{key}",
            volume={"name": name, "configMap": {"name": cm}},
            mount={"name": name, "mountPath": base, "readOnly": True},
        )
    if scheme == "file":
        path = parsed.path
        if read_only and host:
            name = _volume_name(role, "host")
            return Storage(
                path=path,
                volume={"name": name, "hostPath": {"path": path, "type": "Directory"}},
                mount={"name": name, "mountPath": path, "readOnly": True},
            )
        if read_only:
            return Storage(path=path)
        name = _volume_name(role, "host")
        return Storage(
            path=path,
            volume={"name": name, "hostPath": {"path": path, "type": "DirectoryOrCreate"}},
            mount={"name": name, "mountPath": path},
        )
    if scheme == "hf":
        return Storage(path=uri)
    raise ValueError(f"unsupported URI scheme in {uri!r}")


def _storages(spec: FineTuneJobSpec, output_uri: str) -> dict[str, Storage]:
    """Every input of `trainer_input_uris` (by role) and the output, as paths and volumes."""
    out: dict[str, Storage] = {}
    for role, uri in trainer_input_uris(spec).items():
        # A previous run's output is a directory the node wrote (mounted read-only as is).
        out[role] = storage_for(uri, _VOLUME_ROLE.get(role, role), host=role == "previous")
    out["output"] = storage_for(output_uri, "output", read_only=False)
    return out


# Volume names by role (kept short: `data-...` for the dataset).
_VOLUME_ROLE = {"dataset": "data"}


def _volumes_and_mounts(storages: dict[str, Storage]) -> tuple[list[Any], list[Any]]:
    volumes: dict[str, Any] = {}
    mounts: dict[str, Any] = {}
    for s in storages.values():
        if s.volume and s.mount:
            volumes.setdefault(s.volume["name"], s.volume)
            mounts.setdefault(s.mount["mountPath"], s.mount)
    return list(volumes.values()), list(mounts.values())


def output_uri(ref: JobRef, spec: Any, settings: OperatorSettings) -> str:
    if spec.output is not None and spec.output.uri:
        return str(spec.output.uri)
    return settings.default_output_uri.format(namespace=ref.namespace, name=ref.name)


# ------------------------------------------------------------------ pod pieces
SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
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


def _placement(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) if hasattr(t, "model_dump") else t
            for t in spec.tolerations
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


def _env(ref: JobRef, spec: FineTuneJobSpec, storages: dict[str, Storage]) -> list[dict[str, Any]]:
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
    if spec.model.secret_ref is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": spec.model.secret_ref.name,
                        "key": "HF_TOKEN",
                        "optional": False,
                    }
                },
            }
        )
    return env


def _config_volume(ref: JobRef) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"name": "kubetune-config", "configMap": {"name": config_name(ref)}},
        {"name": "kubetune-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
    )


# ------------------------------------------------------------------ children
def prepare_job(
    ref: JobRef, spec: Any, settings: OperatorSettings, gpu_memory_gib: float
) -> dict[str, Any]:
    """A small CPU Job that validates the data, reads the model config and writes the plan
    to its termination message."""
    storages = _storages(spec, output_uri(ref, spec, settings))
    storages.pop("output")
    volumes, mounts = _volumes_and_mounts(storages)
    env = _env(ref, spec, storages)
    env.append({"name": Env.GPU_MEMORY_GIB, "value": str(gpu_memory_gib)})
    env.append(
        {
            "name": Env.SPEC_JSON,
            "value": json.dumps(
                spec.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=True
            ),
        }
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(ref, prepare_name(ref), "prepare"),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 1800,
            "ttlSecondsAfterFinished": 3600,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": PREPARE_CONTAINER,
                            "operator": "In",
                            "values": [CONFIG_ERROR_EXIT_CODE],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels(ref, "prepare")},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": POD_SECURITY_CONTEXT,
                    **_placement(spec),
                    "volumes": volumes,
                    "containers": [
                        {
                            "name": PREPARE_CONTAINER,
                            "image": spec.image or settings.trainer_image,
                            "command": ["python", "-m", "kubetune.prepare"],
                            "env": env,
                            "volumeMounts": mounts,
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "1Gi"},
                                "limits": {"memory": "4Gi"},
                            },
                            "securityContext": SECURITY_CONTEXT,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                },
            },
        },
    }


def config_map(
    ref: JobRef, spec: Any, plan: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    resolved = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    resolved["output"] = {"uri": output_uri(ref, spec, settings)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ref, config_name(ref), "config"),
        "data": {
            "spec.json": json.dumps(resolved, indent=2, sort_keys=True),
            "plan.json": json.dumps(plan, indent=2, sort_keys=True),
        },
    }


def control_secret(ref: JobRef, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(ref, control_name(ref), "control"),
        "type": "Opaque",
        "stringData": {"token": token},
    }


def headless_service(ref: JobRef, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, train_name(ref), "train"),
        "spec": {
            "clusterIP": "None",
            # Rendezvous must resolve pod 0 before it is Ready.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: ref.name, COMPONENT_LABEL: "train"},
            "ports": [
                {"name": "rendezvous", "port": settings.rendezvous_port},
                {"name": "metrics", "port": settings.trainer_metrics_port},
            ],
        },
    }


def torchrun_command(
    ref: JobRef, num_nodes: int, procs_per_node: int, settings: OperatorSettings
) -> list[str]:
    """torchrun on every node, through kubetune's launcher (which checks the config and data
    first and keeps the configuration-error exit code); pod 0 of the headless service is
    the rendezvous master."""
    master = f"{train_name(ref)}-0.{train_name(ref)}.{ref.namespace}.svc"
    args = [
        "python",
        "-m",
        "kubetune.trainer.launch",
        f"--nnodes={num_nodes}",
        f"--nproc-per-node={procs_per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master}" if num_nodes > 1 else "--master-addr=127.0.0.1",
        f"--master-port={settings.rendezvous_port}",
        "-m",
        "kubetune.trainer",
        f"--config-dir={CONFIG_MOUNT}",
    ]
    return args


def training_job(
    ref: JobRef, spec: Any, plan: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """The Indexed Job: one pod per node, `gpusPerNode` GPUs each, torchrun + DeepSpeed."""
    res = spec.resources
    nodes, gpus = int(res.num_nodes), int(res.gpus_per_node)
    storages = _storages(spec, output_uri(ref, spec, settings))
    volumes, mounts = _volumes_and_mounts(storages)
    cfg_vol, cfg_mount = _config_volume(ref)
    shm_gib = max(1.0, settings.shm_gib_per_gpu * max(gpus, 1))
    volumes = [
        cfg_vol,
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib:g}Gi"}},
        *volumes,
    ]
    mounts = [cfg_mount, {"name": "dshm", "mountPath": "/dev/shm"}, *mounts]
    env = _env(ref, spec, storages)
    env += [
        {"name": Env.NUM_NODES, "value": str(nodes)},
        {"name": Env.METRICS_PORT, "value": str(settings.trainer_metrics_port)},
        # The operator runs the early-stop policy (GET /evaluations, POST /stop).
        {"name": Env.STOP_POLICY, "value": STOP_POLICY_OPERATOR},
        {
            "name": Env.CONTROL_TOKEN,
            "valueFrom": {"secretKeyRef": {"name": control_name(ref), "key": "token"}},
        },
        {
            "name": Env.PLAN_JSON,
            "valueFrom": {"configMapKeyRef": {"name": config_name(ref), "key": "plan.json"}},
        },
        {
            "name": Env.SPEC_JSON,
            "valueFrom": {"configMapKeyRef": {"name": config_name(ref), "key": "spec.json"}},
        },
    ]
    if gpus == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    resources: dict[str, Any] = {"requests": {}, "limits": {}}
    if spec.resources.resources_per_node is not None:
        rpn = spec.resources.resources_per_node
        rpn = (
            rpn.model_dump(by_alias=True, exclude_none=True)
            if hasattr(rpn, "model_dump")
            else dict(rpn)
        )
        resources["requests"].update({k: str(v) for k, v in (rpn.get("requests") or {}).items()})
        resources["limits"].update({k: str(v) for k, v in (rpn.get("limits") or {}).items()})
    if gpus > 0:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
    resources = {k: v for k, v in resources.items() if v}
    user_labels = dict(spec.labels or {})
    user_annotations = dict(spec.annotations or {})
    procs = max(gpus, 1)
    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(settings.trainer_command)
        if settings.trainer_command
        else torchrun_command(ref, nodes, procs, settings),
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": settings.trainer_metrics_port},
            {"name": "rendezvous", "containerPort": settings.rendezvous_port},
        ],
        "volumeMounts": mounts,
        "securityContext": SECURITY_CONTEXT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources:
        container["resources"] = resources
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": int(spec.backoff_limit),
        "suspend": bool(spec.suspend),
        "podFailurePolicy": {
            "rules": [
                # Bad config or data: retrying cannot help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [CONFIG_ERROR_EXIT_CODE],
                    },
                },
                # Preemption, node drain or deletion: not the job's fault.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": {**user_labels, **labels(ref, "train")},
                "annotations": {
                    **user_annotations,
                    "kubetune.dev/plan-method": str(plan.get("method", "")),
                },
            },
            "spec": {
                "restartPolicy": "Never",
                "subdomain": train_name(ref),
                "securityContext": POD_SECURITY_CONTEXT,
                **_placement(spec),
                "volumes": volumes,
                "containers": [container],
            },
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = int(spec.active_deadline_seconds)
    # spec.ttlSecondsAfterFinished is not passed to the Job: the operator deletes the
    # finished FineTuneJob itself (its children go with it). A Job deleted on its own TTL
    # before the operator saw it finish would be created again and train again.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(
            ref,
            train_name(ref),
            "train",
            user_labels,
            # The suspend value the operator last applied: it only changes the Job's suspend
            # when spec.suspend changes, so a queue (Kueue) that suspends or admits the Job is
            # never overridden.
            {**user_annotations, SUSPEND_ANNOTATION: str(bool(spec.suspend)).lower()},
        ),
        "spec": job_spec,
    }
