"""`kubetune run job.yaml`: the same FineTuneJob on this machine. Plans with the same
planner, materialises the data, and starts the same trainer (under torchrun for several
processes), with metrics on localhost and the report at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.api.inputs import INPUT_FIELDS, trainer_input_uris
from kubetune.api.plan import PlanDocument
from kubetune.contract import INPUT_ENV, Env, source_role
from kubetune.data.objectstore import ObjectStoreError, S3Settings, is_s3, stage_output


@dataclass(frozen=True)
class LocalRun:
    name: str
    output: Path
    config_dir: Path
    env: dict[str, str]
    command: list[str]
    plan: PlanDocument

    @property
    def log_path(self) -> Path:
        """Everything the trainer's processes and their libraries print."""
        return self.output / "logs" / "run.log"

    @property
    def events_path(self) -> Path:
        """Rank 0's console events (kubetune.console), one JSON object per line."""
        return self.output / "logs" / "events.jsonl"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare_local_run(
    job_path: Path,
    nproc: int,
    output: Path | None,
    metrics_port: int | None,
    say: Callable[[str], None] | None = None,
) -> LocalRun:
    """Plan and lay out a local run; raises click-friendly errors with their messages.
    `say` gets the progress of a first build of the built-in base model (default: stderr)."""
    from kubetune.api import job_from_yaml_file
    from kubetune.data.formats import SUFFIX, file_format_of
    from kubetune.local_inputs import config_maps_in, local_source_files, read_uri, s3_settings
    from kubetune.planning.job import build_plan, resolve_gpu_memory

    job = job_from_yaml_file(job_path)
    spec = job.spec
    name = str((job.metadata or {}).get("name") or job_path.stem)
    cms = config_maps_in(job_path)
    s3 = s3_settings(spec)
    model_uri = spec.model.uri
    model_path = _local_model(model_uri, say=say, s3=s3)
    model_config = (
        json.loads((Path(model_path) / "config.json").read_text())
        if Path(model_path).is_dir()
        else _known(model_uri)
    )
    # Locally the machine decides the resources: nproc processes on CPU (or GPUs if any).
    gpus = _cuda_devices()
    local_spec = spec.model_copy(
        update={
            "resources": spec.resources.model_copy(
                update={"num_nodes": 1, "gpus_per_node": min(nproc, gpus) if gpus else 0}
            )
        }
    )
    uris = trainer_input_uris(spec)
    train_bytes, train_src = read_uri(uris["dataset"], INPUT_FIELDS["dataset"], cms, s3)
    val = (
        read_uri(uris["validation"], INPUT_FIELDS["validation"], cms, s3)
        if "validation" in uris
        else None
    )
    extra = local_source_files(spec, cms, s3)
    memory = resolve_gpu_memory(local_spec, None, 80.0)
    if gpus and not spec.resources.gpu_memory_gib:
        local_gib = _cuda_memory_gib()
        memory = (local_gib, f"GPU memory {local_gib:.1f} GiB of the local GPU (smallest)")
    plan = build_plan(
        local_spec,
        train_bytes,
        train_src,
        model_config,
        model_uri,
        memory,
        val[0] if val else None,
        val[1] if val else "",
        cpu_processes=nproc,
        tokenizer_source=model_path,  # a built-in or hub model's local directory
        extra_sources=extra,
    )
    _check_quantisation(plan, "GPU" if gpus else "CPU")
    out = output or _output_dir(spec, name)
    output_uri = spec.output.uri if spec.output is not None and is_s3(spec.output.uri) else None
    if (out / "report.json").exists() and (out / "plan.json").exists():
        # A finished earlier run: start afresh (an unfinished one is resumed instead).
        import shutil

        shutil.rmtree(out)
    config_dir = out / "config"
    data_dir = out / "data"
    config_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    resolved = local_spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    (config_dir / "spec.json").write_text(json.dumps(resolved, indent=2))
    (config_dir / "plan.json").write_text(json.dumps(plan.to_json(), indent=2))
    # The copies keep their file format's extension, so the trainer reads them as the plan did.
    ff = spec.dataset.file_format
    train_copy = data_dir / f"train{SUFFIX[file_format_of(train_src, ff)]}"
    train_copy.write_bytes(train_bytes)
    paths = {"model": model_path, "dataset": str(train_copy)}
    if val:
        val_copy = data_dir / f"validation{SUFFIX[file_format_of(val[1], ff)]}"
        val_copy.write_bytes(val[0])
        paths["validation"] = str(val_copy)
    sources = zip(extra, spec.dataset.sources or (), strict=True)
    for i, ((data, source_name), source) in enumerate(sources):
        suffix = SUFFIX[file_format_of(source_name, source.file_format)]
        copy = data_dir / f"{source_role(i)}{suffix}"
        copy.write_bytes(data)
        paths[source_role(i)] = str(copy)
    if "general" in uris:
        general, _ = read_uri(uris["general"], INPUT_FIELDS["general"], cms, s3)
        (data_dir / "general.txt").write_bytes(general)
        paths["general"] = str(data_dir / "general.txt")
    if "previous" in uris:
        paths["previous"] = _local_directory(uris["previous"], INPUT_FIELDS["previous"], s3)
    if "augmentation" in uris:
        paths["augmentation"] = _local_model(
            uris["augmentation"], INPUT_FIELDS["augmentation"], s3=s3
        )
    objects: dict[str, str] = {}
    if output_uri:
        # The local output is a copy, uploaded as it is written; an unfinished run's
        # checkpoints in the bucket are downloaded first so that it resumes from them.
        from kubetune.local_inputs import InputError

        objects = {**s3.env(), Env.OUTPUT_PATH: output_uri}
        try:
            objects.update(stage_output(objects, out, local=out))
        except ObjectStoreError as exc:
            raise InputError(str(exc)) from None
    env = {
        **os.environ,
        **{INPUT_ENV[role]: path for role, path in paths.items()},
        Env.JOB_NAME: name,
        Env.CONFIG_DIR: str(config_dir),
        Env.OUTPUT_PATH: str(out),
        **objects,
        Env.TERMINATION_MESSAGE_PATH: str(out / "termination.json"),
        Env.METRICS_PORT: str(metrics_port if metrics_port is not None else _free_port()),
        Env.METRICS_HOST: "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return LocalRun(
        name=name,
        output=out,
        config_dir=config_dir,
        env=env,
        command=trainer_command(config_dir, nproc),
        plan=plan,
    )


def trainer_command(config_dir: Path, nproc: int) -> list[str]:
    """The trainer on this machine: one process, or torchrun (standalone) for several."""
    trainer = ["-m", "kubetune.trainer", f"--config-dir={config_dir}"]
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *trainer,
        ]
    return [sys.executable, *trainer]


def _check_quantisation(plan: PlanDocument, accelerator: str) -> None:
    """A QLoRA plan needs a bitsandbytes here that runs 4-bit on this machine's device (on
    the CPU, its CPU path): said before any process starts, naming the field."""
    if plan.method != "QLoRA":
        return
    from kubetune.local_inputs import InputError
    from kubetune.planning.quantization import bitsandbytes_problem
    from kubetune.trainer.model import bitsandbytes_version

    problem = bitsandbytes_problem(bitsandbytes_version(), accelerator)
    if problem is not None:
        raise InputError(f"spec.method.type: {problem}")


def _cuda_memory_gib() -> float:
    """The smallest local GPU's memory in GiB (the plan must fit on each)."""
    import torch

    count = int(torch.cuda.device_count())
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / 2**30


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _local_model(
    uri: str,
    field: str = INPUT_FIELDS["model"],
    say: Callable[[str], None] | None = None,
    s3: S3Settings | None = None,
) -> str:
    from kubetune.local_inputs import InputError

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return str(_s3_copy(uri, field, s3))
    if parsed.scheme == "hf":
        from kubetune.trainer import basemodel

        if basemodel.is_builtin(uri):
            if not _cuda_devices():
                # DeepSpeed (imported with the Trainer) warns when it has to guess the CPU.
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if say is None:
                return str(basemodel.resolve_model(uri))
            return str(basemodel.resolve_model(uri, log=say))
        return uri
    if parsed.scheme == "file":
        return parsed.path
    raise InputError(
        f"{field}: {parsed.scheme}:// models cannot be used locally; use file://, hf:// or s3://"
    )


def _s3_copy(uri: str, field: str, s3: S3Settings | None) -> Path:
    """An s3:// model or output directory, downloaded once into this machine's model
    cache (`$KUBETUNE_MODEL_CACHE/s3/<bucket>/<key>`; delete it to download again)."""
    from kubetune.data.objectstore import COMPLETE_MARKER, parse_s3_uri
    from kubetune.local_inputs import InputError, fetch_s3

    try:
        location = parse_s3_uri(uri, field)
    except ObjectStoreError as exc:
        raise InputError(str(exc)) from None
    base = os.environ.get(Env.MODEL_CACHE) or str(Path.home() / ".cache" / "kubetune" / "models")
    dest = Path(base) / "s3" / location.path
    if not (dest / COMPLETE_MARKER).exists():
        fetch_s3(uri, dest, field, s3)
        (dest / COMPLETE_MARKER).write_text(uri)
    return dest


def _local_directory(uri: str, field: str, s3: S3Settings | None = None) -> str:
    """A directory a local run reads as it is (a previous run's output)."""
    from kubetune.local_inputs import InputError

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return str(_s3_copy(uri, field, s3))
    if parsed.scheme != "file":
        raise InputError(
            f"{field}: {parsed.scheme}:// outputs cannot be read locally; use a file:// or "
            "s3:// one"
        )
    return parsed.path


def _known(uri: str) -> dict[str, Any]:
    from kubetune.local_inputs import read_model_config

    return read_model_config(uri, {})


def _output_dir(spec: Any, name: str) -> Path:
    if spec.output is not None and spec.output.uri and spec.output.uri.startswith("file://"):
        return Path(urlparse(spec.output.uri).path)
    return Path.cwd() / "kubetune-output" / name


#: `kubetune run`'s exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def execute(
    run: LocalRun,
    on_event: Callable[[dict[str, Any]], None],
    *,
    verbose: bool = False,
    poll_seconds: float = 0.2,
) -> int:
    """Run the trainer: its processes' output to `run.log_path` (appended; left on the
    console with `verbose`), each console event it writes passed to `on_event` as it
    comes. Returns the exit code (130 after Ctrl-C, once the trainer has stopped)."""
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.events_path.write_text("")
    env = {**run.env, Env.EVENTS_PATH: str(run.events_path)}
    if verbose:
        env[Env.VERBOSE] = "1"
    with run.log_path.open("ab") as log:
        out = None if verbose else log
        proc = subprocess.Popen(run.command, env=env, stdout=out, stderr=out)
        reader = EventReader(run.events_path)
        try:
            while True:
                finished = proc.poll() is not None
                for event in reader.read():
                    on_event(event)
                if finished:
                    return int(proc.returncode)
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            # The trainer got the same SIGINT (one process group): let it stop for up to
            # a minute; a second Ctrl-C, or the minute passing, kills it.
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                proc.wait()
            return EXIT_INTERRUPTED


class EventReader:
    """The complete lines appended to an events file since the last read, as dicts (a
    line the trainer is still writing waits for the next read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for a failed run's message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
