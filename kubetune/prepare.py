"""The prepare step (`python -m kubetune.prepare`), run by the operator as a small CPU pod
when it cannot read a job's inputs through the API itself.

It reads the dataset (and validation set) and the model's config.json from the paths the
operator put in the environment, validates the data, plans, and writes
`{"plan": {...}}` (or `{"error": "..."}`) as the container's termination message. Data or
config errors exit with the configuration-error code so the Job fails without retrying.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.contract import (
    EXIT_CONFIG_ERROR,
    INPUT_ENV,
    TERMINATION_LIMIT_BYTES,
    Env,
    encode_prepare_message,
    secret_value,
    source_role,
    termination_path,
)
from kubetune.data.hub import HubDataset, hub_dataset

MAX_MESSAGE = TERMINATION_LIMIT_BYTES


def encode_message(result: dict[str, Any]) -> str:
    """Compact JSON, or gzip+base64 behind `gz:` when it would not fit the 4 KiB limit."""
    return encode_prepare_message(result)


def read_model_config(location: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """config.json from a local path/directory, a bundled well-known model, or the hub."""
    from kubetune.planning import ModelConfigError
    from kubetune.planning.job import known_model_config

    if location.startswith("hf://"):
        if location.startswith("hf://kubetune/") and known_model_config(location) is None:
            raise ModelConfigError(
                f"spec.model.uri: {location} is not a model kubetune builds; the built-in "
                "models are hf://kubetune/tiny-llama-en"
            )
        known = known_model_config(location)
        if known is not None:
            return known, location
        repo = location.removeprefix("hf://")
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        except ImportError as exc:
            raise ValueError(f"{location}: reading a hub model needs huggingface_hub") from exc
        token = secret_value("HF_TOKEN")
        try:
            path = Path(hf_hub_download(repo, "config.json", revision=revision, token=token))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise ModelConfigError(
                f"spec.model.uri: cannot read {location}'s config.json from the hub "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "check that the pods can reach the hub (HF_ENDPOINT) and, for a gated model, "
                "spec.model.secretRef, or copy the model to a volume and use pvc://"
            ) from exc
        fetch_hub_tokenizer(repo, revision, token)
    else:
        path = Path(location)
        if path.is_dir():
            path = path / "config.json"
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError as exc:
        raise ModelConfigError(
            f"model config not found at {path}; spec.model.uri must point to a "
            "model directory or its config.json"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def read_hub_weights(
    location: str, revision: str | None, model_source: str
) -> tuple[Any, str] | None:
    """A hub model's parameter counts from its safetensors headers
    (`kubetune.planning.hubweights`: the hub's metadata, or offline the cached snapshot next
    to `model_source`, its config.json); None for other sources and for the well-known models
    kubetune ships the config of (planned from the table, without the hub)."""
    from kubetune.planning.hubweights import hub_weight_counts
    from kubetune.planning.job import known_model_config

    if not location.startswith("hf://") or known_model_config(location) is not None:
        return None
    token = secret_value("HF_TOKEN")
    repo = location.removeprefix("hf://")
    return hub_weight_counts(repo, revision, token, Path(model_source).parent)


def fetch_hub_tokenizer(repo: str, revision: str | None, token: str | None) -> None:
    """The tokenizer files of a hub model, into the same snapshot directory as its
    config.json, so the plan counts tokens with them; where the model has none (or the hub
    refuses), the plan estimates and says so."""
    from huggingface_hub import hf_hub_download

    from kubetune.data.tokens import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        try:
            hf_hub_download(repo, name, revision=revision, token=token)
        except Exception:  # a missing file or the hub's refusal: planned without it
            if name == TOKENIZER_FILE:
                return


def read_data(
    location: str, hub: dict[str, Any] | None = None, split: str | None = None
) -> bytes | HubDataset:
    """A file's bytes, or the hub dataset (spec.dataset.hub's config, split and revision;
    `split` instead of its split) that `build_plan` reads through the hub cache."""
    if location.startswith("hf://"):
        return hub_dataset(location, hub, split)
    path = Path(location)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"dataset file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ValueError(f"{path} is a directory; point the URI at a data file") from exc


def fetch_model_once(location: str, fetch_dir: Path, revision: str | None) -> Path:
    """An hf:// model, all its files, into the job's model cache (spec.storage.modelCache);
    skipped when an earlier prepare pod completed it."""
    from kubetune.data.objectstore import COMPLETE_MARKER

    if (fetch_dir / COMPLETE_MARKER).exists():
        return fetch_dir
    from huggingface_hub import snapshot_download

    from kubetune.planning import ModelConfigError

    try:
        snapshot_download(
            location.removeprefix("hf://"),
            revision=revision,
            token=secret_value("HF_TOKEN"),
            local_dir=fetch_dir,
        )
    except Exception as exc:  # the hub's refusal or the volume's: named, the cache incomplete
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelConfigError(
            f"spec.model.uri: cannot download {location} into spec.storage.modelCache "
            f"({type(exc).__name__}: {first}); check the name and spec.model.revision, that "
            "the pods can reach the hub (HF_ENDPOINT) and, for a gated model, "
            "spec.model.secretRef"
        ) from exc
    (fetch_dir / COMPLETE_MARKER).write_text(location)
    return fetch_dir


def stage(env: dict[str, str], revision: str | None) -> dict[str, str]:
    """The environment with every s3:// input downloaded (and the model, when the job has
    a model cache, downloaded once into it in full; else only what planning reads)."""
    from kubetune.data.objectstore import PLANNING_MODEL_FILES, is_s3, stage_inputs, work_dir

    fetch_dir = Path(env[Env.MODEL_FETCH_DIR]) if env.get(Env.MODEL_FETCH_DIR) else None
    model = env.get(Env.MODEL_PATH, "")
    staged = dict(env)
    if any(is_s3(v) for v in env.values()):
        staged.update(
            stage_inputs(
                env,
                work_dir(env, "kubetune-prepare-"),
                model_dir=fetch_dir,
                model_files=None if fetch_dir else PLANNING_MODEL_FILES,
            )
        )
    if fetch_dir is not None and model.startswith("hf://"):
        staged[Env.MODEL_PATH] = str(fetch_model_once(model, fetch_dir, revision))
    return staged


def run(env: dict[str, str]) -> dict[str, Any]:
    from kubetune.api.spec import FineTuneJobSpec
    from kubetune.planning.job import build_plan

    spec = FineTuneJobSpec.model_validate(json.loads(env[Env.SPEC_JSON]))
    named = env  # messages name an s3:// file by its URI, not by where it was downloaded
    env = stage(env, spec.model.revision)
    model, model_source = read_model_config(env[Env.MODEL_PATH], spec.model.revision)
    hub_weights = read_hub_weights(env[Env.MODEL_PATH], spec.model.revision, model_source)
    if named[Env.MODEL_PATH].startswith("s3://"):
        model_source = named[Env.MODEL_PATH]
    train_path = env[Env.DATASET_PATH]
    val_path = env.get(Env.VALIDATION_PATH)
    gpu_memory = float(env.get(Env.GPU_MEMORY_GIB, "80"))
    hub = spec.dataset.hub.model_dump() if spec.dataset.hub else None
    extra: list[tuple[bytes | HubDataset, str]] = []
    for i, source in enumerate(spec.dataset.sources or ()):
        var = INPUT_ENV[source_role(i)]
        source_hub = source.hub.model_dump() if source.hub else None
        extra.append((read_data(env[var], source_hub), named[var]))
    plan = build_plan(
        spec,
        read_data(train_path, hub),
        named[Env.DATASET_PATH],
        model,
        model_source,
        (gpu_memory, f"GPU memory {gpu_memory:g} GiB as the operator resolved it"),
        read_data(val_path, hub, "validation") if val_path else None,
        named.get(Env.VALIDATION_PATH) or "",
        extra_sources=extra,
        hub_weights=hub_weights,
        tokenizer_source=str(Path(env[Env.MODEL_PATH]))
        if named[Env.MODEL_PATH].startswith("s3://")
        else None,
    )
    return {"plan": plan.to_json()}


def main() -> int:
    try:
        result = run(dict(os.environ))
        code = 0
        try:
            message = encode_message(result)
        except ValueError:  # over the kubelet's 4 KiB: without what reading it recomputes
            compact = PlanDocument.model_validate(result["plan"]).to_compact_json()
            message = encode_message({**result, "plan": compact})
    except (ValueError, KeyError) as exc:
        from kubetune.planning import ModelConfigError

        reason = "ModelConfigError" if isinstance(exc, ModelConfigError) else "DataError"
        result = {"error": str(exc), "reason": reason}
        code = EXIT_CONFIG_ERROR
        message = encode_message(result)
    with contextlib.suppress(OSError):
        termination_path().write_text(message)
    print(json.dumps(result, indent=2), file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
