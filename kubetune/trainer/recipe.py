"""One training run: data, model, method, DeepSpeed, HF Trainer with our callback, resume,
outputs, report, and the termination message the operator reads."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubetune.contract import (
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    SHORT_PLAN_KEYS,
    SWITCHED_PLAN_KEYS,
    TERMINATION_LIMIT_BYTES,
    TRAINER_MESSAGE_KEYS,
    Env,
    termination_path,
)
from kubetune.trainer.config import TrainerConfig, TrainerConfigError

log = logging.getLogger("kubetune.trainer")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete HF checkpoint (one with trainer_state.json)."""
    best: tuple[int, Path] | None = None
    for d in directory.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "trainer_state.json").exists() and (best is None or int(m[1]) > best[0]):
            best = (int(m[1]), d)
    return best[1] if best else None


def token_accuracy(eval_pred: Any) -> dict[str, float]:
    """Next-token accuracy on the completion tokens (labels != -100)."""

    preds, labels = eval_pred.predictions, eval_pred.label_ids
    preds = preds[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    total = int(mask.sum())
    return {"token_accuracy": float((preds[mask] == labels[mask]).sum() / total) if total else 0.0}


def _argmax_logits(logits: Any, labels: Any) -> Any:
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def write_termination(cfg: TrainerConfig, payload: dict[str, Any]) -> None:
    """Rank 0's termination message (the kubelet keeps 4 KiB): valid JSON, dropping the
    least important keys if it would be too long."""
    compact = (
        payload
        if "decisions" not in payload
        else {
            **payload,
            "decisions": [
                {
                    **d,
                    "plan": {
                        k: v for k, v in (d.get("plan") or {}).items() if k in SHORT_PLAN_KEYS
                    },
                }
                if d.get("plan")
                else d
                for d in payload.get("decisions") or []
            ],
        }
    )
    tries: tuple[tuple[dict[str, Any], tuple[str, ...]], ...] = (
        (payload, ()),
        (payload, ("output",)),
        (payload, ("output", "progress")),
        (compact, ("output", "progress")),  # a switch's plan without its long parts
        (compact, ("output", "progress", "warnings")),
        (compact, ("output", "progress", "warnings", "decisions")),
        (compact, ("output", "progress", "warnings", "decisions", "metrics")),
    )
    for body, drop in tries:
        text = json.dumps({k: v for k, v in body.items() if k not in drop}, separators=(",", ":"))
        if len(text.encode()) <= TERMINATION_LIMIT_BYTES:
            break
    else:
        text = json.dumps({"error": "termination message too long"})
    try:
        cfg.termination_path.write_text(text)
    except OSError:
        log.warning("cannot write the termination message to %s", cfg.termination_path)


def training_arguments(
    cfg: TrainerConfig, ckpt_dir: Path, *, has_eval: bool, cuda: bool, bf16: bool, main_proc: bool
) -> Any:
    """The HF TrainingArguments of a run, from its plan (also used by bench/ to run a
    plain HF Trainer with exactly the same settings)."""
    from transformers import TrainingArguments

    from kubetune.trainer.dsconfig import deepspeed_config

    plan, hp = cfg.plan, cfg.hyperparameters
    use_ds = world_size() > 1 or int(plan.get("zeroStage", 0)) > 0
    micro = int(hp.get("microBatchSize") or 1)
    accum = int(hp.get("gradientAccumulationSteps") or 1)
    eval_steps = max(1, int(hp.get("evalSteps") or 10))
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=float(hp.get("learningRate") or 2e-4),
        num_train_epochs=float(hp.get("epochs") or 3),
        warmup_steps=int(hp.get("warmupSteps") or 0),
        weight_decay=float(hp.get("weightDecay") or 0.0),
        max_grad_norm=float(hp.get("maxGradNorm") or 1.0),
        lr_scheduler_type=str(hp.get("lrScheduler") or "cosine"),
        gradient_checkpointing=bool(hp.get("gradientCheckpointing")) and cuda,
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
        deepspeed=deepspeed_config(plan, bf16=bf16) if use_ds else None,
        disable_tqdm=not (main_proc and os.isatty(2)),
        remove_unused_columns=False,
        save_only_model=False,
    )


def load_in_bf16(plan: dict[str, Any], bf16: bool) -> bool:
    """Whether the weights load in bf16. Mixed precision needs fp32 master weights:
    DeepSpeed's bf16 optimizer keeps its own, so under DeepSpeed the model loads in bf16,
    and a frozen base under LoRA or prefix tuning needs no master copy either. Plain HF
    (ZeRO-0, one process) with trainable base weights loads fp32 and autocasts to bf16:
    pure bf16 weights would round small updates away (and the planner counts the master
    copy)."""
    use_ds = world_size() > 1 or int(plan.get("zeroStage", 0)) > 0
    return bf16 and (use_ds or plan.get("method") in ("LoRA", "Prefix"))


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
    plan: dict[str, Any] = field(default_factory=dict)
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
    from kubetune.remedies.dataprep import prepare_examples
    from kubetune.remedies.train import choose_method_for_run
    from kubetune.trainer.data import TokenizedDataset, read_examples, split_holdout
    from kubetune.trainer.model import apply_method, load_model, load_tokenizer, model_location

    plan, hp = cfg.plan, cfg.hyperparameters
    forced = (cfg.spec.get("dataset") or {}).get("format", "Auto")
    try:
        fmt, examples = read_examples(cfg.dataset, None if forced == "Auto" else forced)
        if cfg.validation:
            _, val_examples = read_examples(cfg.validation, fmt)
            train_examples = examples
        else:
            split = float((cfg.spec.get("dataset") or {}).get("validationSplit", 0.1))
            train_examples, val_examples = split_holdout(examples, split, cfg.seed)
    except (DataError, OSError, ValueError) as exc:
        raise TrainerConfigError(str(exc)) from exc
    location, revision = model_location(cfg.model)
    if cfg.model.startswith("hf://") and not cfg.model.startswith("hf://kubetune/"):
        revision = (cfg.spec.get("model") or {}).get("revision") or revision
    tokenizer = load_tokenizer(location, revision)
    seq_len = int(
        hp.get("sequenceLength") or (cfg.spec.get("dataset") or {}).get("maxSeqLength") or 1024
    )
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    low = load_in_bf16(plan, bf16)
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
    model = apply_method(model, plan, cfg.spec)
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


def start_decisions(inputs: RunInputs, remedies: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """What Auto decided at training start, for GET /decisions, the termination message
    and the report: the method (when the plan had an alternative) and each Auto remedy."""

    out: list[dict[str, Any]] = []
    if inputs.decision:
        entry: dict[str, Any] = {"kind": "method", "step": 0, "text": inputs.decision}
        if inputs.plan.get("switchedFrom"):
            entry["plan"] = {k: inputs.plan.get(k) for k in SWITCHED_PLAN_KEYS}
        out.append(entry)
    for name, d in remedies.items():
        if d.get("auto"):
            state = "on" if d.get("on") else "off"
            why = str(d.get("reason", "")).removeprefix("Auto: ")
            text = f"Auto at training start: {name} {state}: {why}."
            out.append(
                {"kind": "remedy", "name": name, "on": bool(d.get("on")), "step": 0, "text": text}
            )
    return out


def with_epochs(plan: dict[str, Any], epochs: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The plan trained for `epochs` epochs: steps, warm-up and (unless the user set it)
    the evaluation interval follow."""
    from kubetune.planning.plan import eval_steps_for, warmup_steps_for

    hp = dict(plan.get("hyperparameters") or {})
    total = max(1, int(hp.get("stepsPerEpoch") or 1) * epochs)
    hp.update(epochs=epochs, totalSteps=total, warmupSteps=warmup_steps_for(total))
    if not (spec.get("hyperparameters") or {}).get("evalSteps"):
        hp["evalSteps"] = eval_steps_for(total)
    return {**plan, "hyperparameters": hp}


def _cross_validated(cfg: TrainerConfig) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """The epoch count chosen by k-fold cross-validation when the plan asks for it (once:
    a resumed run reads the choice from the output directory)."""
    cv = cfg.plan.get("crossValidation")
    if not isinstance(cv, dict):
        return cfg, None
    from kubetune.remedies.dist import read_record, write_record
    from kubetune.remedies.kfold import cross_validate_epochs
    from kubetune.remedies.train import record_key

    record = cfg.output / "cross-validation.json"
    key = record_key(cfg, "cross-validation")
    result = read_record(record, key)
    if result is None:
        try:
            result = cross_validate_epochs(
                cfg,
                folds=int(cv.get("folds") or 4),
                max_epochs=int(cv.get("maxEpochs") or 2),
                work_dir=cfg.output / "cross-validation",
            )
        except ValueError as exc:  # too few training rows to fold
            text = f"Auto at training start: cross-validation skipped ({exc}); planned epochs kept."
            return cfg, {"kind": "epochs", "step": 0, "text": text}
        write_record(record, result, key)
    planned = (cfg.plan.get("hyperparameters") or {}).get("epochs")
    plan = with_epochs(cfg.plan, int(result["epochs"]), cfg.spec)
    mean = ", ".join("-" if x is None else f"{x:.3f}" for x in result.get("meanCurve") or [])
    text = (
        f"Auto at training start: {result['epochs']} epoch(s) by {result['folds']}-fold "
        f"cross-validation (planned {planned}; mean held-out loss by epoch: {mean}; "
        f"{result.get('seconds', 0):.0f} s)."
    )
    plan["reasons"] = [*plan.get("reasons", []), text]
    alternative = plan.get("alternative")
    if isinstance(alternative, dict) and isinstance(alternative.get("plan"), dict):
        chosen = with_epochs(alternative["plan"], int(result["epochs"]), cfg.spec)
        plan["alternative"] = {**alternative, "plan": chosen}
    decision = {
        "kind": "epochs",
        "step": 0,
        "text": text,
        "plan": {"hyperparameters": plan["hyperparameters"]},
    }
    return replace(cfg, plan=plan), decision


def run(cfg: TrainerConfig) -> int:
    """Train as planned. Returns the process exit code."""
    from transformers import Trainer, set_seed

    from kubetune.policy import StopSettings
    from kubetune.remedies.train import prepare_for_run
    from kubetune.trainer.callbacks import KubetuneCallback
    from kubetune.trainer.data import Collator
    from kubetune.trainer.model import count_parameters
    from kubetune.trainer.report import write_report
    from kubetune.trainer.server import ControlServer, TrainerMetrics

    main_proc = rank() == 0
    set_seed(cfg.seed)
    cfg, cv_decision = _cross_validated(cfg)
    inputs = load_inputs(cfg)
    cfg = replace(cfg, plan=inputs.plan)
    plan, hp = cfg.plan, cfg.hyperparameters
    tokenizer, train_ds, val_ds, model = (
        inputs.tokenizer,
        inputs.train_ds,
        inputs.val_ds,
        inputs.model,
    )
    seq_len, cuda, bf16 = inputs.seq_len, inputs.cuda, inputs.bf16
    remedy = prepare_for_run(cfg, model, tokenizer, train_ds, seq_len, inputs.evidence)
    trainable, total = count_parameters(model)
    if main_proc:
        log.info("method %s: %d of %d parameters trainable", plan["method"], trainable, total)

    out = cfg.output
    ckpt_dir = out / "checkpoints"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(plan, indent=2))
        (out / "spec.json").write_text(json.dumps(cfg.spec, indent=2))
    micro = int(hp.get("microBatchSize") or 1)
    accum = int(hp.get("gradientAccumulationSteps") or 1)
    args = training_arguments(
        cfg, ckpt_dir, has_eval=val_ds is not None, cuda=cuda, bf16=bf16, main_proc=main_proc
    )
    metrics = TrainerMetrics() if main_proc else None
    control = None
    if main_proc and metrics is not None and cfg.metrics_port >= 0:
        control = ControlServer(
            metrics,
            cfg.control_token,
            cfg.metrics_port,
            host=os.environ.get(Env.METRICS_HOST, "0.0.0.0"),
        ).start()
        metrics.plan_info.labels(
            method=plan["method"],
            zero_stage=str(plan.get("zeroStage")),
            offload=str(plan.get("offload")),
        ).set(1)
        log.info("metrics on http://127.0.0.1:%d/metrics", control.port)
    decisions = start_decisions(inputs, remedy.decisions)
    if cv_decision is not None:
        decisions.insert(0, cv_decision)
    if metrics is not None:
        for d in decisions:
            metrics.add_decision(d)
    tokens_per_step = train_ds.token_count / max(len(train_ds), 1) * micro * accum * world_size()
    diagnostics = _diagnostics(cfg, train_ds, val_ds, tokenizer, seq_len, args)
    callback = KubetuneCallback(
        settings=StopSettings.from_spec(cfg.early_stopping),
        metrics=metrics,
        control=control,
        history_path=out / "metrics.jsonl" if main_proc else None,
        tokens_per_step=tokens_per_step,
        is_main=main_proc,
        diagnostics=diagnostics,
        policy_owner=cfg.stop_policy,
        on_probes=remedy.on_probes,
        decisions=decisions,
    )
    trainer = remedy.trainer_class(Trainer)(
        model=model,
        args=args,
        train_dataset=remedy.train_dataset,
        eval_dataset=val_ds,
        data_collator=remedy.collator(Collator(pad_id=int(tokenizer.pad_token_id))),
        compute_metrics=token_accuracy if val_ds is not None else None,
        preprocess_logits_for_metrics=_argmax_logits if val_ds is not None else None,
        callbacks=[callback, *remedy.callbacks],
    )
    resume = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume and main_proc:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = out / "final"
    trainer.save_model(str(final))
    if main_proc:
        tokenizer.save_pretrained(str(final))
        state = trainer.state
        summary: dict[str, Any] = {
            "metrics": dict(callback.summary.get("metrics") or {}),
            "progress": callback.summary.get("progress") or {},
            "output": str(final),
            "trainableParameters": trainable,
            "totalParameters": total,
            "resumedFrom": str(resume) if resume else None,
            "bestCheckpoint": state.best_model_checkpoint,
            "trainRuntimeSeconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
        }
        if callback.stopped:
            summary["earlyStop"] = callback.stopped
        summary["remedies"] = remedy.summary()
        if inputs.data_notes:
            summary["remedies"]["data"] = {"notes": inputs.data_notes, **inputs.data_stats}
        if decisions:
            summary["decisions"] = decisions
        warnings = [*callback.warnings, *filter(None, [remedy.sentence()])]
        if warnings:
            summary["warnings"] = warnings
        if diagnostics is not None:
            summary["probeSeconds"] = {k: round(v, 3) for k, v in diagnostics.watch.seconds.items()}
        if not math.isfinite(float(result.training_loss or 0.0)):
            summary["earlyStop"] = {"reason": "Diverged", "message": "training loss not finite"}
        write_report(out, plan, cfg.spec, callback.history, summary)
        write_termination(
            cfg,
            {k: v for k, v in summary.items() if k in TRAINER_MESSAGE_KEYS},
        )
        if control:
            control.close()
    return EXIT_OK


GENERAL_TEXT_DEFAULT = Path(__file__).parent / "corpus" / "general-en-heldout.txt"


def _diagnostics(
    cfg: TrainerConfig, train_ds: Any, val_ds: Any, tokenizer: Any, seq_len: int, args: Any
) -> Any:
    """The diagnostics runner (None when spec.diagnostics.enabled is false). The general
    text is dataset.generalTextUri, or the held-out English text that ships with kubetune."""
    from kubetune.diagnostics import DiagnosticsSettings, probe_token_budget
    from kubetune.diagnostics.probes import text_rows
    from kubetune.diagnostics.runner import DiagnosticsRunner

    settings = DiagnosticsSettings.from_spec(cfg.spec.get("diagnostics"))
    if not settings.enabled:
        return None
    general_path = Path(cfg.general_text) if cfg.general_text else GENERAL_TEXT_DEFAULT
    try:
        text = general_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainerConfigError(
            f"dataset.generalTextUri: cannot read {general_path}: {exc}"
        ) from exc
    epochs = float(cfg.hyperparameters.get("epochs") or 1)
    budget = probe_token_budget(settings, int(train_ds.token_count * epochs))
    general = text_rows(text, tokenizer, seq_len, budget)
    return DiagnosticsRunner(
        settings,
        train_rows=train_ds.rows,
        heldout_rows=val_ds.rows if val_ds is not None else [],
        general_rows=general,
        token_budget=budget,
        pad_id=int(tokenizer.pad_token_id),
        device=args.device,
        output=cfg.output if rank() == 0 else None,
        seed=cfg.seed,
        synced=world_size() > 1 and int(cfg.plan.get("zeroStage", 0)) == 3,
    )


def main_entry(cfg_loader: Any) -> int:
    """Run with clean exit codes: 78 for configuration or data errors."""
    logging.basicConfig(
        level=logging.INFO if rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg: TrainerConfig | None = None
    try:
        cfg = cfg_loader()
        assert cfg is not None
        return run(cfg)
    except TrainerConfigError as exc:
        log.error("configuration error: %s", exc)
        if cfg is not None and rank() == 0:
            write_termination(cfg, {"error": str(exc), "reason": "ConfigError"})
        else:
            with contextlib.suppress(OSError):
                termination_path().write_text(
                    json.dumps({"error": str(exc), "reason": "ConfigError"})
                )
        return EXIT_CONFIG_ERROR
