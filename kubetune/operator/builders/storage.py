"""Where the pods read their inputs and write the output: each URI as a path in the pod and
the volume (and mount) that provides it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kubetune.api.inputs import trainer_input_uris
from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator.builders.names import JobRef
from kubetune.operator.settings import OperatorSettings


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
    """Map a `pvc://`, `configmap://`, `file://`, `hf://` or `s3://` URI to a path and volume.

    `file://` paths are used as they are (baked into the image or on the node); for
    outputs they are a hostPath of the same path so the node keeps what was written, and
    `host=True` mounts one read-only (a previous run's output, written the same way).
    `hf://` models and datasets and `s3://` objects are downloaded by the pod itself and
    need no volume (an `s3://` output is uploaded by the trainer).
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
    if scheme in ("hf", "s3"):
        return Storage(path=uri)
    raise ValueError(f"unsupported URI scheme in {uri!r}")


def output_uri(ref: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    """spec.output.uri, else the operator's default output for this job."""
    if spec.output is not None and spec.output.uri:
        return str(spec.output.uri)
    return settings.default_output_uri.format(namespace=ref.namespace, name=ref.name)


# Volume names by role (kept short: `data-...` for the dataset).
_VOLUME_ROLE = {"dataset": "data"}


def job_storages(
    ref: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings
) -> dict[str, Storage]:
    """Every input of `trainer_input_uris` (by role) and the output, as paths and volumes."""
    out: dict[str, Storage] = {}
    for role, uri in trainer_input_uris(spec).items():
        # A previous run's output is a directory the node wrote (mounted read-only as is).
        out[role] = storage_for(uri, _VOLUME_ROLE.get(role, role), host=role == "previous")
    out["output"] = storage_for(output_uri(ref, spec, settings), "output", read_only=False)
    return out


def volumes_and_mounts(
    storages: dict[str, Storage],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The storages' volumes and mounts, each once."""
    volumes: dict[str, dict[str, Any]] = {}
    mounts: dict[str, dict[str, Any]] = {}
    for s in storages.values():
        if s.volume and s.mount:
            volumes.setdefault(s.volume["name"], s.volume)
            mounts.setdefault(s.mount["mountPath"], s.mount)
    return list(volumes.values()), list(mounts.values())
