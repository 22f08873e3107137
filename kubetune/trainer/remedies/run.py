"""The remedies of one run: resolved at training start and applied to the training dataset,
the model (EWC's anchor) and the Trainer (its class, collator and callbacks).

`prepare` runs once after the base model is loaded and before training; the recipe builds its
Trainer from `trainer_class`, `train_dataset` and `collator`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.planning.evidence import Evidence, resolve
from kubetune.planning.remedies import NAMES
from kubetune.trainer.config import TrainerConfigError
from kubetune.trainer.data import Row
from kubetune.trainer.dist import from_rank0, read_record, write_record
from kubetune.trainer.evidence import measure_evidence
from kubetune.trainer.remedies.halfft import half_fine_tuning_callback
from kubetune.trainer.remedies.loss import (
    EWC,
    WeightedCollator,
    remedy_trainer_class,
    row_token_nlls,
    weighted_rows,
)
from kubetune.trainer.remedies.replay import MixedDataset, ReplaySwitch, replay_count, replay_rows

log = logging.getLogger("kubetune.remedies")


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class RemedyRun:
    """What the remedies changed in one run."""

    train_dataset: Any
    decisions: dict[str, dict[str, Any]]
    ewc: EWC | None = None
    evidence: Evidence | None = None
    notes: list[str] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    #: Replay that Auto left off at the start, armed to turn on during training.
    switch: ReplaySwitch | None = None
    trigger_ratio: float = 1.5
    #: Where rank 0 records that the armed replay turned on (a resumed run keeps it on).
    state_path: Path | None = None

    def on_probes(self, probes: dict[str, float], step: int) -> dict[str, Any] | None:
        """After an evaluation's probes (every rank): turn the armed replay on when the
        general-text perplexity ratio has reached the trigger (rank 0's figure decides)."""
        if self.switch is None or self.switch.active:
            return None
        ratio = probes.get("general_perplexity_ratio")
        if not from_rank0(lambda: ratio is not None and ratio >= self.trigger_ratio):
            return None
        self.switch.active = True
        shown = f"{ratio:.2f}x" if ratio is not None else "past the trigger on rank 0"
        text = (
            f"Auto at step {step}: replay on: the general-text perplexity is {shown} the base "
            f"model's, at least {self.trigger_ratio:g}x (forgetting): general text now takes "
            f"{self.switch.ratio:.0%} of the rows for the rest of the run."
        )
        self.decisions["replay"].update({"on": True, "reason": text, "atStep": step})
        if self.state_path is not None:
            write_record(self.state_path, {"step": step, "text": text})
        return {"kind": "remedy", "name": "replay", "on": True, "step": step, "text": text}

    def restore_switch(self) -> None:
        """A resumed run: the armed replay that turned on before the restart is on again
        (rank 0 reads the record; its output may be invisible to other nodes)."""
        if self.switch is None or self.state_path is None:
            return
        saved = read_record(self.state_path)
        if saved:
            self.switch.active = True
            self.decisions["replay"].update(
                {"on": True, "reason": str(saved["text"]), "atStep": int(saved["step"])}
            )

    @property
    def needs_trainer(self) -> bool:
        on = {k for k, v in self.decisions.items() if v["on"]}
        return bool(on & {"ewc", "lowPerplexityTargets"})

    def collator(self, base: Any) -> Any:
        return WeightedCollator(base) if self.needs_trainer else base

    def trainer_class(self, base: Any) -> Any:
        cls = remedy_trainer_class(base, self.ewc) if self.needs_trainer else base
        sam = self.decisions.get("sam") or {}
        if sam.get("on"):
            from kubetune.trainer.remedies.sam import sam_trainer_class

            cls = sam_trainer_class(cls, setting(sam, "sam", "rho"))
        return cls

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: dict(v) for k, v in self.decisions.items()}
        if self.evidence is not None:
            out["evidence"] = {
                "dataPerplexity": round(self.evidence.data_perplexity, 3),
                "generalPerplexity": round(self.evidence.general_perplexity, 3),
                "ratio": round(self.evidence.ratio, 3),
            }
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def sentence(self) -> str | None:
        """One line for the report and status.warnings when Auto turned something on."""
        auto_on = [k for k, v in self.decisions.items() if v["on"] and v.get("auto")]
        if not auto_on:
            return None
        first = str(self.decisions[auto_on[0]]["reason"]).removeprefix("Auto: ")
        return f"Remedies turned on by Auto: {', '.join(auto_on)} ({first})."


def prepare(
    *,
    plan: PlanDocument,
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    general_text: str,
    evidence_text: str,
    seq_len: int,
    device: Any,
    seed: int,
    token_budget: int = 8192,
    can_score: bool = True,
    evidence: Evidence | None = None,
) -> RemedyRun:
    """Resolve the remedies of this run (the model has its method applied and has not
    trained yet) and apply them: token weights and replay rows in the training dataset, the
    EWC anchor and Fisher information. `general_text` is replayed and estimates the Fisher
    information; `evidence_text` (the forgetting probe's held-out text) is what Auto
    compares the training data with."""
    from kubetune.diagnostics.runner import base_model

    remedies: dict[str, Any] = (
        plan.remedies.model_dump(by_alias=True, exclude_none=True) if plan.remedies else {}
    )
    task_rows: list[Row] = list(train_ds.rows)
    states = {n: (remedies.get(n) or {}).get("state", "Off") for n in NAMES}  # no plan: Off
    needs_evidence = "Auto" in states.values()
    # Token weights need every training row scored; Auto's evidence needs a sample only
    # (the diagnostics' token budget), so a large dataset costs no extra pass.
    every_row = states["lowPerplexityTargets"] in ("On", "Auto")
    nlls: list[list[float]] | None = None
    if evidence is not None:  # measured once at training start (choose_method)
        needs_evidence = False
    if not can_score:  # the whole model on one device before training would not fit
        needs_evidence = every_row = False
    if needs_evidence:
        evidence = from_rank0(
            lambda: measure_evidence(
                model, tokenizer, task_rows, evidence_text, seq_len, device, seed, token_budget
            )
        )
    if every_row and task_rows:
        model.to(device)
        with base_model(model):
            nlls = row_token_nlls(model, task_rows, device)
    decisions = resolve(remedies, evidence)
    if not can_score:
        for name in ("lowPerplexityTargets", "ewc"):
            if decisions[name]["on"]:
                decisions[name] = {
                    "on": False,
                    "reason": "not with ZeRO-3 or offload: it needs the whole model on one device",
                }
    for name, d in decisions.items():
        d.update({k: v for k, v in (remedies.get(name) or {}).items() if k != "state"})
        d["auto"] = states[name] == "Auto"
    run = RemedyRun(train_dataset=train_ds, decisions=decisions, evidence=evidence)
    rows: list[Row] = task_rows
    low = decisions["lowPerplexityTargets"]
    if low["on"] and nlls is not None:
        rows, n_low, n_total = weighted_rows(
            task_rows,
            nlls,
            setting(low, "lowPerplexityTargets", "threshold"),
            setting(low, "lowPerplexityTargets", "weight"),
        )
        low["tokens"] = n_low
        low["share"] = round(n_low / max(n_total, 1), 4)
        run.notes.append(
            f"low-perplexity targets: {n_low} of {n_total} target tokens above perplexity "
            f"{low.get('threshold')} get weight {low.get('weight')}"
        )
    replay = decisions["replay"]
    mean_len = round(sum(len(r["input_ids"]) for r in task_rows) / max(len(task_rows), 1))
    count = replay_count(len(task_rows), setting(replay, "replay", "ratio")) if replay["on"] else 0
    general = replay_rows(general_text, tokenizer, max(count, 64), max(mean_len, 16), seed)
    if replay["on"] and general:
        mixed = general[:count]
        if low["on"]:
            mixed = [{**r, "weights": [1.0] * len(r["input_ids"])} for r in mixed]
        run.train_dataset = MixedDataset(rows, mixed)
        run.notes.append(
            f"replay: {len(mixed)} general-text rows among {len(run.train_dataset)} "
            f"({len(mixed) / len(run.train_dataset):.0%})"
        )
    elif replay.get("auto") and evidence is not None and general:
        weighted = low["on"]
        pool = (
            [{**r, "weights": [1.0] * len(r["input_ids"])} for r in general]
            if weighted
            else general
        )
        run.switch = ReplaySwitch(rows, pool, setting(replay, "replay", "ratio"))
        run.trigger_ratio = setting(replay, "replay", "triggerRatio")
        run.train_dataset = run.switch
        run.notes.append(
            f"replay: armed; Auto turns it on if the general-text perplexity rises "
            f"{run.trigger_ratio:g}x during training"
        )
    elif low["on"]:
        run.train_dataset = MixedDataset(rows, [])
    ewc_settings = decisions["ewc"]
    if ewc_settings["on"]:
        ewc = EWC(setting(ewc_settings, "ewc", "lambda"))
        model.to(device)
        ewc.estimate(model, general, device, int(setting(ewc_settings, "ewc", "fisherTokens")))
        run.ewc = ewc
        run.notes.append(
            f"EWC: Fisher information from {ewc.tokens} general-text tokens over "
            f"{ewc.count} trained weights, lambda {ewc.strength:g}"
        )
    if decisions["halfFineTuning"]["on"]:
        run.callbacks.append(half_fine_tuning_callback(seed))
        run.notes.append("half fine-tuning: a fresh random half of each layer's tensors per epoch")
    return run


def setting(decision: dict[str, Any], remedy: str, key: str) -> float:
    """A remedy's setting as the plan gives it (the planner fills every one from the spec's
    defaults); a configuration error naming it when plan.json lacks it."""
    value = decision.get(key)
    if value is None:
        raise TrainerConfigError(f"plan.json: remedies.{remedy}.{key} is not set")
    return float(value)
