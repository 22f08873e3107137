"""Incremental updates: continue from a previous run's output (its adapter or weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.contract import Env

# ---- incremental updates ----------------------------------------------------------------------


def previous_output(uri: str) -> Path:
    """The directory of a previous run's adapter or weights: `<from>/final` when it exists,
    else `<from>` itself. In a pod, KUBETUNE_PREVIOUS_PATH is where the operator mounted
    model.from (a pvc:// claim, or a file:// hostPath); locally a file:// path is read as
    it is."""
    import os

    mounted = os.environ.get(Env.PREVIOUS_PATH)
    if mounted:
        path = Path(mounted)
    elif uri.startswith("pvc://"):
        from kubetune.trainer.config import TrainerConfigError

        raise TrainerConfigError(
            f"model.from {uri}: a pvc:// output is mounted by the operator; locally use "
            "file:///path/to/the/previous/output"
        )
    else:
        path = Path(uri.removeprefix("file://"))
    return path / "final" if (path / "final").is_dir() else path


def load_previous(model: Any, uri: str) -> tuple[Any, bool]:
    """(the model to train, whether it is a previous PEFT adapter continued as is). Full
    weights are loaded into `model`'s architecture from the previous output."""
    from kubetune.trainer.config import TrainerConfigError

    path = previous_output(uri)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path), is_trainable=True), True
    if not (path / "config.json").exists():
        raise TrainerConfigError(
            f"model.from: no adapter_config.json or config.json in {path}: expected a "
            "previous FineTuneJob's output"
        )
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype), False
