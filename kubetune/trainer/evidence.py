"""Auto's evidence measured (torch): the base model's perplexity on a sample of the training
targets and on general text. The rule that decides from it is pure
(`kubetune.planning.evidence`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kubetune.planning.evidence import Evidence
from kubetune.trainer.data import Row
from kubetune.trainer.remedies.loss import row_token_nlls


def _mean_perplexity(nlls: Sequence[float]) -> float:
    return math.exp(min(sum(nlls) / len(nlls), 50.0))


def measure_evidence(
    model: Any,
    tokenizer: Any,
    task_rows: Sequence[Row],
    evidence_text: str,
    seq_len: int,
    device: Any,
    seed: int,
    token_budget: int,
) -> Evidence | None:
    """The base model's perplexity on a sample of the training targets (the token budget)
    and on general text: what Auto decides from. `model` is the base model or has its
    adapter disabled."""
    from kubetune.diagnostics.probes import budget_rows, text_rows, token_nlls
    from kubetune.diagnostics.runner import base_model

    if not task_rows:
        return None
    scored = budget_rows(list(task_rows), token_budget, seed)
    model.to(device)
    with base_model(model):
        flat = [x for row in row_token_nlls(model, scored, device) for x in row]
        general = text_rows(evidence_text, tokenizer, seq_len, token_budget)
        g = token_nlls(model, general, device) if general else []
    if not flat or not g:
        return None
    return Evidence(_mean_perplexity(flat), _mean_perplexity(g))
