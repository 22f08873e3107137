"""Merge a trained LoRA adapter into its base model's weights (full weights, no peft
needed to load them). A QLoRA adapter merges into the unquantised base (loaded as its
checkpoint stores it), never into the 4-bit weights it trained on; DoRA adapters merge too."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.trainer.config import TrainerConfigError


def merge_adapter(run_dir: Path, into: Path | None = None) -> Path:
    """Merge `<run_dir>/final` (a PEFT adapter) into the base model named in
    `<run_dir>/spec.json`; writes to `into` (default `<run_dir>/merged`)."""
    from peft import PeftModel

    from kubetune.trainer.model import load_model, load_tokenizer, model_location

    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise TrainerConfigError(
            f"{final} holds no adapter (adapter_config.json): only LoRA "
            "and prefix runs produce one; full and partial runs already "
            "saved full weights"
        )
    spec = json.loads((run_dir / "spec.json").read_text())
    uri = str((spec.get("model") or {}).get("uri", ""))
    location, revision = model_location(uri)
    base = load_model(location, revision)
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    out = into or run_dir / "merged"
    merged.save_pretrained(str(out))
    load_tokenizer(str(final)).save_pretrained(str(out))
    return out
