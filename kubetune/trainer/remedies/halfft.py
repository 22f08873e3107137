"""Half fine-tuning: each epoch trains a fresh random half of every layer's weight tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

# ---- half fine-tuning ---------------------------------------------------------------------------


def _group(name: str) -> tuple[str, str]:
    """(layer, kind) of a parameter: its decoder layer (or "top") and attention / MLP /
    other, the units within which half is chosen."""
    import re

    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name)
    layer = m.group(1) if m else "top"
    if "norm" in name:
        kind = "other"
    elif "attn" in name or "attention" in name:
        kind = "attn"
    else:
        kind = "mlp" if "mlp" in name else "other"
    return layer, kind


def choose_halves(names: Sequence[str], seed: int) -> set[str]:
    """Half of the tensors of each (layer, kind) group, at random (an odd group's extra
    tensor with probability 1/2): the ones trained this round."""
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        groups.setdefault(_group(n), []).append(n)
    chosen: set[str] = set()
    for key in sorted(groups):
        members = sorted(groups[key])
        k = len(members) // 2 + (1 if len(members) % 2 and rng.random() < 0.5 else 0)
        chosen.update(rng.sample(members, k))
    return chosen


def half_fine_tuning_callback(seed: int) -> Any:
    """A TrainerCallback that, at the start of each epoch, makes a fresh random half of the
    weight tensors trainable and freezes the rest (arXiv:2404.18466). The optimizer holds
    every tensor; a frozen one gets no gradient, so AdamW leaves it (and its moments) as
    they are."""
    from transformers import TrainerCallback

    class HalfFineTuning(TrainerCallback):
        def __init__(self) -> None:
            self.names: list[str] = []
            self.selected: set[str] = set()
            self.rounds = 0

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw.get("model")
            if model is None:
                return
            params = dict(model.named_parameters())
            if not self.names:
                self.names = [n for n, p in params.items() if p.requires_grad]
            self.selected = choose_halves(self.names, seed * 1000 + int(state.epoch or 0))
            for n in self.names:
                params[n].requires_grad_(n in self.selected)
            self.rounds += 1

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw.get("model")
            if model is not None:
                params = dict(model.named_parameters())
                for n in self.names:
                    params[n].requires_grad_(True)

    return HalfFineTuning()
