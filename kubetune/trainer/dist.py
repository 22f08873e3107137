"""One decision for every rank: rank 0 computes, the others receive its result. Ranks that
decided from their own figures could disagree (a remedy or a method on in one process and
not another, datasets of different lengths) and hang the run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from kubetune.trainer.runtime import collective_timeout_seconds

T = TypeVar("T")


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its (picklable) result on every rank. With several processes
    it starts the process group if nothing has yet (DeepSpeed and Accelerate then use it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return compute()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timedelta(seconds=collective_timeout_seconds()),
        )
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", compute())]
        except Exception as exc:  # every rank raises it, instead of waiting for rank 0
            box = [("error", exc)]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    result: T = value
    return result


def read_record(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """A JSON record in the run's output, read by rank 0 (other nodes may not see rank 0's
    output) and given to every rank; None when missing or made for another `key`."""

    def read() -> dict[str, Any] | None:
        if not path.exists():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return data if key is None or data.get("key") == key else None

    return from_rank0(read)


def write_record(path: Path, data: dict[str, Any], key: str | None = None) -> None:
    """Rank 0 writes a record `read_record` returns (with its key) to a later start."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, **({"key": key} if key else {})}, indent=2))
