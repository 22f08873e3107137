"""The trainer's side of s3:// URIs: the launcher downloads the inputs and an earlier
attempt's output (its checkpoints, for the resume) before torchrun starts; each checkpoint
is uploaded when it is saved (rank 0 of each node; the job's rank 0 also removes from the
bucket the checkpoints the Trainer rotated out); the whole output is uploaded at the end."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.data.objectstore import (
    S3Settings,
    delete_prefix,
    list_prefixes,
    stage_inputs,
    stage_output,
    upload,
)
from kubetune.trainer.runtime import rank

log = logging.getLogger("kubetune.trainer")
OUTPUT_FIELD = "spec.output.uri"


def stage(env: Mapping[str, str], work_dir: Path) -> dict[str, str]:
    """The variables to change so that the trainer reads and writes local paths only."""
    return {**stage_inputs(env, work_dir), **stage_output(env, work_dir)}


def _uploads_here() -> bool:
    """Rank 0 of this node (each node uploads what it wrote: its shards of a checkpoint)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


class UploadCheckpoints(TrainerCallback):
    """On each save: the new checkpoint directory to `<output uri>/checkpoints/`."""

    def __init__(self, output_uri: str, settings: S3Settings | None = None) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.settings = settings or S3Settings.from_env()
        self.uploaded: list[str] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not _uploads_here():
            return
        local_root = Path(args.output_dir)
        name = f"checkpoint-{state.global_step}"
        remote_root = f"{self.output_uri}/checkpoints"
        if (local_root / name).is_dir():
            count = upload(local_root / name, f"{remote_root}/{name}", OUTPUT_FIELD, self.settings)
            self.uploaded.append(name)
            log.info("uploaded %s (%d files) to %s/%s", name, count, remote_root, name)
        if rank() == 0:
            kept = {d.name for d in local_root.glob("checkpoint-*") if d.is_dir()}
            for remote in list_prefixes(remote_root, OUTPUT_FIELD, self.settings):
                if remote.startswith("checkpoint-") and remote not in kept:
                    delete_prefix(f"{remote_root}/{remote}", OUTPUT_FIELD, self.settings)


def upload_output(output: Path, output_uri: str, settings: S3Settings | None = None) -> int:
    """Everything the run wrote but the checkpoints (uploaded as they were saved)."""
    if not _uploads_here():
        return 0
    count = upload(
        output, output_uri, OUTPUT_FIELD, settings or S3Settings.from_env(), skip=("checkpoints",)
    )
    log.info("uploaded the output (%d files) to %s", count, output_uri)
    return count
