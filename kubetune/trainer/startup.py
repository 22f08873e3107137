"""The run's start-up glue: the texts and device of the run, Auto's evidence measured once on
the base model (and recorded for resumes and folds), the method Auto trains with, and the
remedies applied with the run's settings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.planning.evidence import Evidence, method_for_evidence, needs_evidence
from kubetune.trainer.dist import from_rank0, read_record, write_record
from kubetune.trainer.evidence import measure_evidence
from kubetune.trainer.remedies.replay import REPLAY_TEXT_DEFAULT
from kubetune.trainer.remedies.run import RemedyRun, prepare
from kubetune.trainer.runtime import GENERAL_TEXT_DEFAULT, run_device

log = logging.getLogger("kubetune.remedies")


@dataclass
class MethodChoice:
    """The plan the run trains with, and what Auto decided at training start."""

    plan: PlanDocument
    evidence: Evidence | None
    decision: str | None = None


def choose_method(
    plan: PlanDocument,
    measure: Callable[[], Evidence | None],
    recorded: Evidence | None = None,
) -> MethodChoice:
    """Measure the evidence once (`measure`, on rank 0, when a remedy or the method is
    Auto; `recorded` when an earlier start of this run measured it) and take the method the
    evidence rule gives (`planning.evidence.method_for_evidence`). `measure` scores the base
    model, before the method is applied."""
    if not needs_evidence(plan):
        return MethodChoice(plan, None)
    evidence = recorded or from_rank0(measure)
    if evidence is None:
        return MethodChoice(plan, None)
    chosen, decision = method_for_evidence(plan, evidence)
    return MethodChoice(chosen, evidence, decision)


def run_texts(cfg: Any) -> tuple[str, str]:
    """(the replay text, the text Auto compares the training data with): replay and EWC
    read dataset.generalTextUri or the corpus the built-in model was pretrained on; Auto
    compares with dataset.generalTextUri or the held-out English text (the forgetting
    probe's text)."""
    from kubetune.trainer.config import TrainerConfigError

    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainerConfigError(f"dataset.generalTextUri: cannot read {path}: {exc}") from exc

    custom = Path(cfg.general_text) if cfg.general_text else None
    general = read(custom or REPLAY_TEXT_DEFAULT)
    return general, general if custom else read(GENERAL_TEXT_DEFAULT)


#: Tokens in one of the base model's samples (fewer when the run's sequences are shorter or
#: the probe's token budget is smaller).
SAMPLE_LENGTH = 128
#: How the samples are drawn (part of their cache key: a change makes new ones).
SAMPLER = "ancestral, temperature 1, v1"


def general_text_source(cfg: Any) -> str:
    """The forgetting probe's text: "Uri" (dataset.generalTextUri), else
    dataset.generalText: "BaseModel" (the default) or "Shipped"."""
    if cfg.general_text:
        return "Uri"
    source = str((cfg.spec.get("dataset") or {}).get("generalText") or "BaseModel")
    if source not in ("BaseModel", "Shipped"):
        from kubetune.trainer.config import TrainerConfigError

        raise TrainerConfigError(f"dataset.generalText: {source!r} is not BaseModel or Shipped")
    return source


def sample_plan(budget: int, seq_len: int) -> tuple[int, int]:
    """(samples, tokens each) for the base model's samples: at most `budget` tokens in
    all (the probe's token budget), each sample within the run's sequence length (with its
    start token)."""
    length = max(1, min(SAMPLE_LENGTH, seq_len - 1, budget))
    return (budget // length if budget > 0 else 0), length


def base_samples_key(cfg: Any, samples: int, length: int) -> str:
    """What the base model's samples are made from: the base model (its location and
    revision; for a directory its config.json and the names and sizes of its weight files),
    the seed, and the sampling settings."""
    import hashlib
    import json

    from kubetune.trainer.model import model_location

    location, revision = model_location(cfg.model)
    h = hashlib.sha256(
        json.dumps([SAMPLER, location, revision, cfg.seed, samples, length]).encode()
    )
    folder = Path(location)
    if folder.is_dir():
        config = folder / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def evidence_budget(cfg: Any) -> int:
    return max(int((cfg.spec.get("diagnostics") or {}).get("tokenBudget") or 8192), 512)


def record_key(cfg: Any, what: str) -> str:
    """What a record in the output directory was made from: the data, the base model, the
    seed, and the plan (its method, alternative, hyperparameters and remedies)."""
    import hashlib
    import json

    keys = (
        ("method", "remedies")  # the figures depend on the data and the base model only
        if what == "evidence"
        else ("method", "alternative", "hyperparameters", "remedies", "crossValidation")
    )
    document = cfg.plan.to_json()
    plan = {k: document.get(k) for k in keys}
    h = hashlib.sha256(json.dumps([what, plan, cfg.seed, str(cfg.model)], sort_keys=True).encode())
    for path in (cfg.dataset, cfg.validation, cfg.general_text):
        if path and Path(path).is_file():
            h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def choose_method_for_run(
    cfg: Any, model: Any, tokenizer: Any, train_ds: Any, seq_len: int
) -> MethodChoice:
    """`choose_method` with the run's texts, device and budget."""

    _, evidence = run_texts(cfg)
    # A resumed run (or a cross-validation fold) decides from the figures the first
    # measurement recorded: the same method as the checkpoints it continues. Rank 0 reads
    # the record (other nodes may not see rank 0's output) and every rank takes its answer;
    # a record of other data, another plan or seed is ignored.
    record = Path(cfg.output) / "auto-evidence.json"
    key = record_key(cfg, "evidence")
    saved = read_record(record, key)
    recorded = (
        Evidence(float(saved["dataPerplexity"]), float(saved["generalPerplexity"]))
        if saved
        else None
    )
    choice = choose_method(
        cfg.plan,
        lambda: measure_evidence(
            model,
            tokenizer,
            train_ds.rows,
            evidence,
            seq_len,
            run_device(),
            cfg.seed,
            evidence_budget(cfg),
        ),
        recorded=recorded,
    )
    if choice.evidence is not None and recorded is None:
        write_record(
            record,
            {
                "dataPerplexity": choice.evidence.data_perplexity,
                "generalPerplexity": choice.evidence.general_perplexity,
            },
            key,
        )
    if choice.decision:
        log.info("%s", choice.decision)
    return choice


def prepare_for_run(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    seq_len: int,
    evidence: Evidence | None = None,
) -> RemedyRun:
    """`prepare` with the run's texts (`run_texts`); `evidence` when already measured."""
    general, evidence_text = run_texts(cfg)
    run = prepare(
        plan=cfg.plan,
        model=model,
        tokenizer=tokenizer,
        train_ds=train_ds,
        general_text=general,
        evidence_text=evidence_text,
        seq_len=seq_len,
        device=run_device(),
        seed=cfg.seed,
        token_budget=evidence_budget(cfg),
        can_score=cfg.plan.model_on_one_device,
        evidence=evidence,
    )
    run.state_path = Path(cfg.output) / "replay-switch.json"
    run.restore_switch()
    for name, d in run.decisions.items():
        log.info("remedy %s: %s (%s)", name, "on" if d["on"] else "off", d["reason"])
    for note in run.notes:
        log.info("%s", note)
    return run
