"""The remedies inside a training run (torch): continuing from a previous output, replay of
general text, token weights from the base model's perplexity, elastic weight consolidation,
and the Trainer subclass that applies the last two to the loss.

`prepare` runs once after the base model is loaded and before the method is applied; the
recipe then applies the method (unless a previous adapter is continued), calls `attach`
(EWC's Fisher information needs the trainable parameters), and builds its Trainer from
`trainer_class`, `train_dataset` and `collator`."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.contract import Env
from kubetune.remedies.dist import from_rank0, read_record, write_record
from kubetune.remedies.plan import NAMES, Evidence, resolve

log = logging.getLogger("kubetune.remedies")

IGNORE_INDEX = -100
Row = dict[str, Any]

#: The English text the built-in model was pretrained on: the default replay text.
REPLAY_TEXT_DEFAULT = Path(__file__).resolve().parents[1] / "trainer" / "corpus" / "general-en.txt"


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


# ---- replay ----------------------------------------------------------------------------------


def replay_rows(text: str, tokenizer: Any, count: int, row_tokens: int, seed: int) -> list[Row]:
    """`count` windows of about `row_tokens` tokens of general text, every token a target
    (cycling through the text when it is short), in a fixed random order."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    width = max(8, row_tokens - len(bos) - len(eos))
    windows: list[list[int]] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        ids = tokenizer(para, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width]
            if len(chunk) >= 8:
                windows.append(chunk)
    if not windows or count <= 0:
        return []
    random.Random(seed).shuffle(windows)
    rows = []
    for i in range(count):
        ids = bos + windows[i % len(windows)] + eos
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(bos) + ids[len(bos) :]})
    return rows


def replay_count(train_rows: int, ratio: float) -> int:
    """General rows to add so that they are `ratio` of all rows."""
    return max(1, round(train_rows * ratio / (1 - ratio)))


class MixedDataset:
    """Training rows plus replay rows; `sources[i]` says which ("task" or "general")."""

    def __init__(self, task: Sequence[Row], general: Sequence[Row]) -> None:
        self.rows = [*task, *general]
        self.sources = ["task"] * len(task) + ["general"] * len(general)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class ReplaySwitch:
    """The training rows, serving general-text rows in place of `ratio` of the rows asked
    for once switched on: Auto turns replay on during training this way, so the dataset's
    length (and the planned steps) stay as they are. The Trainer's data loader reads it in
    the training process (no workers), in the order its sampler asks."""

    def __init__(self, task: Sequence[Row], general: Sequence[Row], ratio: float) -> None:
        self.rows = list(task)
        self.general = list(general)
        self.ratio = ratio
        self.active = False
        self.served = 0
        self.replayed = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        if self.active and self.general:
            before = math.floor(self.served * self.ratio)
            self.served += 1
            if math.floor(self.served * self.ratio) > before:
                row = self.general[self.replayed % len(self.general)]
                self.replayed += 1
                return row
        return self.rows[i]


# ---- low-perplexity targets --------------------------------------------------------------------


def row_token_nlls(model: Any, rows: Sequence[Row], device: Any) -> list[list[float]]:
    """Per row, the NLL of each target token (labels[1:] != -100), in order."""
    from kubetune.diagnostics.probes import token_nlls

    flat = token_nlls(model, rows, device)
    out: list[list[float]] = []
    pos = 0
    for r in rows:
        n = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
        out.append(flat[pos : pos + n])
        pos += n
    return out


def weighted_rows(
    rows: Sequence[Row], nlls: Sequence[Sequence[float]], threshold: float, weight: float
) -> tuple[list[Row], int, int]:
    """Rows with a `weights` list (one per position): `weight` for a target token whose
    perplexity under the base model exceeds `threshold`, else 1. Returns the rows, the
    tokens down-weighted and the target tokens in all."""
    limit = math.log(threshold)
    out: list[Row] = []
    low = total = 0
    for r, row_nll in zip(rows, nlls, strict=True):
        weights = [1.0] * len(r["input_ids"])
        it = iter(row_nll)
        for j in range(1, len(r["labels"])):
            if r["labels"][j] == IGNORE_INDEX:
                continue
            total += 1
            if next(it) > limit:
                weights[j] = weight
                low += 1
        out.append({**r, "weights": weights})
    return out, low, total


@dataclass
class WeightedCollator:
    """The trainer's collator, plus `weights` (padded with 0) when rows have them."""

    base: Any

    def __call__(self, rows: list[Row]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = self.base(
            [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
        )
        if any("weights" in r for r in rows):
            width = batch["input_ids"].shape[1]
            w = [
                list(r.get("weights") or [1.0] * len(r["input_ids"]))
                + [0.0] * (width - len(r["input_ids"]))
                for r in rows
            ]
            batch["weights"] = torch.tensor(w, dtype=torch.float32)
        return batch


# ---- elastic weight consolidation --------------------------------------------------------------


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al., 2017): penalty = lambda / 2 x
    sum over the trained weights of F x (w - w_base)^2, with F the diagonal empirical
    Fisher information on general text (the mean squared gradient of the LM loss, batch by
    batch), estimated once before training."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.names: list[str] = []
        self.fisher: list[Any] = []
        self.anchor: list[Any] = []
        self.count = 0
        self.tokens = 0

    def estimate(
        self, model: Any, rows: Sequence[Row], device: Any, tokens: int, batch_size: int = 4
    ) -> None:
        import torch

        from kubetune.trainer.data import Collator

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
        was_training = model.training
        model.eval()
        used = batches = 0
        pad = 0
        for start in range(0, len(rows), batch_size):
            if used >= tokens:
                break
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in Collator(pad)(list(chunk)).items()}
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for s, (_, p) in zip(sums, params, strict=True):
                if p.grad is not None:
                    s += p.grad.detach().float() ** 2
            used += sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in chunk)
            batches += 1
        model.zero_grad(set_to_none=True)
        if was_training:
            model.train()
        self.count = sum(p.numel() for _, p in params)
        self.names = [n for n, _ in params]
        self.fisher = [x / max(batches, 1) for x in sums]
        self.anchor = [p.detach().clone().float() for _, p in params]
        self.tokens = used

    def penalty(self, model: Any) -> Any:
        import torch

        named = dict(model.named_parameters())
        total = torch.zeros((), device=self.anchor[0].device if self.anchor else "cpu")
        for name, f, a in zip(self.names, self.fisher, self.anchor, strict=True):
            p = named[name]
            total = total + (f.to(p.device) * (p.float() - a.to(p.device)) ** 2).sum()
        return 0.5 * self.strength * total


def remedy_trainer_class(base: Any, ewc: EWC | None) -> Any:
    """`base` (the HF Trainer) with a loss that honours token weights and adds the EWC
    penalty. Each micro-batch's loss is a mean, scaled for gradient accumulation by the
    Trainer (`loss_is_scaled_for_ga = False`)."""
    import torch
    import torch.nn.functional as F

    class RemedyTrainer(base):  # type: ignore[misc]
        loss_is_scaled_for_ga = False

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            weights = inputs.pop("weights", None)
            if weights is None:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            else:
                labels = inputs["labels"]
                outputs = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
                )
                logits = outputs.logits[:, :-1].float()
                target = labels[:, 1:]
                w = weights[:, 1:].to(logits.dtype) * (target != IGNORE_INDEX).to(logits.dtype)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="none",
                ).view(target.shape)
                loss = (nll * w).sum() / torch.clamp(w.sum(), min=1.0)
            if ewc is not None and model.training:
                loss = loss + ewc.penalty(model)
            return (loss, outputs) if return_outputs else loss

    return RemedyTrainer


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
            from kubetune.remedies.sam import sam_trainer_class

            cls = sam_trainer_class(cls, float(sam.get("rho", 0.05)))
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


@dataclass
class MethodChoice:
    """The plan the run trains with, and what Auto decided at training start."""

    plan: dict[str, Any]
    evidence: Evidence | None
    decision: str | None = None


def choose_method(
    plan: dict[str, Any],
    measure: Callable[[], Evidence | None],
    recorded: Evidence | None = None,
) -> MethodChoice:
    """Measure the evidence once (`measure`, on rank 0, when a remedy or the method is
    Auto; `recorded` when an earlier start of this run measured it) and switch to the
    plan's alternative (method Auto: full fine-tuning) when the data is surprising
    enough. `measure` scores the base model, before the method is applied."""
    from kubetune.remedies.plan import RISK_RATIO

    remedies: dict[str, Any] = plan.get("remedies") or {}
    alternative = plan.get("alternative") or {}
    auto_remedy = any((remedies.get(n) or {}).get("state") == "Auto" for n in NAMES)
    can_score = int(plan.get("zeroStage") or 0) < 3 and str(plan.get("offload") or "None") == "None"
    if not (auto_remedy or alternative) or not can_score or remedies.get("from"):
        return MethodChoice(plan, None)
    evidence = recorded or from_rank0(measure)
    if not alternative or evidence is None:
        return MethodChoice(plan, evidence)
    threshold = float((alternative.get("when") or {}).get("dataPerplexityRatio", RISK_RATIO))
    figures = (
        f"the training targets' perplexity under the base model ({evidence.data_perplexity:.1f}) "
        f"is {evidence.ratio:.2f}x its general-text perplexity ({evidence.general_perplexity:.1f})"
    )
    if evidence.ratio < threshold:
        return MethodChoice(
            plan,
            evidence,
            f"Auto at training start: method stays {plan['method']}: {figures}, below "
            f"{threshold:g}x.",
        )
    chosen = dict(alternative["plan"])
    per_gpu = float((chosen.get("memory") or {}).get("perGpuGiB") or 0)
    decision = (
        f"Auto at training start: method {chosen['method']} instead of {plan['method']}: "
        f"{figures}, at least {threshold:g}x (the plan's alternative: "
        f"ZeRO-{chosen.get('zeroStage')}, {per_gpu:.1f} GiB per GPU)."
    )
    chosen["reasons"] = [*chosen.get("reasons", []), decision]
    chosen["switchedFrom"] = plan["method"]
    return MethodChoice(chosen, evidence, decision)


def prepare(
    *,
    plan: dict[str, Any],
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

    remedies: dict[str, Any] = plan.get("remedies") or {}
    task_rows: list[Row] = list(train_ds.rows)
    states = {n: (remedies.get(n) or {}).get("state", "Off") for n in NAMES}
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
            task_rows, nlls, float(low.get("threshold", 1000.0)), float(low.get("weight", 0.0))
        )
        low["tokens"] = n_low
        low["share"] = round(n_low / max(n_total, 1), 4)
        run.notes.append(
            f"low-perplexity targets: {n_low} of {n_total} target tokens above perplexity "
            f"{low.get('threshold')} get weight {low.get('weight')}"
        )
    replay = decisions["replay"]
    mean_len = round(sum(len(r["input_ids"]) for r in task_rows) / max(len(task_rows), 1))
    count = replay_count(len(task_rows), float(replay.get("ratio", 0.25))) if replay["on"] else 0
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
        run.switch = ReplaySwitch(rows, pool, float(replay.get("ratio", 0.25)))
        run.trigger_ratio = float(replay.get("triggerRatio", 1.5))
        run.train_dataset = run.switch
        run.notes.append(
            f"replay: armed; Auto turns it on if the general-text perplexity rises "
            f"{run.trigger_ratio:g}x during training"
        )
    elif low["on"]:
        run.train_dataset = MixedDataset(rows, [])
    ewc_settings = decisions["ewc"]
    if ewc_settings["on"]:
        ewc = EWC(float(ewc_settings.get("lambda", 5000.0)))
        model.to(device)
        ewc.estimate(model, general, device, int(ewc_settings.get("fisherTokens") or 4096))
        run.ewc = ewc
        run.notes.append(
            f"EWC: Fisher information from {ewc.tokens} general-text tokens over "
            f"{ewc.count} trained weights, lambda {ewc.strength:g}"
        )
    if decisions["halfFineTuning"]["on"]:
        run.callbacks.append(half_fine_tuning_callback(seed))
        run.notes.append("half fine-tuning: a fresh random half of each layer's tensors per epoch")
    return run


def run_texts(cfg: Any) -> tuple[str, str]:
    """(the replay text, the text Auto compares the training data with): replay and EWC
    read dataset.generalTextUri or the corpus the built-in model was pretrained on; Auto
    compares with dataset.generalTextUri or the held-out English text (the forgetting
    probe's text)."""
    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.recipe import GENERAL_TEXT_DEFAULT

    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainerConfigError(f"dataset.generalTextUri: cannot read {path}: {exc}") from exc

    custom = Path(cfg.general_text) if cfg.general_text else None
    general = read(custom or REPLAY_TEXT_DEFAULT)
    return general, general if custom else read(GENERAL_TEXT_DEFAULT)


def run_device() -> Any:
    import os

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
    plan = {k: cfg.plan.get(k) for k in keys}
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
        can_score=int(cfg.plan.get("zeroStage") or 0) < 3
        and str(cfg.plan.get("offload") or "None") == "None",
        evidence=evidence,
    )
    run.state_path = Path(cfg.output) / "replay-switch.json"
    run.restore_switch()
    for name, d in run.decisions.items():
        log.info("remedy %s: %s (%s)", name, "on" if d["on"] else "off", d["reason"])
    for note in run.notes:
        log.info("%s", note)
    return run
