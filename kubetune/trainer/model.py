"""Load the base model and tokenizer, and apply the planned method (Full, LoRA, Prefix,
Partial)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.plan import PlanDocument
from kubetune.trainer.config import TrainerConfigError


def model_location(uri: str) -> tuple[str, str | None]:
    """A path or hub id `from_pretrained` understands, and the revision."""
    if uri.startswith("hf://kubetune/"):
        from kubetune.trainer import basemodel

        return str(basemodel.resolve_model(uri)), None
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://"), None
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").exists():
        raise TrainerConfigError(
            f"no model at {path}: expected a directory with config.json (spec.model.uri)"
        )
    return str(path), None


def load_tokenizer(location: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        location, revision=revision, token=os.environ.get("HF_TOKEN") or None
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(location: str, revision: str | None = None, dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        location, revision=revision, dtype=dtype, token=os.environ.get("HF_TOKEN") or None
    )


def _linear_names(model: Any) -> set[str]:
    import torch

    return {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }


def _decoder_layers(model: Any) -> list[Any]:
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise TrainerConfigError(
        "cannot find the decoder layers of this architecture for "
        "Partial fine-tuning; choose LoRA or Full"
    )


def apply_method(model: Any, plan: PlanDocument) -> Any:
    """Wrap or freeze the model as the plan says; returns the model to train."""
    previous = plan.remedies.from_ if plan.remedies is not None else None
    if previous:  # an incremental update: a previous adapter keeps training as it is
        from kubetune.trainer.remedies.previous import load_previous

        model, is_adapter = load_previous(model, str(previous))
        if is_adapter:
            return model
    method, hp = plan.method, plan.hyperparameters
    if method == "Full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "LoRA":
        from peft import LoraConfig, TaskType, get_peft_model

        wanted = _planned(hp.lora_target_modules, "loraTargetModules")
        present = _linear_names(model)
        targets = [t for t in wanted if t in present]
        if not targets:
            raise TrainerConfigError(
                f"none of the LoRA target modules {wanted} exist in this model; it has "
                f"{sorted(present)} (set spec.method.lora.targetModules)"
            )
        cfg = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=_planned(hp.lora_rank, "loraRank"),
            lora_alpha=_planned(hp.lora_alpha, "loraAlpha"),
            lora_dropout=_planned(hp.lora_dropout, "loraDropout"),
            target_modules=targets,
        )
        return get_peft_model(model, cfg)
    if method == "Prefix":
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        tokens = _planned(hp.prefix_tokens, "prefixTokens")
        return get_peft_model(
            model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens)
        )
    layers = _decoder_layers(model)  # Partial
    n = _planned(hp.trainable_layers, "trainableLayers")
    if not 1 <= n <= len(layers):  # layers[-0:] or a longer slice would train every layer
        raise TrainerConfigError(
            f"plan.json: hyperparameters.trainableLayers is {n}, but the model has "
            f"{len(layers)} decoder layers (spec.method.partial)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[-n:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


T = TypeVar("T")


def _planned(value: T | None, key: str) -> T:
    """A method setting the plan must carry (the planner sets it for its method)."""
    if value is None:
        raise TrainerConfigError(f"plan.json: hyperparameters.{key} is not set for this method")
    return value


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
