"""Read a job's inputs on this machine for `kubetune plan|validate|run`: `file://` paths,
`configmap://name/key` from a ConfigMap in the same YAML file, `s3://bucket/key` objects (with
the endpoint of spec.storage.s3 and the credentials of the environment), hub datasets
(`hf://datasets/org/name` with spec.dataset.hub, through the hub cache as the prepare pod reads
them: HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE apply) and the model configs we
ship for well-known `hf://` ids."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.api import FineTuneJobSpec, load_yaml_documents
from kubetune.api.spec import HubDataset as HubFields
from kubetune.data.hub import HubDataset, hub_dataset, is_hub_repo
from kubetune.data.objectstore import ObjectStoreError, S3Settings, fetch


class InputError(ValueError):
    """An input cannot be read locally; the message names the field and says what to do."""


ConfigMaps = dict[str, dict[str, str | bytes]]


def config_maps_in(path: Path) -> ConfigMaps:
    """ConfigMaps defined next to the job in its YAML file, by name: their `data` keys as
    text and their `binaryData` keys (base64 in the file; a Parquet file, say) as bytes."""
    out: ConfigMaps = {}
    for doc in load_yaml_documents(path.read_text(encoding="utf-8")):
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            keys: dict[str, str | bytes] = {
                str(k): base64.b64decode(str(v)) for k, v in (doc.get("binaryData") or {}).items()
            }
            keys.update({str(k): str(v) for k, v in (doc.get("data") or {}).items()})
            out[str(doc["metadata"]["name"])] = keys
    return out


def s3_settings(spec: FineTuneJobSpec) -> S3Settings:
    """spec.storage.s3's endpoint, region and style, with the environment's credentials
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; the Secret is for the pods)."""
    s3 = spec.storage.s3 if spec.storage is not None else None
    env = S3Settings.from_env()
    if s3 is None:
        return env
    return env.with_spec(s3.endpoint_url, s3.region, s3.path_style)


def fetch_s3(
    uri: str, dest: Path, field: str, s3: S3Settings | None, only: tuple[str, ...] | None = None
) -> Path:
    """An s3:// object or prefix downloaded here; an InputError naming the field if not."""
    try:
        return fetch(uri, dest, field, s3 or S3Settings.from_env(), only=only)
    except ObjectStoreError as exc:
        raise InputError(str(exc)) from None


def read_uri(
    uri: str, field: str, config_maps: ConfigMaps, s3: S3Settings | None = None
) -> tuple[bytes, str]:
    """The bytes behind a data URI and a name for messages."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kubetune-s3-") as tmp:
            path = fetch_s3(uri, Path(tmp), field, s3)
            if path.is_dir():
                raise InputError(f"{field}: {uri} is a prefix; point at a data object")
            return path.read_bytes(), uri
    if parsed.scheme == "file":
        path = Path(parsed.path)
        try:
            return path.read_bytes(), str(path)
        except FileNotFoundError:
            raise InputError(f"{field}: {path} does not exist") from None
        except IsADirectoryError:
            raise InputError(f"{field}: {path} is a directory; point at a data file") from None
    if parsed.scheme == "configmap":
        name, key = parsed.netloc, parsed.path.lstrip("/")
        if name not in config_maps:
            raise InputError(
                f"{field}: ConfigMap {name!r} is not in the job file; add it as "
                "another YAML document to plan locally"
            )
        if key not in config_maps[name]:
            raise InputError(f"{field}: ConfigMap {name!r} has no key {key!r}")
        value = config_maps[name][key]
        return (value.encode() if isinstance(value, str) else value), uri
    raise InputError(
        f"{field}: {parsed.scheme}:// inputs cannot be read locally; use a "
        "file:// copy to plan on this machine"
    )


#: What `read_data` gives `build_plan`: a file's bytes, or a hub dataset it reads itself.
LocalData = bytes | HubDataset


def read_data(
    uri: str,
    field: str,
    config_maps: ConfigMaps,
    s3: S3Settings | None = None,
    hub: HubFields | None = None,
    split: str | None = None,
) -> tuple[LocalData, str]:
    """The data behind a dataset URI and a name for messages: a whole hub repository as the
    HubDataset of its spec's `hub` fields (`split` instead of their split; the planner reads it
    through the hub cache), the rest by `read_uri`."""
    if is_hub_repo(uri):
        ref = hub_dataset(uri, hub.model_dump() if hub else None, split)
        return ref, ref.source
    return read_uri(uri, field, config_maps, s3)


def read_model_config(
    uri: str, config_maps: ConfigMaps, s3: S3Settings | None = None
) -> dict[str, Any]:
    from kubetune.planning.job import known_model_config

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kubetune-s3-") as tmp:
            path = fetch_s3(uri, Path(tmp), "spec.model.uri", s3, only=("config.json",))
            config = path if path.is_file() else path / "config.json"
            if not config.is_file():
                raise InputError(f"spec.model.uri: {uri} has no config.json")
            try:
                loaded: dict[str, Any] = json.loads(config.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"spec.model.uri: {uri}/config.json is not valid JSON ({exc.msg})"
                ) from None
            return loaded
    if uri.startswith("hf://kubetune/"):
        from kubetune.trainer.basemodel import builtin_model_config

        return builtin_model_config(uri)
    if parsed.scheme == "hf":
        known = known_model_config(uri)
        if known is None:
            raise InputError(
                f"spec.model.uri: {uri} is not one of the model configs kubetune "
                "ships; download its config.json and use file:///path/to/it"
            )
        return known
    if parsed.scheme == "file":
        path = Path(parsed.path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"spec.model.uri: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"spec.model.uri: {path} is not valid JSON ({exc.msg})") from None
        return data
    raw, _ = read_uri(uri, "spec.model.uri", config_maps)
    try:
        parsed_config: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"spec.model.uri: {uri} is not valid JSON ({exc.msg})") from None
    return parsed_config


def local_sources(
    spec: FineTuneJobSpec, config_maps: ConfigMaps, s3: S3Settings | None = None
) -> list[tuple[LocalData, str]]:
    """The data of spec.dataset.sources, read here (as `read_data`), in order."""
    return [
        read_data(source.uri, f"spec.dataset.sources[{i}].uri", config_maps, s3, source.hub)
        for i, source in enumerate(spec.dataset.sources or ())
    ]


def local_source_files(
    spec: FineTuneJobSpec, config_maps: ConfigMaps, s3: S3Settings | None = None
) -> list[tuple[bytes, str]]:
    """The files of spec.dataset.sources, read here as bytes (`kubetune run` copies them for
    its trainer), in order."""
    return [
        read_uri(source.uri, f"spec.dataset.sources[{i}].uri", config_maps, s3)
        for i, source in enumerate(spec.dataset.sources or ())
    ]


def local_dataset(
    spec: FineTuneJobSpec, config_maps: ConfigMaps, s3: S3Settings | None = None
) -> tuple[tuple[LocalData, str], tuple[LocalData, str] | None]:
    """spec.dataset.uri and spec.dataset.validationUri (None without one) read here; a hub
    validationUri is read at its split "validation", as the prepare pod reads it."""
    ds = spec.dataset
    train = read_data(ds.uri, "spec.dataset.uri", config_maps, s3, ds.hub)
    if not ds.validation_uri:
        return train, None
    field = "spec.dataset.validationUri"
    return train, read_data(ds.validation_uri, field, config_maps, s3, ds.hub, "validation")
