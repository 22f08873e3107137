"""Replay of general text: rows of it mixed into the training set, from the start or armed to
turn on during training."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.trainer.data import IGNORE_INDEX, Row

#: The English text the built-in model was pretrained on: the default replay text.
REPLAY_TEXT_DEFAULT = Path(__file__).resolve().parents[1] / "corpus" / "general-en.txt"


# ---- replay ----------------------------------------------------------------------------------


def replay_rows(text: str, tokenizer: Any, count: int, row_tokens: int, seed: int) -> list[Row]:
    """`count` windows of about `row_tokens` tokens of general text, every token a target
    (cycling through the text when it is short), in a fixed random order."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    width = max(8, row_tokens - len(bos) - len(eos))
    windows: list[list[int]] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        ids = tokenizer(para, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width]
            if len(chunk) >= 8:
                windows.append(chunk)
    if not windows or count <= 0:
        return []
    random.Random(seed).shuffle(windows)
    rows = []
    for i in range(count):
        ids = bos + windows[i % len(windows)] + eos
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(bos) + ids[len(bos) :]})
    return rows


def replay_count(train_rows: int, ratio: float) -> int:
    """General rows to add so that they are `ratio` of all rows."""
    return max(1, round(train_rows * ratio / (1 - ratio)))


class MixedDataset:
    """Training rows plus replay rows; `sources[i]` says which ("task" or "general")."""

    def __init__(self, task: Sequence[Row], general: Sequence[Row]) -> None:
        self.rows = [*task, *general]
        self.sources = ["task"] * len(task) + ["general"] * len(general)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class ReplaySwitch:
    """The training rows, serving general-text rows in place of `ratio` of the rows asked
    for once switched on: Auto turns replay on during training this way, so the dataset's
    length (and the planned steps) stay as they are. The Trainer's data loader reads it in
    the training process (no workers), in the order its sampler asks."""

    def __init__(self, task: Sequence[Row], general: Sequence[Row], ratio: float) -> None:
        self.rows = list(task)
        self.general = list(general)
        self.ratio = ratio
        self.active = False
        self.served = 0
        self.replayed = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        if self.active and self.general:
            before = math.floor(self.served * self.ratio)
            self.served += 1
            if math.floor(self.served * self.ratio) > before:
                row = self.general[self.replayed % len(self.general)]
                self.replayed += 1
                return row
        return self.rows[i]
