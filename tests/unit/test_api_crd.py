"""The CRD and the pydantic models describe the same API: the same fields, types, enums,
ranges, lengths and defaults; every CRD field is described; every CEL rule has a message; the
URI regular expressions are the same text in both."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubetune import api
from kubetune.api import _types

pytestmark = pytest.mark.unit

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return data


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    assert isinstance(version, dict)
    return version


def _root(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = _version(crd)["schema"]["openAPIV3Schema"]
    return schema


# ---- normalising both schemas to one shape ---------------------------------------------------

_BOUNDS = ("maxLength", "maxItems", "maxProperties")


def _bounds(node: dict[str, Any], out: dict[str, Any], with_bounds: bool) -> None:
    if not with_bounds:
        return
    for key in _BOUNDS:
        if key in node:
            out[key] = node[key]
    for key in ("minimum", "maximum"):
        if key in node:
            exclusive = node.get("exclusive" + key[:1].upper() + key[1:], False)
            out[key] = (float(node[key]), bool(exclusive))
    for key, side in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):  # JSON Schema 2020
            out[side] = (float(value), True)


def _crd_norm(node: dict[str, Any], with_bounds: bool = True) -> dict[str, Any]:
    if node.get("x-kubernetes-int-or-string"):
        out: dict[str, Any] = {"type": "int-or-string"}
        _bounds(node, out, with_bounds)
        return out
    kind = node["type"]
    if kind == "object" and "additionalProperties" in node:
        out = {"type": "map", "values": _crd_norm(node["additionalProperties"], with_bounds)}
    elif kind == "object":
        out = {
            "type": "object",
            "properties": {
                k: _crd_norm(v, with_bounds) for k, v in node.get("properties", {}).items()
            },
            "required": sorted(node.get("required", [])),
        }
        if node.get("x-kubernetes-preserve-unknown-fields"):
            out["preserveUnknown"] = True
    elif kind == "array":
        out = {"type": "array", "items": _crd_norm(node["items"], with_bounds)}
    else:
        out = {"type": kind}
        if "enum" in node:
            out["enum"] = sorted(node["enum"])
        if "default" in node:
            out["default"] = node["default"]
    _bounds(node, out, with_bounds)
    return out


def _py_norm(node: dict[str, Any], defs: dict[str, Any], with_bounds: bool = True) -> Any:
    if "$ref" in node:
        ref = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _py_norm(
            {**ref, **{k: v for k, v in node.items() if k != "$ref"}}, defs, with_bounds
        )
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if [b.get("type") for b in branches] == ["integer", "string"]:
            out: dict[str, Any] = {"type": "int-or-string"}
            _bounds(node, out, with_bounds)
            return out
        (branch,) = branches
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        if node.get("default") is not None:
            rest["default"] = node["default"]
        return _py_norm({**branch, **rest}, defs, with_bounds)
    kind = node.get("type")
    if kind is None and ("enum" in node or "const" in node):
        kind = "string"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        out = {"type": "map", "values": _py_norm(node["additionalProperties"], defs, with_bounds)}
    elif kind == "object":
        out = {
            "type": "object",
            "properties": {
                k: _py_norm(v, defs, with_bounds) for k, v in node.get("properties", {}).items()
            },
            "required": sorted(node.get("required", [])),
        }
        if node.get("additionalProperties") is True:
            out["preserveUnknown"] = True
    elif kind == "array":
        out = {"type": "array", "items": _py_norm(node["items"], defs, with_bounds)}
    else:
        out = {"type": kind}
        if "enum" in node or "const" in node:
            out["enum"] = sorted(node.get("enum", [node.get("const")]))
        if node.get("default") is not None:
            out["default"] = node["default"]
    _bounds(node, out, with_bounds)
    return out


def _model_norm(model: type[BaseModel], with_bounds: bool = True) -> Any:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _py_norm(schema, schema.get("$defs", {}), with_bounds)


def _strip_object_defaults(node: Any) -> Any:
    """Object-valued defaults are compared by `test_schema_defaults_match_the_models`."""
    if isinstance(node, dict):
        return {
            k: _strip_object_defaults(v)
            for k, v in node.items()
            if not (k == "default" and isinstance(v, dict))
        }
    return node


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'crd' if key in a else 'pydantic'}")
            else:
                out.extend(_diff(a[key], b[key], f"{path}.{key}"))
        return out
    return [] if a == b else [f"{path}: crd {a!r} != pydantic {b!r}"]


def test_spec_schema_matches_the_pydantic_models(crd: dict[str, Any]) -> None:
    spec_schema = _strip_object_defaults(_crd_norm(_root(crd)["properties"]["spec"]))
    assert _diff(spec_schema, _model_norm(api.FineTuneJobSpec)) == []


def test_status_schema_matches_the_pydantic_models(crd: dict[str, Any]) -> None:
    # Status is written by the operator: the same fields and types; bounds are the CRD's job.
    status_schema = _crd_norm(_root(crd)["properties"]["status"], with_bounds=False)
    assert _diff(status_schema, _model_norm(api.FineTuneJobStatus, with_bounds=False)) == []


# ---- defaults -------------------------------------------------------------------------------


def _apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default
    gets it, then the result is defaulted again (so `default: {}` fills nested defaults)."""
    if not isinstance(value, dict) or node.get("type") != "object":
        return value
    out = dict(value)
    for key, prop in node.get("properties", {}).items():
        if key not in out and "default" in prop:
            out[key] = prop["default"]
        if key in out:
            out[key] = _apply_defaults(prop, out[key])
    return out


def test_schema_defaults_match_the_models(crd: dict[str, Any]) -> None:
    minimal = {"model": {"uri": "hf://org/name"}, "dataset": {"uri": "pvc://data/train.jsonl"}}
    spec_schema = _root(crd)["properties"]["spec"]
    by_schema = _apply_defaults(spec_schema, minimal)
    by_model = api.FineTuneJobSpec.model_validate(minimal).to_manifest()
    assert by_schema == by_model
    assert by_model["method"] == {"type": "Auto"}
    assert by_model["deepspeed"] == {"zeroStage": "Auto", "offload": "Auto"}


# ---- documentation and rules ----------------------------------------------------------------


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, prop in node.get("properties", {}).items():
        found.extend(_walk(prop, f"{path}.{key}"))
    if isinstance(node.get("items"), dict):
        found.extend(_walk(node["items"], f"{path}[]"))
    if isinstance(node.get("additionalProperties"), dict):
        found.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return found


def test_every_field_has_a_description(crd: dict[str, Any]) -> None:
    root = _root(crd)
    undocumented = [
        path
        for path, node in _walk(root, "")
        # metadata is ObjectMeta (the API server forbids describing it); scalar array items and
        # map values are described by their array or map.
        if path != ".metadata"
        and not (path.endswith(("[]", "{}")) and node.get("type") != "object")
        and not node.get("description", "").strip()
    ]
    assert undocumented == []


def test_every_cel_rule_has_a_message(crd: dict[str, Any]) -> None:
    rules = [
        (path, rule)
        for path, node in _walk(_root(crd), "")
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 15
    assert [(p, r["rule"]) for p, r in rules if not r.get("message")] == []


def test_cel_uri_regexes_are_the_python_ones(crd: dict[str, Any]) -> None:
    nodes = dict(_walk(_root(crd), ""))

    def regex(path: str) -> str:
        (rule,) = nodes[path]["x-kubernetes-validations"]
        match = re.fullmatch(r"self\.matches\('(.*)'\)", rule["rule"].strip())
        assert match, rule["rule"]
        return match.group(1)

    assert regex(".spec.model.uri") == f"^({_types.MODEL_URI_PATTERN})$"
    for field in ("uri", "validationUri", "generalTextUri"):
        assert regex(f".spec.dataset.{field}") == f"^({_types.DATA_URI_PATTERN})$"
    assert regex(".spec.output.uri") == f"^({_types.OUTPUT_URI_PATTERN})$"


def test_names_printer_columns_and_subresources(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == api.CRD_NAME
    assert crd["spec"]["group"] == api.GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        api.KIND,
        api.PLURAL,
        api.SINGULAR,
    )
    assert names["shortNames"] == [api.SHORT_NAME]
    assert names["categories"] == [api.CATEGORY]
    version = _version(crd)
    assert version["name"] == api.VERSION
    assert version["subresources"] == {"status": {}}
    default_columns = [
        (c["name"].upper(), c["jsonPath"])
        for c in version["additionalPrinterColumns"]
        if not c.get("priority")
    ]
    assert default_columns == [
        ("STATUS", ".status.state"),
        ("METHOD", ".status.plan.method"),
        ("PROGRESS", ".status.progress.percentage"),
        ("EVAL-LOSS", ".status.metrics.evalLoss"),
        ("GAP", ".status.metrics.lossGap"),
        ("PPL", ".status.metrics.evalPerplexity"),
        ("AGE", ".metadata.creationTimestamp"),
    ]


def test_condition_list_is_a_map_keyed_by_type(crd: dict[str, Any]) -> None:
    conditions = _root(crd)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == ["type", "status"]
