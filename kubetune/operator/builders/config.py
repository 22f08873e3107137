"""What the trainer reads besides its inputs: the ConfigMap with the resolved spec and the
plan, and the Secret with the token the operator uses to talk to it."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import CONFIG_MOUNT
from kubetune.operator.builders.names import JobRef, config_name, control_name, object_meta
from kubetune.operator.builders.pod import spec_document
from kubetune.operator.builders.storage import output_uri
from kubetune.operator.settings import OperatorSettings

CONFIG_VOLUME = "kubetune-config"
#: The control Secret's key (the trainer reads it as a file, KUBETUNE_CONTROL_TOKEN_FILE).
CONTROL_TOKEN_KEY = "token"


def config_map(
    ref: JobRef, spec: FineTuneJobSpec, plan: PlanDocument, settings: OperatorSettings
) -> dict[str, Any]:
    resolved = spec_document(spec)
    resolved["output"] = {"uri": output_uri(ref, spec, settings)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(ref, config_name(ref), "config"),
        "data": {
            "spec.json": json.dumps(resolved, indent=2, sort_keys=True),
            "plan.json": json.dumps(plan.to_json(), indent=2, sort_keys=True),
        },
    }


def config_volume(ref: JobRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap's volume and its read-only mount at the config directory."""
    return (
        {"name": CONFIG_VOLUME, "configMap": {"name": config_name(ref)}},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": True},
    )


def control_secret(ref: JobRef, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(ref, control_name(ref), "control"),
        "type": "Opaque",
        "stringData": {CONTROL_TOKEN_KEY: token},
    }
