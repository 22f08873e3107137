"""Tokenised training data: completion-only loss for prompt/completion and chat rows,
a deterministic held-out split, and a padding collator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.contract import secret_value
from kubetune.data import Example
from kubetune.data.dedup import DEFAULT_THRESHOLD, DedupSettings
from kubetune.data.formats import read_dataset
from kubetune.data.hub import hub_dataset, is_hub_repo, read_hub_dataset
from kubetune.data.mixture import Source, split_holdout, training_rows

__all__ = ["Source", "split_holdout", "training_rows"]

IGNORE_INDEX = -100
#: One tokenised row: input_ids, labels (and, for token weights, weights).
Row = dict[str, Any]


def hub_dataset_file(uri: str) -> Path:
    """`hf://org/name/path/in/repo.jsonl`: one file from a dataset repository on the Hugging
    Face hub, through its local cache (so `HF_HUB_OFFLINE=1` with a filled cache works
    without a network). A whole repository is read by `kubetune.data.hub`."""

    from huggingface_hub import hf_hub_download

    parts = uri.removeprefix("hf://").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{uri}: a hub dataset is hf://org/name[/file.jsonl]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "train.jsonl"
    return Path(
        hf_hub_download(repo, filename, repo_type="dataset", token=secret_value("HF_TOKEN"))
    )


def read_examples(
    location: str,
    fmt: str | None,
    file_format: str | None = None,
    columns: Mapping[str, str] | None = None,
    hub: Mapping[str, Any] | None = None,
    split: str | None = None,
) -> tuple[str, list[Example]]:
    """Examples from a local file (PVC and ConfigMap volumes are files too) or a hub
    dataset, read as the planner read them: `hf://datasets/org/name` (or `hf://org/name`)
    with spec.dataset.hub's config, split (`split` instead) and revision through
    `kubetune.data.hub`; `hf://org/name/path/in/repo.jsonl`, one file of the repository;
    files by `kubetune.data.formats` (the file format by `file_format` or the extension,
    the column mapping)."""
    if is_hub_repo(location):
        ref = hub_dataset(location, hub, split)
        return read_hub_dataset(ref, fmt, columns)  # type: ignore[arg-type]
    path = hub_dataset_file(location) if location.startswith("hf://") else Path(location)
    return read_dataset(path, location, file_format, fmt, columns)  # type: ignore[arg-type]


def spec_data_options(spec: Mapping[str, Any]) -> tuple[str | None, str, dict[str, str]]:
    """The forced row format (None for Auto), the file format and the column mapping of a
    spec as the trainer reads it (plain JSON)."""
    dataset = spec.get("dataset") or {}
    forced = dataset.get("format", "Auto")
    columns = {k: str(v) for k, v in (dataset.get("columns") or {}).items() if v}
    return (None if forced == "Auto" else forced), dataset.get("fileFormat", "Auto"), columns


def read_sources(
    spec: Mapping[str, Any], dataset: str, sources: Sequence[str], validation: str | None
) -> tuple[str, list[Source], list[Example] | None]:
    """The row format, the training files (dataset.uri's at `dataset`, then each of
    dataset.sources at `sources`) with their weights and the validation rows (None without
    a validation file), read as the planner reads them (`planning.job.read_job_data`)."""
    forced, file_format, columns = spec_data_options(spec)
    ds = spec.get("dataset") or {}
    hub = ds.get("hub")
    fmt, examples = read_examples(dataset, forced, file_format, columns, hub)
    out = [Source(_name(dataset, hub), examples, float(ds.get("weight", 1.0)))]
    specs = list(ds.get("sources") or [])
    if len(specs) != len(sources):
        raise ValueError(f"{len(sources)} source files for {len(specs)} spec.dataset.sources")
    for path, extra in zip(sources, specs, strict=True):
        mapping = {k: str(v) for k, v in (extra.get("columns") or {}).items() if v}
        more = extra.get("hub")
        _, rows = read_examples(path, fmt, extra.get("fileFormat", "Auto"), mapping, more)
        out.append(Source(_name(path, more), rows, float(extra.get("weight", 1.0))))
    held = (
        read_examples(validation, fmt, file_format, columns, hub, "validation")[1]
        if validation
        else None
    )
    return fmt, out, held


def _name(location: str, hub: Mapping[str, Any] | None) -> str:
    """A source's name in messages, as the planner names it."""
    return hub_dataset(location, hub).source if is_hub_repo(location) else location


def dedup_settings(spec: Mapping[str, Any]) -> DedupSettings:
    """spec.dataset.deduplicate as the planner reads it (`planning.job.dedup_settings`)."""
    d = (spec.get("dataset") or {}).get("deduplicate") or {}
    return DedupSettings(
        exact=bool(d.get("exact", True)),
        near=bool(d.get("near", True)),
        threshold=float(d.get("threshold", DEFAULT_THRESHOLD)),
    )


def encode(example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels: the loss covers the target only (the whole text for Text
    rows, whose prompt is empty)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_text = example.prompt
    if example.messages and getattr(tokenizer, "chat_template", None):
        # The model's own chat format for everything before the reply it learns; the
        # template places its own special tokens.
        prompt_text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in example.messages[:-1]],
            add_generation_prompt=True,
            tokenize=False,
        )
        bos = []
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + eos
    ids = (bos + prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * (len(bos) + len(prompt)) + target)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encoded_length(example: Example, tokenizer: Any) -> int:
    """The example's length in tokens before truncation (what the planner counts with
    `kubetune.data.tokens`)."""
    return len(encode(example, tokenizer, max_length=2**62)["input_ids"])


def drop_overlong(
    examples: list[Example], tokenizer: Any, max_length: int
) -> tuple[list[Example], list[Example]]:
    """The examples that fit in `max_length` tokens, and those left out
    (`spec.dataset.overlongRows: Drop`)."""
    kept: list[Example] = []
    dropped: list[Example] = []
    for ex in examples:
        (kept if encoded_length(ex, tokenizer) <= max_length else dropped).append(ex)
    return kept, dropped


class TokenizedDataset:
    """A list-backed dataset the HF Trainer can index."""

    def __init__(self, examples: list[Example], tokenizer: Any, max_length: int) -> None:
        encoded = [(ex.line, encode(ex, tokenizer, max_length)) for ex in examples]
        kept = [(line, r) for line, r in encoded if any(x != IGNORE_INDEX for x in r["labels"])]
        self.rows = [r for _, r in kept]
        #: The source line of each row (augmented rows share their source's line).
        self.lines = [line for line, _ in kept]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]

    @property
    def token_count(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


@dataclass
class Collator:
    """Pads a batch on the right: input ids with the pad id, labels with -100."""

    pad_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = [r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows]
        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
