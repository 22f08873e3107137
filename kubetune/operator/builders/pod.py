"""What every pod of a FineTuneJob has: the security contexts, the placement the spec asks
for, the environment (the job, its inputs and output, the pod's own name and address), the
failure policy and the spec as the pods read it."""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import CONFIG_MOUNT, EXIT_CONFIG_ERROR, INPUT_ENV, Env
from kubetune.operator.builders.names import JobRef
from kubetune.operator.builders.storage import Storage
from kubetune.operator.settings import OperatorSettings

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
    """The job, its inputs' and output's paths, the pod's name and address, the HF token."""
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


def pod_failure_policy(container: str) -> dict[str, Any]:
    """A child Job's podFailurePolicy (it requires restartPolicy Never)."""
    return {
        "rules": [
            # Bad config or data: retrying cannot help.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_CONFIG_ERROR],
                },
            },
            # Preemption, node drain or deletion: not the job's fault.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def job_pod(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    **pod_fields: Any,
) -> dict[str, Any]:
    """A child Job's pod spec: never restarted in place, non-root, placed as the spec asks,
    with one container (`container` named first, given the image and the security context
    every child container has)."""
    return {
        "restartPolicy": "Never",
        **pod_fields,
        "securityContext": POD_SECURITY_CONTEXT,
        **placement(spec),
        "volumes": volumes,
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
