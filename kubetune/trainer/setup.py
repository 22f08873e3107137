"""The setup phase of a run: its HF TrainingArguments and its inputs (data, tokenizer, the
model with its method applied, and what Auto decided at training start). bench/ uses both to
run a plain HF Trainer with exactly the same settings and inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.trainer.config import TrainerConfig, TrainerConfigError
from kubetune.trainer.console import verbose
from kubetune.trainer.runtime import collective_timeout_seconds, world_size


def training_arguments(
    cfg: TrainerConfig, ckpt_dir: Path, *, has_eval: bool, cuda: bool, bf16: bool, main_proc: bool
) -> Any:
    """The HF TrainingArguments of a run, from its plan (also used by bench/ to run a
    plain HF Trainer with exactly the same settings)."""
    from transformers import TrainingArguments

    from kubetune.trainer.dsconfig import deepspeed_config

    plan, hp = cfg.plan, cfg.hyperparameters
    use_ds = uses_deepspeed(plan)
    micro, accum = hp.micro_batch_size, hp.gradient_accumulation_steps
    eval_steps = max(1, hp.eval_steps)
    checkpointing: dict[str, Any] = {
        _checkpointing_argument(TrainingArguments): hp.gradient_checkpointing and cuda
    }
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=hp.learning_rate,
        num_train_epochs=float(hp.epochs),
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        lr_scheduler_type=hp.lr_scheduler,
        **checkpointing,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=1,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not cuda,
        ddp_backend="gloo" if (not cuda and world_size() > 1) else None,
        ddp_timeout=collective_timeout_seconds(),
        deepspeed=deepspeed_config(plan, bf16=bf16) if use_ds else None,
        disable_tqdm=not (main_proc and verbose() and os.isatty(2)),
        remove_unused_columns=False,
        save_only_model=False,
    )


def _checkpointing_argument(arguments: Any) -> str:
    """The TrainingArguments field for activation (gradient) checkpointing: transformers
    5.x renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the
    old name; older releases know only the old one."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def uses_deepspeed(plan: PlanDocument) -> bool:
    """Whether the run goes through DeepSpeed: several processes or a ZeRO stage, except for
    QLoRA, whose 4-bit model trains with plain data parallelism (ZeRO-0, planned so)."""
    return (world_size() > 1 or plan.zero_stage > 0) and plan.method != "QLoRA"


def load_in_bf16(plan: PlanDocument, bf16: bool) -> bool:
    """Whether the weights load in bf16. Mixed precision needs fp32 master weights:
    DeepSpeed's bf16 optimizer keeps its own, so under DeepSpeed the model loads in bf16,
    and a frozen base under LoRA or prefix tuning needs no master copy either. Plain HF
    (ZeRO-0, one process) with trainable base weights loads fp32 and autocasts to bf16:
    pure bf16 weights would round small updates away (and the planner counts the master
    copy)."""
    return bf16 and (uses_deepspeed(plan) or plan.method in ("LoRA", "Prefix"))


@dataclass
class RunInputs:
    """What a run trains: tokenizer, datasets, and the model with its method applied."""

    tokenizer: Any
    train_ds: Any
    val_ds: Any
    model: Any
    seq_len: int
    cuda: bool
    bf16: bool
    #: The plan trained with: cfg.plan, or its alternative when Auto switched the method.
    plan: PlanDocument
    evidence: Any = None
    decision: str | None = None
    #: What self-rewrite and augmentation did to the training rows.
    data_notes: list[str] = field(default_factory=list)
    data_stats: dict[str, Any] = field(default_factory=dict)


def load_inputs(cfg: TrainerConfig) -> RunInputs:
    """Read and tokenise the data, load the model and apply the planned method (also used
    by bench/ to give a plain HF Trainer exactly the same inputs)."""
    import torch

    from kubetune.data import DataError
    from kubetune.trainer.data import (
        TokenizedDataset,
        dedup_settings,
        drop_overlong,
        read_sources,
        training_rows,
    )
    from kubetune.trainer.model import (
        apply_method,
        compute_dtype,
        load_model,
        load_tokenizer,
        model_location,
        quantization_config,
    )
    from kubetune.trainer.remedies.dataprep import prepare_examples
    from kubetune.trainer.startup import choose_method_for_run

    plan, hp = cfg.plan, cfg.hyperparameters
    try:
        # Detected again when Auto (not taken from the plan's datasetFormat): data that
        # changed since planning is then reported against its own first row.
        _, sources, validation = read_sources(cfg.spec, cfg.dataset, cfg.sources, cfg.validation)
    except (DataError, OSError, ValueError) as exc:
        raise TrainerConfigError(str(exc)) from exc
    location, revision = model_location(cfg.model)
    if cfg.model.startswith("hf://") and not cfg.model.startswith("hf://kubetune/"):
        revision = (cfg.spec.get("model") or {}).get("revision") or revision
    tokenizer = load_tokenizer(location, revision)
    seq_len = hp.sequence_length
    dataset_spec = cfg.spec.get("dataset") or {}
    if dataset_spec.get("overlongRows") == "Drop":
        # As the plan did: before the split, so both count the same rows.
        sources = [
            replace(s, examples=drop_overlong(s.examples, tokenizer, seq_len)[0]) for s in sources
        ]
        if validation is not None:
            validation = drop_overlong(validation, tokenizer, seq_len)[0]
        if not any(s.examples for s in sources):
            raise TrainerConfigError(
                f"{cfg.dataset}: every example is longer than {seq_len} tokens and "
                "spec.dataset.overlongRows is Drop"
            )
    split = float(dataset_spec.get("validationSplit", 0.1))
    train_examples, val_examples = training_rows(
        sources, validation, split, cfg.seed, dedup_settings(cfg.spec)
    )
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    low = load_in_bf16(plan, bf16)
    quantised = quantization_config(plan, cuda)  # QLoRA: the base in 4 bits
    if quantised is not None:
        model = load_model(location, revision, dtype=compute_dtype(plan), quantization=quantised)
    else:
        model = load_model(location, revision, dtype=torch.bfloat16 if low else torch.float32)
    prep = prepare_examples(cfg, model, tokenizer, train_examples, location)
    train_examples = prep.examples
    train_ds = TokenizedDataset(train_examples, tokenizer, seq_len)
    val_ds = TokenizedDataset(val_examples, tokenizer, seq_len) if val_examples else None
    if len(train_ds) == 0:
        raise TrainerConfigError(
            f"{cfg.dataset}: no example has a target token left after "
            f"truncation to {seq_len} tokens"
        )
    choice = choose_method_for_run(cfg, model, tokenizer, train_ds, seq_len)
    plan = choice.plan
    if low and not load_in_bf16(plan, bf16):  # switched to a method that keeps fp32 weights:
        del model  # load them again in fp32 (a cast of the bf16 copy would lose precision)
        model = load_model(location, revision, dtype=torch.float32)
    model = apply_method(model, plan)
    return RunInputs(
        tokenizer,
        train_ds,
        val_ds,
        model,
        seq_len,
        cuda,
        bf16,
        plan,
        choice.evidence,
        choice.decision,
        prep.notes,
        prep.stats,
    )


def token_accuracy(eval_pred: Any) -> dict[str, float]:
    """Next-token accuracy on the completion tokens (labels != -100)."""

    preds, labels = eval_pred.predictions, eval_pred.label_ids
    preds = preds[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    total = int(mask.sum())
    return {"token_accuracy": float((preds[mask] == labels[mask]).sum() / total) if total else 0.0}


def argmax_logits(logits: Any, labels: Any) -> Any:
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)
