"""One training run as a recipe with three phases: `setup` (the epochs k-fold chose, data,
model and method, Auto's decisions, remedies, metrics server, callback, HF Trainer), `train`
(resume from the newest checkpoint, train, save) and `finish` (summary, report, the
termination message the operator reads). `main_entry` maps errors to exit codes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune import console as events
from kubetune.api.plan import EPOCHS_AT_START, STEPS_AT_START, Decision, PlanDocument
from kubetune.contract import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    REASON_INTERRUPTED,
    TRAINER_MESSAGE_KEYS,
    Env,
    termination_path,
)
from kubetune.planning.replan import with_epochs, with_training_rows
from kubetune.trainer import interrupt
from kubetune.trainer.config import TrainerConfig, TrainerConfigError
from kubetune.trainer.console import RunConsole, library_log_path, route_library_output, verbose
from kubetune.trainer.finish import start_decisions, write_termination
from kubetune.trainer.remedies.run import RemedyRun
from kubetune.trainer.runtime import GENERAL_TEXT_DEFAULT, latest_checkpoint, rank, world_size
from kubetune.trainer.setup import (
    RunInputs,
    argmax_logits,
    load_inputs,
    token_accuracy,
    training_arguments,
)
from kubetune.trainer.startup import prepare_for_run

log = logging.getLogger("kubetune.trainer")


def _cross_validated(cfg: TrainerConfig) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """The epoch count chosen by k-fold cross-validation when the plan asks for it (once:
    a resumed run reads the choice from the output directory)."""
    cv = cfg.plan.cross_validation
    if cv is None:
        return cfg, None
    from kubetune.trainer.dist import read_record, write_record
    from kubetune.trainer.remedies.kfold import cross_validate_epochs
    from kubetune.trainer.startup import record_key

    record = cfg.output / "cross-validation.json"
    key = record_key(cfg, "cross-validation")
    result = read_record(record, key)
    if result is None:
        try:
            result = cross_validate_epochs(
                cfg,
                folds=cv.folds,
                max_epochs=cv.max_epochs,
                work_dir=cfg.output / "cross-validation",
            )
        except ValueError as exc:  # too few training rows to fold
            text = f"Auto at training start: cross-validation skipped ({exc}); planned epochs kept."
            return cfg, {"kind": "epochs", "step": 0, "text": text}
        write_record(record, result, key)
    planned = cfg.plan.hyperparameters.epochs
    mean = ", ".join("-" if x is None else f"{x:.3f}" for x in result.get("meanCurve") or [])
    text = (
        f"Auto at training start: {result['epochs']} epoch(s) by {result['folds']}-fold "
        f"cross-validation (planned {planned}; mean held-out loss by epoch: {mean}; "
        f"{result.get('seconds', 0):.0f} s)."
    )
    plan = with_epochs(cfg.plan, int(result["epochs"]), eval_steps_set=_eval_steps_set(cfg))
    plan = plan.with_decision(
        Decision(key=EPOCHS_AT_START, value=str(result["epochs"]), sentence=text)
    )
    decision = {
        "kind": "epochs",
        "step": 0,
        "text": text,
        "plan": {"hyperparameters": plan.to_json()["hyperparameters"]},
    }
    return replace(cfg, plan=plan), decision


def _eval_steps_set(cfg: TrainerConfig) -> bool:
    return bool((cfg.spec.get("hyperparameters") or {}).get("evalSteps"))


def _rows_decision(
    cfg: TrainerConfig, remedy: RemedyRun
) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """The plan's steps for the rows the run trains on (replay adds general-text rows)."""
    plan = with_training_rows(cfg.plan, len(remedy.train_dataset))
    added = plan.decision(STEPS_AT_START)
    if added is None or added == cfg.plan.decision(STEPS_AT_START):
        return cfg, None
    decision = {
        "kind": "steps",
        "step": 0,
        "text": added.sentence,
        "plan": {"hyperparameters": plan.to_json()["hyperparameters"]},
    }
    return replace(cfg, plan=plan), decision


@dataclass
class Session:
    """What the setup phase made for the train and finish phases."""

    cfg: TrainerConfig
    inputs: RunInputs
    remedy: RemedyRun
    args: Any
    callback: Any
    trainer: Any
    decisions: list[dict[str, Any]]
    diagnostics: Any
    control: Any
    trainable: int
    total: int
    main_proc: bool
    console: RunConsole | None = None


def run(cfg: TrainerConfig, console: RunConsole | None = None) -> int:
    """Train as planned: setup, train, finish. Returns the process exit code."""
    session = setup(cfg, console)
    if interrupt.requested():
        # SIGTERM while setting up: nothing new to save.
        return _interrupted(session, None)
    result, resume = train(session)
    if session.callback.interrupted_at is not None:
        return _interrupted(session, session.callback.interrupted_at)
    finish(session, result, resume)
    if cfg.output_uri:
        from kubetune.trainer.objects import upload_output

        upload_output(cfg.output, cfg.output_uri)
    return EXIT_OK


def _interrupted(session: Session, step: int | None) -> int:
    """After SIGTERM: each pod's first process says so in its termination message (its
    launcher turns torchrun's failure into EXIT_INTERRUPTED by it), and no final output is
    written; the next start resumes from the checkpoint just saved."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        message = {
            "reason": REASON_INTERRUPTED,
            "message": (
                f"stopped by SIGTERM after saving checkpoint-{step}"
                if step is not None
                else "stopped by SIGTERM before training started"
            ),
            "step": step,
        }
        with contextlib.suppress(OSError):
            session.cfg.termination_path.write_text(json.dumps(message))
    if session.control:
        session.control.close()
    return EXIT_INTERRUPTED


def _upload_callbacks(cfg: TrainerConfig) -> list[Any]:
    """For an s3:// output: each checkpoint uploaded as it is saved."""
    if not cfg.output_uri:
        return []
    from kubetune.trainer.objects import UploadCheckpoints

    return [UploadCheckpoints(cfg.output_uri)]


def setup(cfg: TrainerConfig, console: RunConsole | None = None) -> Session:
    """The epochs cross-validation chose, the inputs (the method Auto trains with), the
    remedies, the metrics and control server, the callback and the HF Trainer."""
    from transformers import Trainer, set_seed

    from kubetune.policy import StopSettings
    from kubetune.trainer.callbacks import KubetuneCallback
    from kubetune.trainer.data import Collator
    from kubetune.trainer.model import count_parameters
    from kubetune.trainer.server import ControlServer, TrainerMetrics

    main_proc = rank() == 0
    set_seed(cfg.seed)
    cfg, cv_decision = _cross_validated(cfg)
    inputs = load_inputs(cfg)
    cfg = replace(cfg, plan=inputs.plan)
    plan, hp = cfg.plan, cfg.hyperparameters
    remedy = prepare_for_run(
        cfg, inputs.model, inputs.tokenizer, inputs.train_ds, inputs.seq_len, inputs.evidence
    )
    cfg, rows_decision = _rows_decision(cfg, remedy)
    plan, hp = cfg.plan, cfg.hyperparameters
    trainable, total = count_parameters(inputs.model)
    if main_proc:
        log.info("method %s: %d of %d parameters trainable", plan.method, trainable, total)
        cfg.output.mkdir(parents=True, exist_ok=True)
        (cfg.output / "plan.json").write_text(json.dumps(plan.to_json(), indent=2))
        (cfg.output / "spec.json").write_text(json.dumps(cfg.spec, indent=2))
    val_ds = inputs.val_ds
    args = training_arguments(
        cfg,
        cfg.output / "checkpoints",
        has_eval=val_ds is not None,
        cuda=inputs.cuda,
        bf16=inputs.bf16,
        main_proc=main_proc,
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
            method=plan.method, zero_stage=str(plan.zero_stage), offload=plan.offload
        ).set(1)
        log.info("metrics on http://127.0.0.1:%d/metrics", control.port)
    decisions = start_decisions(inputs, remedy.decisions)
    if cv_decision is not None:
        decisions.insert(0, cv_decision)
    if rows_decision is not None:
        decisions.append(rows_decision)
    if metrics is not None:
        for d in decisions:
            metrics.add_decision(d)
    micro, accum = hp.micro_batch_size, hp.gradient_accumulation_steps
    train_ds = inputs.train_ds
    tokens_per_step = train_ds.token_count / max(len(train_ds), 1) * micro * accum * world_size()
    diagnostics = _diagnostics(cfg, train_ds, val_ds, inputs.tokenizer, inputs.seq_len, args)
    callback = KubetuneCallback(
        settings=StopSettings.from_spec(cfg.early_stopping),
        metrics=metrics,
        control=control,
        history_path=cfg.output / "metrics.jsonl" if main_proc else None,
        tokens_per_step=tokens_per_step,
        is_main=main_proc,
        diagnostics=diagnostics,
        policy_owner=cfg.stop_policy,
        on_probes=remedy.on_probes,
        decisions=decisions,
        console=console,
    )
    trainer = remedy.trainer_class(Trainer)(
        model=inputs.model,
        args=args,
        train_dataset=remedy.train_dataset,
        eval_dataset=val_ds,
        data_collator=remedy.collator(Collator(pad_id=int(inputs.tokenizer.pad_token_id))),
        compute_metrics=token_accuracy if val_ds is not None else None,
        preprocess_logits_for_metrics=argmax_logits if val_ds is not None else None,
        callbacks=[callback, *remedy.callbacks, *_upload_callbacks(cfg)],
    )
    if not verbose():
        from kubetune.trainer.console import quiet_trainer

        quiet_trainer(trainer)
    return Session(
        cfg,
        inputs,
        remedy,
        args,
        callback,
        trainer,
        decisions,
        diagnostics,
        control,
        trainable,
        total,
        main_proc,
        console if main_proc else None,
    )


def train(session: Session) -> tuple[Any, Path | None]:
    """Train, resuming from the newest complete checkpoint; save the final model."""
    ckpt_dir = session.cfg.output / "checkpoints"
    resume = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume and session.main_proc:
        log.info("resuming from %s", resume)
    if session.console is not None:
        hp = session.cfg.hyperparameters
        text = (
            f"training {session.cfg.plan.method}: {session.trainable:,} of {session.total:,}"
            f" parameters trainable, {hp.epochs:g} epoch(s), evaluation every"
            f" {max(1, hp.eval_steps)} step(s)"
        )
        if resume:
            text += f"; resuming from {resume.name}"
        session.console.emit(events.START, text=text)
    result = session.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if session.callback.interrupted_at is not None:
        return result, resume
    final = session.cfg.output / "final"
    session.trainer.save_model(str(final))
    if session.main_proc:
        session.inputs.tokenizer.save_pretrained(str(final))
    return result, resume


def finish(session: Session, result: Any, resume: Path | None) -> None:
    """Rank 0: the summary, the report and the termination message; the server closes."""
    from kubetune.trainer.report import write_report

    if not session.main_proc:
        return
    cfg, callback, remedy, inputs = session.cfg, session.callback, session.remedy, session.inputs
    summary: dict[str, Any] = {
        "metrics": dict(callback.summary.get("metrics") or {}),
        "progress": callback.summary.get("progress") or {},
        "output": f"{cfg.output_uri.rstrip('/')}/final"
        if cfg.output_uri
        else str(cfg.output / "final"),
        "trainableParameters": session.trainable,
        "totalParameters": session.total,
        "resumedFrom": str(resume) if resume else None,
        "bestCheckpoint": session.trainer.state.best_model_checkpoint,
        "trainRuntimeSeconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
    }
    if callback.stopped:
        summary["earlyStop"] = callback.stopped
    summary["remedies"] = remedy.summary()
    if inputs.data_notes:
        summary["remedies"]["data"] = {"notes": inputs.data_notes, **inputs.data_stats}
    if session.decisions:
        summary["decisions"] = session.decisions
    warnings = [*callback.warnings, *filter(None, [remedy.sentence()])]
    if warnings:
        summary["warnings"] = warnings
    if session.diagnostics is not None:
        seconds = session.diagnostics.watch.seconds
        summary["probeSeconds"] = {k: round(v, 3) for k, v in seconds.items()}
        summary["generalText"] = session.diagnostics.general_text
    gpu_memory = _gpu_memory_summary(cfg.plan)
    if gpu_memory:
        summary["gpuMemory"] = gpu_memory
    if not math.isfinite(float(result.training_loss or 0.0)):
        summary["earlyStop"] = {"reason": "Diverged", "message": "training loss not finite"}
    write_report(cfg.output, cfg.plan, cfg.spec, callback.history, summary)
    if session.console is not None:
        progress = summary["progress"]
        session.console.emit(
            events.DONE,
            steps=progress.get("step", 0),
            seconds=summary["trainRuntimeSeconds"],
            output=summary["output"],
            bestEvalLoss=summary["metrics"].get("bestEvalLoss"),
            bestStep=summary["metrics"].get("bestStep"),
        )
    write_termination(cfg, {k: v for k, v in summary.items() if k in TRAINER_MESSAGE_KEYS})
    if session.control:
        session.control.close()


def _gpu_memory_summary(plan: PlanDocument) -> dict[str, float]:
    """Rank 0's device memory over the run against the plan's per-GPU estimate (GiB): the
    allocator's peak (tensors), its peak reservation, and what the device holds outside
    the allocator now (CUDA context, cuBLAS/NCCL workspaces; on a GPU that other processes
    share, theirs too). Empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    gib = float(1 << 30)
    free, total = torch.cuda.mem_get_info()
    outside = max(0, (total - free) - torch.cuda.memory_reserved())
    reserved = torch.cuda.max_memory_reserved()
    summary = {
        "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / gib, 2),
        "peakReservedGiB": round(reserved / gib, 2),
        "outsideAllocatorGiB": round(outside / gib, 2),
        "peakTotalGiB": round((reserved + outside) / gib, 2),
    }
    summary["plannedPerGpuGiB"] = round(plan.memory.per_gpu_gib, 2)
    return summary


def _diagnostics(
    cfg: TrainerConfig, train_ds: Any, val_ds: Any, tokenizer: Any, seq_len: int, args: Any
) -> Any:
    """The diagnostics runner (None when spec.diagnostics.enabled is false). The general
    text is dataset.generalTextUri; else, by dataset.generalText, seeded samples of the base
    model itself (BaseModel, the default: drawn before training, cached in the output) or
    the held-out English text that ships with kubetune (Shipped)."""
    from kubetune.diagnostics import DiagnosticsSettings, probe_token_budget
    from kubetune.diagnostics.probes import text_rows
    from kubetune.diagnostics.runner import BaseSamples, DiagnosticsRunner
    from kubetune.trainer.dist import from_rank0
    from kubetune.trainer.startup import base_samples_key, general_text_source, sample_plan

    settings = DiagnosticsSettings.from_spec(cfg.spec.get("diagnostics"))
    if not settings.enabled:
        return None
    epochs = float(cfg.hyperparameters.epochs)
    budget = probe_token_budget(settings, int(train_ds.token_count * epochs))
    source = general_text_source(cfg)
    general: list[Any] = []
    base: BaseSamples | None = None
    if source == "BaseModel":
        samples, length = sample_plan(budget, seq_len)
        start = tokenizer.bos_token_id
        if start is None:
            start = tokenizer.eos_token_id
        if start is None:
            raise TrainerConfigError(
                "dataset.generalText: BaseModel samples start from the tokenizer's BOS or "
                "EOS token and this tokenizer has neither: set dataset.generalTextUri or "
                "dataset.generalText: Shipped"
            )
        if samples:
            base = BaseSamples(
                key=base_samples_key(cfg, samples, length),
                samples=samples,
                length=length,
                seed=cfg.seed,
                start_id=int(start),
                eos_id=tokenizer.eos_token_id,
                decode=lambda ids: str(tokenizer.decode(ids)),
            )
    else:
        general_path = Path(cfg.general_text) if cfg.general_text else GENERAL_TEXT_DEFAULT
        try:
            text = general_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainerConfigError(
                f"dataset.generalTextUri: cannot read {general_path}: {exc}"
            ) from exc
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
        synced=world_size() > 1 and cfg.plan.zero_stage == 3,
        base_samples=base,
        share=lambda value: from_rank0(lambda: value),
        general_source=source,
    )


def _console_stream() -> tuple[Any, Path | None]:
    """The stream for console lines and the file the libraries' output went to. In a pod
    (no events file, not verbose) this process's stdout and stderr go to
    `<output>/logs/trainer-rank-N.log` and the console lines to the former stdout; under
    `kubetune run` the CLI already sends them to its run log."""
    output = os.environ.get(Env.OUTPUT_PATH)
    if verbose() or os.environ.get(Env.EVENTS_PATH) or not output:
        return sys.stdout, None
    path = library_log_path(Path(output), rank())
    try:
        return route_library_output(path), path
    except OSError:  # an unwritable output folder fails later, with its own message
        return sys.stdout, None


def main_entry(cfg_loader: Any) -> int:
    """Run with clean exit codes: 78 for configuration or data errors."""
    interrupt.install()
    stream, library_log = _console_stream()
    logging.basicConfig(
        level=logging.INFO if rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console = RunConsole.from_env(stream)
    if library_log is not None:
        stream.write(f"kubetune trainer: library output in {library_log}\n")
        stream.flush()
    cfg: TrainerConfig | None = None
    try:
        cfg = cfg_loader()
        assert cfg is not None
        return run(cfg, console)
    except TrainerConfigError as exc:
        log.error("configuration error: %s", exc)
        _say_error(console, stream, f"configuration error: {exc}")
        if cfg is not None and rank() == 0:
            write_termination(cfg, {"error": str(exc), "reason": "ConfigError"})
        else:
            with contextlib.suppress(OSError):
                termination_path().write_text(
                    json.dumps({"error": str(exc), "reason": "ConfigError"})
                )
        return EXIT_CONFIG_ERROR
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            log.exception("the trainer failed")
            where = f"; the traceback is in {library_log}" if library_log else ""
            _say_error(console, stream, f"rank {rank()} failed: {exc!r}{where}")
        raise


def _say_error(console: RunConsole, stream: Any, text: str) -> None:
    """An error on the console: an event for `kubetune run` (rank 0), else a plain line
    when the libraries' output (and so the traceback) went to a log file."""
    if rank() == 0 and console.events_path is not None:
        console.emit(events.ERROR, text=text)
    elif stream is not sys.stdout:
        stream.write(f"error: {text}\n")
        stream.flush()
