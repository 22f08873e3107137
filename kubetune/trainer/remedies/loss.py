"""Remedies in the loss: token weights from the base model's perplexity (low-perplexity
targets), elastic weight consolidation, and the Trainer subclass that applies them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.trainer.data import IGNORE_INDEX, Row

# ---- low-perplexity targets --------------------------------------------------------------------


def row_token_nlls(model: Any, rows: Sequence[Row], device: Any) -> list[list[float]]:
    """Per row, the NLL of each target token (labels[1:] != -100), in order."""
    from kubetune.diagnostics.probes import token_nlls

    flat = token_nlls(model, rows, device)
    out: list[list[float]] = []
    pos = 0
    for r in rows:
        n = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
        out.append(flat[pos : pos + n])
        pos += n
    return out


def weighted_rows(
    rows: Sequence[Row], nlls: Sequence[Sequence[float]], threshold: float, weight: float
) -> tuple[list[Row], int, int]:
    """Rows with a `weights` list (one per position): `weight` for a target token whose
    perplexity under the base model exceeds `threshold`, else 1. Returns the rows, the
    tokens down-weighted and the target tokens in all."""
    limit = math.log(threshold)
    out: list[Row] = []
    low = total = 0
    for r, row_nll in zip(rows, nlls, strict=True):
        weights = [1.0] * len(r["input_ids"])
        it = iter(row_nll)
        for j in range(1, len(r["labels"])):
            if r["labels"][j] == IGNORE_INDEX:
                continue
            total += 1
            if next(it) > limit:
                weights[j] = weight
                low += 1
        out.append({**r, "weights": weights})
    return out, low, total


@dataclass
class WeightedCollator:
    """The trainer's collator, plus `weights` (padded with 0) when rows have them."""

    base: Any

    def __call__(self, rows: list[Row]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = self.base(
            [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
        )
        if any("weights" in r for r in rows):
            width = batch["input_ids"].shape[1]
            w = [
                list(r.get("weights") or [1.0] * len(r["input_ids"]))
                + [0.0] * (width - len(r["input_ids"]))
                for r in rows
            ]
            batch["weights"] = torch.tensor(w, dtype=torch.float32)
        return batch


# ---- elastic weight consolidation --------------------------------------------------------------


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al., 2017): penalty = lambda / 2 x
    sum over the trained weights of F x (w - w_base)^2, with F the diagonal empirical
    Fisher information on general text (the mean squared gradient of the LM loss, batch by
    batch), estimated once before training."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.names: list[str] = []
        self.fisher: list[Any] = []
        self.anchor: list[Any] = []
        self.count = 0
        self.tokens = 0

    def estimate(
        self, model: Any, rows: Sequence[Row], device: Any, tokens: int, batch_size: int = 4
    ) -> None:
        import torch

        from kubetune.trainer.data import Collator

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
        was_training = model.training
        model.eval()
        used = batches = 0
        pad = 0
        for start in range(0, len(rows), batch_size):
            if used >= tokens:
                break
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in Collator(pad)(list(chunk)).items()}
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for s, (_, p) in zip(sums, params, strict=True):
                if p.grad is not None:
                    s += p.grad.detach().float() ** 2
            used += sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in chunk)
            batches += 1
        model.zero_grad(set_to_none=True)
        if was_training:
            model.train()
        self.count = sum(p.numel() for _, p in params)
        self.names = [n for n, _ in params]
        self.fisher = [x / max(batches, 1) for x in sums]
        self.anchor = [p.detach().clone().float() for _, p in params]
        self.tokens = used

    def penalty(self, model: Any) -> Any:
        import torch

        named = dict(model.named_parameters())
        total = torch.zeros((), device=self.anchor[0].device if self.anchor else "cpu")
        for name, f, a in zip(self.names, self.fisher, self.anchor, strict=True):
            p = named[name]
            total = total + (f.to(p.device) * (p.float() - a.to(p.device)) ** 2).sum()
        return 0.5 * self.strength * total


def remedy_trainer_class(base: Any, ewc: EWC | None) -> Any:
    """`base` (the HF Trainer) with a loss that honours token weights and adds the EWC
    penalty. Each micro-batch's loss is a mean, scaled for gradient accumulation by the
    Trainer (`loss_is_scaled_for_ga = False`)."""
    import torch

    from kubetune.diagnostics.probes import next_token_nll

    class RemedyTrainer(base):  # type: ignore[misc]
        loss_is_scaled_for_ga = False

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            weights = inputs.pop("weights", None)
            if weights is None:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            else:
                labels = inputs["labels"]
                outputs = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
                )
                nll, target = next_token_nll(outputs.logits, labels)
                w = weights[:, 1:].to(nll.dtype) * (target != IGNORE_INDEX).to(nll.dtype)
                loss = (nll * w).sum() / torch.clamp(w.sum(), min=1.0)
            if ewc is not None and model.training:
                loss = loss + ewc.penalty(model)
            return (loss, outputs) if return_outputs else loss

    return RemedyTrainer
