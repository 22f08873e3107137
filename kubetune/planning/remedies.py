"""What the remedies will do, decided without torch: at planning time (each remedy On, Off, or
Auto to be decided at training start, with a reason in the plan) and at training start (Auto
resolved from the base model's perplexity on the training targets and on general text).

The plan document carries `remedies` for the trainer and one decision per remedy (keyed
`remedy.<name>`, so `status.plan.reasons` says what was chosen and why)."""

from __future__ import annotations

from typing import Any

from kubetune.api.plan import REMEDY_NAMES, Decision, PlanDocument
from kubetune.api.spec import Augmentation, CrossValidation, Remedies
from kubetune.planning.kfold import KFOLD_BELOW, cost_sentence, max_epochs_for, mode_on

#: Above this many parameters the planner uses the lower learning-rate bands.
LARGE_MODEL_PARAMS = 20_000_000_000

#: The remedies Auto turns on when the data is at risk, from the bench (docs/evidence.md):
#: replay kept full fine-tuning's held-out target perplexity within a few percent while
#: cutting its general-text perplexity rise by ~85%; EWC, low-perplexity targets and half
#: fine-tuning cost more target perplexity for what they saved, so they stay explicit (On).
AUTO_REMEDIES: tuple[str, ...] = ("replay",)

#: Auto's trigger: the training targets are this many times more surprising to the base
#: model than general text. Lower than the diagnostics' 3x warning: the remedies Auto uses
#: cost little, and the bench's glossary (docs/evidence.md), which forgets, is only 1.8x.
RISK_RATIO = 1.5

#: Why Auto leaves each other remedy off: its row in docs/evidence.md.
AUTO_OFF_WHY = {
    "ewc": "in docs/evidence.md it cut forgetting but cost 35% held-out target perplexity",
    "lowPerplexityTargets": (
        "in docs/evidence.md it made held-out target perplexity 4.4x worse and forgetting worse"
    ),
    "halfFineTuning": (
        "in docs/evidence.md it saved less forgetting than replay, varied by seed, and cost "
        "41% held-out target perplexity"
    ),
    "sam": "in docs/evidence.md it did not reduce forgetting, at twice the compute per step",
    "selfRewrite": (
        "in docs/evidence.md the bench's base model could not paraphrase, so it changed "
        "nothing; unmeasured with a model that can"
    ),
}

#: The remedies, in the order the plan gives them (the plan document's own list).
NAMES = REMEDY_NAMES
LABELS = {
    "replay": "Replay of general text",
    "ewc": "Elastic weight consolidation",
    "lowPerplexityTargets": "Low-perplexity targets",
    "halfFineTuning": "Half fine-tuning",
    "sam": "Sharpness-aware minimisation",
    "selfRewrite": "Self-rewrite of the targets",
}


def _get(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(key, default)
    return getattr(section, key, default)


def remedy_settings(spec: Any) -> dict[str, dict[str, Any]]:
    """spec.remedies (a pydantic spec or its camelCase dict) as camelCase dicts with the
    defaults filled in."""
    raw = _get(spec, "remedies", None)
    if raw is None:
        model = Remedies()
    elif isinstance(raw, dict):
        model = Remedies.model_validate(raw)
    else:
        model = raw
    dumped: dict[str, dict[str, Any]] = model.model_dump(by_alias=True, mode="json")
    return dumped


def incremental_learning_rate(method: str, planned: float, total_parameters: int) -> float:
    """The incremental band: 5e-6 for full weights (2e-6 above 20B parameters), half the
    planned rate for adapters."""
    if method in ("Full", "Partial"):
        return 2e-6 if total_parameters > LARGE_MODEL_PARAMS else 5e-6
    return planned / 2


def plan_remedies(plan: PlanDocument, spec: Any) -> PlanDocument:
    """The plan with its remedies: `remedies` for the trainer, one decision per remedy (and
    for model.from, augmentation and cross-validation), their warnings, and the lower
    learning-rate band of an incremental update."""
    settings = remedy_settings(spec)
    hp = plan.hyperparameters
    decisions: list[Decision] = []
    warnings = list(plan.warnings)
    out: dict[str, Any] = {}
    for name in NAMES:
        s = dict(settings[name])
        state, why = _plan_state(name, s["mode"], plan.method, plan.zero_stage, s, plan.world_size)
        s["state"] = state
        out[name] = s
        decisions.append(
            Decision(key=f"remedy.{name}", value=state, sentence=f"{LABELS[name]}: {why}.")
        )
    model_spec = _get(spec, "model", None)
    previous = _get(model_spec, "from_", None) or _get(model_spec, "from", None)
    if previous:
        out["from"] = previous
        hp_spec = _get(spec, "hyperparameters", None)
        user_lr = _get(hp_spec, "learning_rate", None) or _get(hp_spec, "learningRate", None)
        already = bool(_get(hp_spec, "incremental", False))
        if not user_lr and not already:
            lr = incremental_learning_rate(plan.method, hp.learning_rate, plan.total_parameters)
            hp = hp.model_copy(update={"learning_rate": lr})
            sentence = (
                f"Incremental update: continues from {previous} (its adapter or weights) with "
                f"the lower learning-rate band, {lr:g}."
            )
        else:
            sentence = f"Incremental update: continues from {previous} (its adapter or weights)."
        decisions.append(Decision(key="incremental", value=str(previous), sentence=sentence))
    if out["ewc"]["state"] == "On":
        extra = 8 * plan.trainable_parameters
        warnings.append(
            f"EWC keeps an fp32 anchor and Fisher value per trained weight: {extra / 2**30:.2f} "
            "GiB per process more than the memory estimate above."
        )
    if out["sam"]["state"] == "On":
        extra = sam_extra_bytes(
            plan.trainable_parameters, gradient_accumulation_steps=hp.gradient_accumulation_steps
        )
        warnings.append(
            f"SAM keeps the weight perturbation: {extra / 2**30:.2f} GiB per process more "
            "than the memory estimate above, and each step costs about twice the compute."
        )
    data_decisions, cross_validation = _data_decisions(spec, plan.example_count, hp.epochs)
    decisions.extend(data_decisions)
    for name in NAMES:  # a remedy forced On that cannot run here: a warning, not just a reason
        if settings[name]["mode"] == "On" and out[name]["state"] == "Off":
            why = next(d.sentence for d in decisions if d.key == f"remedy.{name}")
            warnings.append(
                f"spec.remedies.{name}.mode is On but it cannot run with this plan: " + why
            )
    return PlanDocument.model_validate(
        {
            **plan.to_json(),
            "hyperparameters": hp.model_dump(by_alias=True),
            "remedies": out,
            "crossValidation": cross_validation,
            "warnings": warnings,
            "decisions": [d.model_dump(by_alias=True) for d in [*plan.decisions, *decisions]],
        }
    )


def _data_decisions(
    spec: Any, examples: int, planned_epochs: float
) -> tuple[list[Decision], dict[str, int] | None]:
    """Augmentation and the cross-validated epoch count, as decisions (and the folds)."""
    out: list[Decision] = []
    raw = _get(spec, "augmentation", None)
    aug = Augmentation.model_validate(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if aug is not None and (aug.paraphrases or aug.back_translations):
        sentence = augmentation_sentence(
            aug.paraphrases,
            aug.back_translations,
            aug.pivot_language,
            aug.model_uri or "the base model",
        )
        out.append(Decision(key="augmentation", sentence=sentence))
    hp_spec = _get(spec, "hyperparameters", None)
    raw_cv = _get(hp_spec, "cross_validation", None) or _get(hp_spec, "crossValidation", None)
    cv = (
        CrossValidation.model_validate(raw_cv or {})
        if isinstance(raw_cv, dict) or raw_cv is None
        else raw_cv
    )
    epochs_set = _get(hp_spec, "epochs", None) is not None
    on, why = mode_on(cv.mode, examples, epochs_set)
    folds_plan: dict[str, int] | None = None
    if on:
        folds = min(cv.folds, examples)
        longest = max_epochs_for(planned_epochs)
        folds_plan = {"folds": folds, "maxEpochs": longest}
        why += (
            f" {folds} folds train up to {longest} epochs each before the run, which then "
            f"trains for the epoch count with the lowest mean held-out loss (in place of "
            f"{planned_epochs:g}; the folds train the method without the remedies). "
            + cost_sentence(folds, longest, examples, planned_epochs)
        )
    if cv.mode != "Off" and (on or examples < KFOLD_BELOW):
        out.append(Decision(key="crossValidation", value="On" if on else "Off", sentence=why))
    return out, folds_plan


def _plan_state(
    name: str,
    mode: str,
    method: str,
    zero: int,
    s: dict[str, Any],
    world: int = 1,
) -> tuple[str, str]:
    """("On" | "Off" | "Auto", the reason)."""
    if name == "ewc" and method not in ("Full", "Partial"):
        return "Off", f"off, it applies to Full and Partial fine-tuning and the method is {method}"
    if name == "ewc" and zero == 3:
        return "Off", "off, it needs whole weights on every rank and the plan uses ZeRO-3"
    if name == "sam" and mode == "On" and (zero > 0 or world > 1):
        return "Off", (
            "off, it runs on one process without DeepSpeed (ZeRO shards the weights it "
            "perturbs, and kubetune runs several processes with DeepSpeed)"
        )
    if name == "halfFineTuning" and mode != "Off":
        if method != "Full":
            return "Off", f"off, it is a variant of Full fine-tuning and the method is {method}"
        if zero > 0 or world > 1:
            return "Off", "off, it runs on one process without ZeRO (it freezes tensors per epoch)"
    detail = _detail(name, s)
    if mode == "On":
        return "On", f"on, set by spec.remedies ({detail})"
    if mode == "Off":
        return "Off", "off, set by spec.remedies"
    if name not in AUTO_REMEDIES:
        return "Off", f"off (Auto leaves it off: {AUTO_OFF_WHY[name]}; set it On to use it)"
    return "Auto", (
        "decided at training start: on when the base model's perplexity on the training "
        f"targets is at least {RISK_RATIO:g}x its perplexity on general text ({detail})"
    )


def _detail(name: str, s: dict[str, Any]) -> str:
    if name == "replay":
        return f"{s['ratio']:.0%} of the training rows are general text"
    if name == "ewc":
        return (
            f"lambda {s['lambda']:g}, Fisher information from {s['fisherTokens']} general-text "
            "tokens (one forward and backward pass over them, and two more copies of the "
            "trained weights in memory)"
        )
    if name == "halfFineTuning":
        return "each epoch trains a random half of every layer's weight tensors"
    if name == "sam":
        return f"rho {s['rho']:g}; " + sam_cost_sentence(float(s["rho"]))
    if name == "selfRewrite":
        return (
            "before training the base model rewrites each training response given the "
            f"original; a rewrite replaces it when it keeps {s['minOverlap']:.0%} of its words, "
            f"is at most {s['maxLengthRatio']:g}x its length and is less surprising to the "
            "base model (one generation per training example)"
        )
    weight = "weight 0 (masked)" if s["weight"] == 0 else f"weight {s['weight']:g}"
    return (
        f"target tokens above perplexity {s['threshold']:g} under the base model get loss " + weight
    )


# ---- the augmentation sentence -------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def generations_per_example(paraphrases: int, back_translations: int) -> int:
    """Generations per training example: one per paraphrase, two per back-translation."""
    return paraphrases + 2 * back_translations


def augmentation_sentence(
    paraphrases: int, back_translations: int, pivot_language: str, model_label: str
) -> str:
    """One line for the plan's reasons: what augmentation adds, with which model, at what
    cost."""
    if paraphrases <= 0 and back_translations <= 0:
        return "Augmentation off: no paraphrases or back-translations asked."
    parts = []
    if paraphrases > 0:
        parts.append(_plural(paraphrases, "paraphrase"))
    if back_translations > 0:
        parts.append(f"{_plural(back_translations, 'back-translation')} via {pivot_language}")
    rows = paraphrases + back_translations
    cost = generations_per_example(paraphrases, back_translations)
    return (
        f"Augmentation: {' and '.join(parts)} per training example, written by "
        f"{model_label}; up to {_plural(rows, 'new row')} per example, training data only "
        f"(evaluation is not augmented). Cost: {_plural(cost, 'generation')} per example "
        "(one per paraphrase, two per back-translation)."
    )


# ---- SAM's cost ----------------------------------------------------------------------------

#: Bytes per trained weight for the copy of the weights SAM keeps while they are perturbed
#: (an fp32 weight; bf16/fp16 weights need half).
BYTES_PER_WEIGHT = 4


def sam_extra_bytes(trainable_parameters: int, *, gradient_accumulation_steps: int = 1) -> int:
    """The memory SAM adds per process: a copy of each trained weight (at most 4 bytes)
    while it is perturbed, plus, when gradients are accumulated, one more gradient buffer
    (the earlier micro-batches' sum is kept aside during the first pass)."""
    copies = 2 if gradient_accumulation_steps > 1 else 1
    return max(0, int(trainable_parameters)) * BYTES_PER_WEIGHT * copies


def sam_cost_sentence(rho: float, trainable_parameters: int | None = None) -> str:
    """One sentence for the plan: what SAM costs."""
    memory = "one more copy of each trained weight (trainable parameters x 4 bytes"
    if trainable_parameters is not None:
        memory += f", {sam_extra_bytes(trainable_parameters) / 2**30:.2f} GiB per process"
    memory += ")"
    return (
        f"Sharpness-aware minimisation (rho {rho:g}): each optimizer step costs two forward "
        f"and backward passes per micro-batch (about 2x the compute of a step) and {memory}."
    )
