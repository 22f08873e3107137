"""Dataset repositories laid out in the Hugging Face hub cache, as `snapshot_download` leaves
them, for offline tests (HF_HUB_OFFLINE=1): nothing is fetched from a hub."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
- config_name: tiny
  data_files:
  - split: train
    path: tiny/train.jsonl
---
# A dataset laid out for kubetune's tests
"""


def parquet_dataset_repo(cache: Path, repo: str, rows: int, validation: int) -> Path:
    """`repo` with a default config of Parquet train and validation splits (columns question
    and answer; the validation rows are other questions) and a `tiny` config of one JSONL
    file; the snapshot directory is returned, `refs/main` pointing to it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    org, name = repo.split("/")
    root = cache / f"datasets--{org}--{name}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    (snap / "data").mkdir(parents=True, exist_ok=True)
    (snap / "tiny").mkdir(parents=True, exist_ok=True)

    def table(start: int, n: int) -> pa.Table:
        return pa.table(
            {
                "question": [
                    f"Which colour is flower number {i}?" for i in range(start, start + n)
                ],
                "answer": [
                    f" Flower {i} is {['red', 'blue', 'white'][i % 3]}."
                    for i in range(start, start + n)
                ],
            }
        )

    pq.write_table(table(0, rows), snap / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table(1000, validation), snap / "data" / "validation-00000-of-00001.parquet")
    (snap / "tiny" / "train.jsonl").write_text('{"text": "one tiny row"}\n{"text": "and two"}\n')
    (snap / "README.md").write_text(CARD)
    return snap


@contextlib.contextmanager
def hub_env(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[None]:
    """HF_HUB_CACHE at `cache` and HF_HUB_OFFLINE=1 (huggingface_hub reads them at import:
    its constants are reloaded, and again after)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(huggingface_hub.constants)
    try:
        yield
    finally:
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
