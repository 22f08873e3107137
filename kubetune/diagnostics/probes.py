"""The model passes behind the diagnostics, each bounded by a sample size or a token
budget. Every rank runs the same passes on the same inputs (so that ZeRO-3's gathered
forwards stay in step); only rank 0 exports the results.

- `memorization`: prompt + first k response tokens, greedy decoding, compare the next m
  tokens (the discoverable-extraction measure of Carlini et al., 2022).
- `token_nlls`: per-token negative log-likelihood of the target tokens (labels != -100),
  for the general-text (forgetting) and training-data perplexity probes.
- `sample_tokens`: seeded samples of the model's own text (ancestral sampling at
  temperature 1), the forgetting probe's default text when drawn from the base model.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from kubetune.diagnostics.measures import (
    MemorizationResult,
    memorization_result,
    probe_window,
)

IGNORE_INDEX = -100
Row = dict[str, list[int]]


def sample_rows(rows: Sequence[Row], n: int, seed: int) -> list[Row]:
    """A fixed sample (the same rows at every evaluation), in their original order."""
    if n >= len(rows):
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def text_rows(text: str, tokenizer: Any, seq_len: int, budget: int) -> list[Row]:
    """General text as windows of at most `seq_len` tokens, every token a target, up to
    `budget` tokens in all. Paragraphs (blank-line separated) start new documents."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows: list[Row] = []
    used = 0
    for para in (p.strip() for p in text.split("\n\n")):
        if not para or used >= budget:
            continue
        ids = tokenizer(para, add_special_tokens=False)["input_ids"]
        width = max(seq_len - len(bos), 8)
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width][: budget - used]
            if len(chunk) < 2:
                break
            rows.append({"input_ids": bos + chunk, "labels": [IGNORE_INDEX] * len(bos) + chunk})
            used += len(chunk)
            if used >= budget:
                break
    return rows


def budget_rows(rows: Sequence[Row], budget: int, seed: int) -> list[Row]:
    """Rows in a fixed random order until their target tokens reach `budget`."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out: list[Row] = []
    used = 0
    for i in order:
        if used >= budget:
            break
        out.append(rows[i])
        used += sum(1 for x in rows[i]["labels"] if x != IGNORE_INDEX)
    return out


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """No grad, eval mode, and the training mode restored afterwards."""
    import torch

    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


T = TypeVar("T")


def _batches(rows: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def next_token_nll(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(the NLL in nats of each position's next token, its target): logits at position t
    predict labels at t+1, in fp32; masked targets (IGNORE_INDEX) have an NLL of 0."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(target.shape)
    return nll, target


def token_nlls(model: Any, rows: Sequence[Row], device: Any, batch_size: int = 32) -> list[float]:
    """Per-token NLL (nats) of every target token of `rows`, in order."""
    import torch

    out: list[float] = []
    with eval_mode(model):
        for batch in _batches(rows, batch_size):
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                labels[i, :n] = torch.tensor(r["labels"])
                mask[i, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            nll, target = next_token_nll(logits, labels.to(device))
            keep = target != IGNORE_INDEX
            out.extend(nll[keep].tolist())
    return out


def _prompt(r: Row, k: int, m: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids: the prompt and the first k response tokens, expected continuation:
    the next m), or None when the response is too short."""
    start = next((i for i, x in enumerate(r["labels"]) if x != IGNORE_INDEX), None)
    if start is None:
        return None
    target = r["input_ids"][start:]
    window = probe_window(len(target), k, m)
    if window is None:
        return None
    k_eff, m_eff = window
    return r["input_ids"][: start + k_eff], target[k_eff : k_eff + m_eff]


def greedy(
    model: Any,
    prompts: Sequence[list[int]],
    new_tokens: int,
    pad_id: int,
    device: Any,
    synced: bool = False,
) -> list[list[int]]:
    """Greedy continuations of `new_tokens` tokens (left-padded batch through HF
    generate; `synced` for ZeRO-3 across ranks)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kwargs: dict[str, Any] = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_id,
    }
    if synced:
        kwargs["synced_gpus"] = True
    out = model.generate(**kwargs)
    return [row[width:].tolist() for row in out]


def _continuations(
    model: Any,
    rows: Sequence[Row],
    *,
    k: int,
    m: int,
    pad_id: int,
    device: Any,
    synced: bool,
    batch_size: int,
) -> list[tuple[list[int], list[int]] | None]:
    """Per row: (greedy continuation, expected continuation), None for a row whose
    response is too short to probe."""
    items = [_prompt(r, k, m) for r in rows]
    usable = [it for it in items if it is not None]
    outs: list[list[int]] = []
    with eval_mode(model):
        for batch in _batches(usable, batch_size):
            longest = max(len(exp) for _, exp in batch)
            outs.extend(greedy(model, [p for p, _ in batch], longest, pad_id, device, synced))
    got = iter(outs)
    return [None if it is None else (next(got), it[1]) for it in items]


def memorization(
    model: Any,
    rows: Sequence[Row],
    *,
    k: int,
    m: int,
    near_distance: float,
    pad_id: int,
    device: Any,
    synced: bool = False,
    batch_size: int = 64,
) -> MemorizationResult:
    """The exact and near-verbatim memorisation counts over `rows`."""
    result, _ = memorization_split(
        model,
        rows,
        len(rows),
        k=k,
        m=m,
        near_distance=near_distance,
        pad_id=pad_id,
        device=device,
        synced=synced,
        batch_size=batch_size,
    )
    return result


def memorization_split(
    model: Any,
    rows: Sequence[Row],
    first: int,
    *,
    k: int,
    m: int,
    near_distance: float,
    pad_id: int,
    device: Any,
    synced: bool = False,
    batch_size: int = 64,
) -> tuple[MemorizationResult, MemorizationResult]:
    """`memorization` of rows[:first] and rows[first:] (training sample and held-out
    baseline) in shared batches: one generation pass for both."""
    pairs = _continuations(
        model, rows, k=k, m=m, pad_id=pad_id, device=device, synced=synced, batch_size=batch_size
    )
    return (
        memorization_result([p for p in pairs[:first] if p is not None], near_distance),
        memorization_result([p for p in pairs[first:] if p is not None], near_distance),
    )


def sample_tokens(
    model: Any,
    *,
    start_id: int,
    eos_id: int | None,
    samples: int,
    length: int,
    seed: int,
    pad_id: int,
    device: Any,
    synced: bool = False,
    batch_size: int = 32,
) -> list[list[int]]:
    """`samples` sequences of at most `length` tokens drawn from the model after `start_id`
    (HF generate): each token from the full softmax at temperature 1, with no top-k, top-p,
    min-p, typical or penalty setting of the model's generation config applied, so that the
    text is distributed as the model's own; a sequence ends at its first `eos_id` (kept).
    Seeded, with the global random state restored afterwards; `synced` keeps the ranks'
    passes in step (ZeRO-3)."""
    import torch

    cuda = getattr(torch.device(device), "type", "cpu") == "cuda"
    devices = [torch.device(device).index or 0] if cuda else []
    neutral: dict[str, Any] = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "num_beams": 1,
    }
    out: list[list[int]] = []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for first in range(0, samples, batch_size):
            n = min(batch_size, samples - first)
            ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
            kwargs: dict[str, Any] = {
                **neutral,
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "max_new_tokens": length,
                "pad_token_id": pad_id,
            }
            if eos_id is not None:
                kwargs["eos_token_id"] = eos_id
            if synced:
                kwargs["synced_gpus"] = True
            for row in model.generate(**kwargs)[:, 1:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                out.append(row[:length])
    return out


class Stopwatch:
    """Seconds spent per probe (the cost the metrics and the report show)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, probe: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[probe] = self.seconds.get(probe, 0.0) + time.perf_counter() - start
