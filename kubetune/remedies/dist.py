"""One decision for every rank: rank 0 computes, the others receive its result. Ranks that
decided from their own figures could disagree (a remedy or a method on in one process and
not another, datasets of different lengths) and hang the run."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

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
        dist.init_process_group(backend="nccl" if cuda else "gloo")
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
