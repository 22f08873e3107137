"""Facts of the running process: its rank and the world size (torchrun's environment), its
device, the checkpoints on disk and the texts that ship with kubetune."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kubetune.contract import Env

#: The held-out English text that ships with kubetune: the forgetting probe's text and what
#: Auto compares the training data with, unless dataset.generalTextUri names another.
GENERAL_TEXT_DEFAULT = Path(__file__).parent / "corpus" / "general-en-heldout.txt"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


#: The process group's timeout when the operator did not set one (HF's and torch's default).
DEFAULT_COLLECTIVE_SECONDS = 1800


def collective_timeout_seconds() -> int:
    """The longest one rank waits in a collective: the operator sets it from the plan
    (`KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS`); a peer that died or hangs then ends the run in
    bounded time instead of blocking its pod forever."""
    try:
        value = int(os.environ.get(Env.COLLECTIVE_TIMEOUT, "") or DEFAULT_COLLECTIVE_SECONDS)
    except ValueError:
        return DEFAULT_COLLECTIVE_SECONDS
    return value if value > 0 else DEFAULT_COLLECTIVE_SECONDS


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete HF checkpoint (one with trainer_state.json)."""
    best: tuple[int, Path] | None = None
    for d in directory.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "trainer_state.json").exists() and (best is None or int(m[1]) > best[0]):
            best = (int(m[1]), d)
    return best[1] if best else None


def run_device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
