"""The training run: the Indexed Job (one pod per node, `gpusPerNode` GPUs each, torchrun +
DeepSpeed) and the headless Service its pods rendezvous through."""

from __future__ import annotations

from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import (
    COMPONENT_LABEL,
    CONFIG_MOUNT,
    JOB_LABEL,
    PLAN_METHOD_ANNOTATION,
    QUEUE_LABEL,
    STOP_POLICY_OPERATOR,
    SUSPEND_ANNOTATION,
    TRAINER_CONTAINER,
    Env,
)
from kubetune.operator.builders.config import CONTROL_TOKEN_KEY, config_volume
from kubetune.operator.builders.names import (
    JobRef,
    config_name,
    control_name,
    labels,
    object_meta,
    train_name,
)
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
    secret_files,
)
from kubetune.operator.builders.resources import plan_resources
from kubetune.operator.builders.storage import Storage, job_storages, volumes_and_mounts
from kubetune.operator.queueing import queue_name
from kubetune.operator.settings import OperatorSettings
from kubetune.planning.interruption import StopTimes, stop_times


def headless_service(ref: JobRef, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(ref, train_name(ref), "train"),
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
    return [
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


def _trainer_env(
    ref: JobRef, nodes: int, settings: OperatorSettings, times: StopTimes
) -> list[dict[str, Any]]:
    """What only the trainer reads: the run's size, its ports, its stop budget (the
    collective timeout, torchrun's shutdown wait) and its siblings' keys (the control
    token is a file)."""
    return [
        {"name": Env.NUM_NODES, "value": str(nodes)},
        {"name": Env.COLLECTIVE_TIMEOUT, "value": str(times.collective_seconds)},
        {"name": Env.SHUTDOWN_TIMEOUT, "value": str(times.shutdown_seconds)},
        {"name": Env.METRICS_PORT, "value": str(settings.trainer_metrics_port)},
        # The operator runs the early-stop policy (GET /evaluations, POST /stop).
        {"name": Env.STOP_POLICY, "value": STOP_POLICY_OPERATOR},
        {
            "name": Env.PLAN_JSON,
            "valueFrom": {"configMapKeyRef": {"name": config_name(ref), "key": "plan.json"}},
        },
        {
            "name": Env.SPEC_JSON,
            "valueFrom": {"configMapKeyRef": {"name": config_name(ref), "key": "spec.json"}},
        },
    ]


def _resources(
    spec: FineTuneJobSpec, plan: PlanDocument, gpus: int, shm_gib: float
) -> dict[str, dict[str, str]]:
    """spec.resources.resourcesPerNode, with gpusPerNode as the GPU request and limit (it
    wins over a GPU count there), and the plan's CPU and memory for each resource the user
    names neither in requests nor in limits (`resources.py`)."""
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    per_node = spec.resources.resources_per_node
    if per_node is not None:
        resources["requests"].update({k: str(v) for k, v in (per_node.requests or {}).items()})
        resources["limits"].update({k: str(v) for k, v in (per_node.limits or {}).items()})
    named = set(resources["requests"]) | set(resources["limits"])
    requests, limits = plan_resources(plan, gpus, spec.resources.processes, shm_gib)
    for section, values in (("requests", requests), ("limits", limits)):
        for name, value in values.items():
            if name not in named:
                resources[section][name] = value
    if gpus > 0:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
    return {k: v for k, v in resources.items() if v}


def training_job(
    ref: JobRef, spec: FineTuneJobSpec, plan: PlanDocument, settings: OperatorSettings
) -> dict[str, Any]:
    """The Indexed Job: one pod per node, `gpusPerNode` GPUs each (or, on CPU,
    `processesPerNode` processes), torchrun + DeepSpeed."""
    nodes, gpus = int(spec.resources.num_nodes), int(spec.resources.gpus_per_node)
    storages = job_storages(ref, spec, settings)
    cache = model_cache(ref, spec, read_only=True)
    if cache is not None:
        # The prepare pod downloaded the model there once; every pod reads it as it is.
        storages["model"] = Storage(path=cache.path, volume=cache.volume, mount=cache.mount)
    volumes, mounts = volumes_and_mounts(storages)
    work_volumes, work_mounts = work_volume(storages)
    volumes, mounts = [*volumes, *work_volumes], [*mounts, *work_mounts]
    cfg_vol, cfg_mount = config_volume(ref)
    shm_gib = max(1.0, settings.shm_gib_per_gpu * max(gpus, 1))
    volumes = [
        cfg_vol,
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib:g}Gi"}},
        *volumes,
    ]
    mounts = [cfg_mount, {"name": "dshm", "mountPath": "/dev/shm"}, *mounts]
    times = stop_times(plan)
    env = (
        pod_env(ref, spec, storages)
        + s3_env(spec, storages)
        + _trainer_env(ref, nodes, settings, times)
    )
    # The secrets as files: the operator's control token, the hub token, the S3 credentials.
    control = secret_files(
        "control-token", control_name(ref), (CONTROL_TOKEN_KEY,), (Env.CONTROL_TOKEN,)
    )
    for extra_volumes, extra_mounts, extra_env in (
        ([control[0]], [control[1]], control[2]),
        hub_token_files(spec),
        s3_credential_files(spec, storages),
    ):
        volumes, mounts, env = [*volumes, *extra_volumes], [*mounts, *extra_mounts], env + extra_env
    if gpus == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "command": list(settings.trainer_command)
        if settings.trainer_command
        else torchrun_command(ref, nodes, spec.resources.processes, settings),
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": settings.trainer_metrics_port},
            {"name": "rendezvous", "containerPort": settings.rendezvous_port},
        ],
        "volumeMounts": mounts,
    }
    resources = _resources(spec, plan, gpus, shm_gib)
    if resources:
        container["resources"] = resources
    user_labels = dict(spec.labels or {})
    user_annotations = dict(spec.annotations or {})
    queue = queue_name(spec, settings.default_queue)
    if queue:
        # Kueue admits the Job: created suspended, it starts when Kueue unsuspends it.
        user_labels[QUEUE_LABEL] = queue
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # Several nodes are one gang: the first failed pod fails the Job (the Job controller
        # then stops the others) and the operator restarts all of them together, counting
        # against spec.backoffLimit itself. One node: the Job retries its pod.
        "backoffLimit": int(spec.backoff_limit) if nodes == 1 else 0,
        "suspend": bool(spec.suspend) or queue is not None,
        "podFailurePolicy": pod_failure_policy(TRAINER_CONTAINER, ignore_disruptions=nodes == 1),
        "template": {
            "metadata": {
                "labels": {**user_labels, **labels(ref, "train")},
                "annotations": {
                    **user_annotations,
                    PLAN_METHOD_ANNOTATION: plan.method,
                },
            },
            "spec": job_pod(
                spec,
                settings,
                container,
                volumes,
                subdomain=train_name(ref),
                # SIGTERM -> every rank saves a checkpoint -> exit: the plan's estimate of it.
                terminationGracePeriodSeconds=times.grace_seconds,
            ),
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
        "metadata": object_meta(
            ref,
            train_name(ref),
            "train",
            user_labels,
            # The suspend value the operator last applied: it only changes the Job's suspend
            # when spec.suspend changes, so a queue (Kueue) that suspends or admits the Job is
            # never overridden. With a queue, spec.suspend goes to the Workload's
            # spec.active once Kueue has made it: "false" until then.
            {
                **user_annotations,
                SUSPEND_ANNOTATION: str(bool(spec.suspend) and queue is None).lower(),
            },
        ),
        "spec": job_spec,
    }
