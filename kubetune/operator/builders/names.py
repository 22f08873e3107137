"""Who a child belongs to: the FineTuneJob's identity, the children's names, the owner
reference, the labels and the metadata every child carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.contract import API_VERSION, COMPONENT_LABEL, JOB_LABEL, KIND, MANAGED_BY


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
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(ref: JobRef, component: str) -> dict[str, str]:
    return {**MANAGED_BY, JOB_LABEL: ref.name, COMPONENT_LABEL: component}


def object_meta(
    ref: JobRef,
    name: str,
    component: str,
    extra_labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A child's metadata: in the job's namespace, owned by it, labelled with it."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ref.namespace,
        "labels": {**(extra_labels or {}), **labels(ref, component)},
        "ownerReferences": [owner_reference(ref)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
