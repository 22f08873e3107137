"""The FineTuneJob resource, and parsing a manifest (dict, YAML/JSON text or file) into it with
errors that name the field path like the API server does."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus
from kubetune.contract import GROUP, KIND


class FineTuneJob(BaseModel):
    """A FineTuneJob object: apiVersion, kind, metadata (kept as a dict), spec, status."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = Field(default=None, strict=False)

    @property
    def name(self) -> str | None:
        name = self.metadata.get("name")
        return name if isinstance(name, str) else None

    @property
    def namespace(self) -> str | None:
        namespace = self.metadata.get("namespace")
        return namespace if isinstance(namespace, str) else None

    def to_manifest(self) -> dict[str, Any]:
        """The object as JSON-ready camelCase data (unset optional fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class SpecError(ValueError):
    """A manifest that is not a valid FineTuneJob. `str()` is one line per problem, each
    `[<source>: ]<field path>: <message>`; `problems` holds the (path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        lines = [
            f"{prefix}{path}: {message}" if path else f"{prefix}{message}"
            for path, message in problems
        ]
        super().__init__("\n".join(lines))


# ---- YAML -----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as kubectl sends them: `1e-4` is a float (PyYAML
    alone follows YAML 1.1 and reads the string "1e-4"), a whole float such as 2.0 is 2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | int:
    # kubectl converts YAML to JSON with Go's encoder, which writes a whole float as an
    # integer: `numNodes: 2.0` and `zeroStage: 3.0` arrive at the API server as 2 and 3.
    value = loader.construct_yaml_float(node)
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml_documents(text: str) -> list[Any]:
    """Every non-empty document of a YAML (or JSON) stream, floats read as kubectl reads them."""
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]


# ---- parsing --------------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            path += f".{part}" if path else part
        else:  # a map key such as a label name
            path += f"[{part}]"
    return path


def _problem(error: ErrorDetails) -> tuple[str, str]:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    context = error.get("ctx") or {}
    field_path = context.get("field_path")
    if isinstance(field_path, str):
        loc = loc + tuple(field_path.split("."))
    return _path(loc), error["msg"]


def _plain(value: Any) -> Any:
    """Nested mappings (a Kopf body, a MappingProxyType) as the dicts strict models expect."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _from_mapping(data: Mapping[str, Any], source: str | None) -> FineTuneJob:
    try:
        return FineTuneJob.model_validate(_plain(data))
    except ValidationError as exc:
        raise SpecError([_problem(e) for e in exc.errors()], source) from None
    except RecursionError:  # found by fuzzing: a value nested thousands deep
        raise SpecError([("", "the manifest is nested too deeply")], source) from None


def _from_documents(documents: list[Any], source: str | None) -> FineTuneJob:
    jobs = [d for d in documents if isinstance(d, Mapping) and d.get("kind") == KIND]
    if len(jobs) == 1:
        return _from_mapping(jobs[0], source)
    if not jobs and len(documents) == 1 and _meant_as_job(documents[0]):
        return _from_mapping(documents[0], source)  # reports the wrong kind or apiVersion
    if jobs:
        found = f"{len(jobs)} FineTuneJobs"
    else:
        kinds = [str(d.get("kind")) for d in documents if isinstance(d, Mapping)]
        found = "no FineTuneJob" + (f" (kinds: {', '.join(kinds)})" if kinds else "")
    raise SpecError([("", f"expected one FineTuneJob document, found {found}")], source)


def _meant_as_job(document: Any) -> bool:
    """A lone document without a kind, or of our API group, is validated as a FineTuneJob."""
    if not isinstance(document, Mapping):
        return False
    api_version = document.get("apiVersion")
    return "kind" not in document or (
        isinstance(api_version, str) and api_version.startswith(GROUP + "/")
    )


def _parse_text(text: str, source: str | None) -> FineTuneJob:
    try:
        documents = load_yaml_documents(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}")], source) from None
    except RecursionError:  # found by fuzzing: `[[[[...` thousands deep
        raise SpecError([("", "not valid YAML: nested too deeply")], source) from None
    return _from_documents(documents, source)


def parse_job(data: Mapping[str, Any] | str | Path) -> FineTuneJob:
    """A FineTuneJob from a dict, from YAML/JSON text (a `str`), or from a file (a `Path`).

    A YAML stream may hold other documents (a ConfigMap with the data, say): the one
    FineTuneJob among them is taken. Raises `SpecError` naming the field path, and the file
    for a file.
    """
    if isinstance(data, Path):
        return job_from_yaml_file(data)
    if isinstance(data, str):
        return _parse_text(data, None)
    if isinstance(data, Mapping):
        return _from_mapping(data, None)
    raise TypeError(f"parse_job takes a mapping, YAML text or a Path, not {type(data).__name__}")


def job_from_yaml_file(path: str | Path) -> FineTuneJob:
    """The FineTuneJob in a YAML or JSON file; errors start with the file name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([("", f"cannot read: {exc.strerror}")], str(path)) from None
    return _parse_text(text, str(path))
