"""Build FineTuneJob specs for unit tests: a base spec deep-merged with a test's fields."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.api import FineTuneJobSpec, parse_job
from kubetune.planning import ModelArch, bundled_architectures, load_model_arch


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_from(base: dict[str, Any], name: str, namespace: str, **extra: Any) -> FineTuneJobSpec:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": merge(base, extra),
    }
    return parse_job(manifest).spec


def arch(name: str) -> ModelArch:
    """A bundled architecture by its file's name (``llama-2-7b``, ``qwen3-0.6b``...)."""
    return load_model_arch(bundled_architectures()[name])
