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


def secret_file_source(job: dict[str, Any], name: str) -> tuple[str, str]:
    """The (Secret, key) that the secret NAME of a child Job's pod is read from: NAME_FILE
    names a file under a read-only Secret volume's mount, whose items map the key to it. No
    NAME variable may carry the secret itself."""
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert name not in env, f"{name} is an environment variable; secrets are files"
    path = env[name + "_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    relative = path[len(mount["mountPath"]) + 1 :]
    item = next(i for i in volume["items"] if i["path"] == relative)
    return volume["secretName"], item["key"]
