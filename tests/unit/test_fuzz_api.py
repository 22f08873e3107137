"""Fuzz the spec parser (kubetune.api) with hypothesis: whatever a user or a client sends,
`parse_job` returns a FineTuneJob or raises SpecError (never another exception), a parsed job
survives a round trip through its manifest, and `check_update` never raises.

`KUBETUNE_FUZZ_EXAMPLES` sets the examples per property (CI: a small default; the long
offline run in docs/operator.md used many more)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune import api

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "fuzz", "namespace": "ns"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-hf", "secretRef": {"name": "hf"}},
        "dataset": {"uri": "configmap://d/train.jsonl", "validationSplit": 0.1},
        "method": {"type": "LoRA", "lora": {"rank": 8}},
        "hyperparameters": {"learningRate": 1e-4, "epochs": 2},
        "resources": {"numNodes": 1, "gpusPerNode": 8},
        "deepspeed": {"zeroStage": 2, "offload": "None"},
        "earlyStopping": {"patience": 3},
        "tolerations": [{"key": "k", "operator": "Exists"}],
        "labels": {"a": "b"},
    },
}

# Values of every JSON type, nested a little: what a confused client might put anywhere.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(
        ["Auto", "LoRA", "Full", "Prefix", "Partial", "2", "3.0", "1e-4", "hf://x", "file:///a"]
    )
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    return out


ALL_PATHS = [p for p in _paths(VALID["spec"]) if p]


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _check(data: Any) -> api.FineTuneJob | None:
    error: api.SpecError | None = None
    try:
        return api.parse_job(data)
    except api.SpecError as exc:
        error = exc
    assert str(error)  # a message a person can read
    assert all(isinstance(m, str) and m for _, m in error.problems)
    return None


def _roundtrip(job: api.FineTuneJob) -> None:
    manifest = job.to_manifest()
    json.dumps(manifest)  # JSON-ready
    again = api.parse_job(manifest)
    assert again.spec == job.spec
    assert api.check_update(job.spec, again.spec) == []


@FUZZ
@given(st.sampled_from(ALL_PATHS), JSONISH)
def test_any_value_at_any_field_is_accepted_or_a_spec_error(
    path: tuple[str, ...], value: Any
) -> None:
    body = copy.deepcopy(VALID)
    _set(body["spec"], path, value)
    job = _check(body)
    if job is not None:
        _roundtrip(job)
        api.check_update(api.parse_job(VALID).spec, job.spec)


@FUZZ
@given(st.dictionaries(st.text(max_size=20), JSONISH, max_size=6))
def test_arbitrary_specs_are_accepted_or_a_spec_error(spec: dict[str, Any]) -> None:
    body = {**copy.deepcopy(VALID), "spec": spec}
    job = _check(body)
    if job is not None:
        _roundtrip(job)


@FUZZ
@given(JSONISH)
def test_arbitrary_documents_are_accepted_or_a_spec_error(document: Any) -> None:
    _check(document if isinstance(document, dict) else json.dumps(document))


YAML_PIECES = st.sampled_from(
    [
        "apiVersion: kubetune.dev/v1alpha1\n",
        "kind: FineTuneJob\n",
        "spec:\n",
        "  model: {uri: hf://gpt2}\n",
        "  dataset: {uri: pvc://d/t.jsonl}\n",
        "  resources: {numNodes: 2.0}\n",
        "  deepspeed: {zeroStage: 3.0}\n",
        "  hyperparameters: {learningRate: 1e-4}\n",
        "---\n",
        "&a [*a]\n",
        "x: &anchor {a: 1}\ny: *anchor\n",
        "!!python/object:os.system {}\n",
        "- 1\n",
        "  ",
        "\t",
        ":",
        "{",
        "[",
        '"',
        "\x00",
        "\ufeff",
        ".nan",
        ".inf",
        "0x1F",
        "1_000",
        "~",
        "<<: *anchor\n",
        "? complex\n",
        "%YAML 1.1\n",
        "!!binary aGVsbG8=\n",
    ]
)


@FUZZ
@given(st.lists(YAML_PIECES | st.text(max_size=20), max_size=14).map("".join))
def test_yaml_text_is_accepted_or_a_spec_error(text: str) -> None:
    job = _check(text)
    if job is not None:
        _roundtrip(job)


@pytest.mark.parametrize("depth", [1, 100, 1500])
def test_deep_nesting_is_a_spec_error_not_a_crash(depth: int) -> None:
    # Regression found by fuzzing: very deep flow collections made PyYAML raise
    # RecursionError out of parse_job.
    _check("spec: " + "[" * depth + "]" * depth)
    nested: Any = 1
    for _ in range(depth):
        nested = {"a": nested}
    _check({**VALID, "spec": {**VALID["spec"], "labels": nested}})
