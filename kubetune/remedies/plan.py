"""What the remedies will do, decided without torch: at planning time (each remedy On, Off, or
Auto to be decided at training start, with a reason in the plan) and at training start (Auto
resolved from the base model's perplexity on the training targets and on general text).

The plan carries `plan["remedies"]` for the trainer and one sentence per remedy in
`plan["reasons"]` (so `status.plan.reasons` says what was chosen and why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Above this many parameters the planner uses the lower learning-rate bands.
LARGE_MODEL_PARAMS = 20_000_000_000

#: The remedies Auto turns on when the data is at risk, from the bench (docs/evidence.md):
#: replay kept full fine-tuning's held-out target perplexity within a few percent while
#: cutting its general-text perplexity rise by ~85%; EWC, low-perplexity targets and half
#: fine-tuning cost more target perplexity for what they saved, so they stay explicit (On).
AUTO_REMEDIES: tuple[str, ...] = ("replay",)

NAMES = ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
LABELS = {
    "replay": "Replay of general text",
    "ewc": "Elastic weight consolidation",
    "lowPerplexityTargets": "Low-perplexity targets",
    "halfFineTuning": "Half fine-tuning",
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
    from kubetune.api.spec import Remedies

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


def plan_remedies(plan: dict[str, Any], spec: Any) -> None:
    """Add `plan["remedies"]` and one reason per remedy (and for model.from) to the plan."""
    settings = remedy_settings(spec)
    method = str(plan.get("method"))
    zero = int(plan.get("zeroStage") or 0)
    world = int(plan.get("numNodes") or 1) * int(plan.get("gpusPerNode") or 1)
    reasons: list[str] = []
    out: dict[str, Any] = {}
    for name in NAMES:
        s = dict(settings[name])
        mode = s["mode"]
        label = LABELS[name]
        state, why = _plan_state(name, mode, method, zero, s, world)
        s["state"] = state
        out[name] = s
        reasons.append(f"{label}: {why}.")
    model_spec = _get(spec, "model", None)
    previous = _get(model_spec, "from_", None) or _get(model_spec, "from", None)
    hp = plan.get("hyperparameters")
    if previous:
        out["from"] = previous
        hp_spec = _get(spec, "hyperparameters", None)
        user_lr = _get(hp_spec, "learning_rate", None) or _get(hp_spec, "learningRate", None)
        already = bool(_get(hp_spec, "incremental", False))
        if isinstance(hp, dict) and not user_lr and not already and hp.get("learningRate"):
            lr = incremental_learning_rate(
                method, float(hp["learningRate"]), int(plan.get("totalParameters") or 0)
            )
            hp["learningRate"] = lr
            reasons.append(
                f"Incremental update: continues from {previous} (its adapter or weights) with "
                f"the lower learning-rate band, {lr:g}."
            )
        else:
            reasons.append(
                f"Incremental update: continues from {previous} (its adapter or weights)."
            )
    if out["ewc"]["state"] == "On":
        extra = 8 * int(plan.get("trainableParameters") or 0)
        plan.setdefault("warnings", []).append(
            f"EWC keeps an fp32 anchor and Fisher value per trained weight: {extra / 2**30:.2f} "
            "GiB per process more than the memory estimate above."
        )
    plan["remedies"] = out
    plan.setdefault("reasons", []).extend(reasons)


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
        return "Off", (
            "off (Auto leaves it off: in docs/evidence.md it cost more held-out target "
            "perplexity than replay for what it saved; set it On to use it)"
        )
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
    weight = "weight 0 (masked)" if s["weight"] == 0 else f"weight {s['weight']:g}"
    return (
        f"target tokens above perplexity {s['threshold']:g} under the base model get loss " + weight
    )


#: Auto's trigger: the training targets are this many times more surprising to the base
#: model than general text. Lower than the diagnostics' 3x warning: the remedies Auto uses
#: cost little, and the bench's glossary (docs/evidence.md), which forgets, is only 1.8x.
RISK_RATIO = 1.5


@dataclass(frozen=True)
class Evidence:
    """The base model's perplexity on the training targets and on general text."""

    data_perplexity: float
    general_perplexity: float
    high_token_ratio: float = 0.0

    @property
    def ratio(self) -> float:
        return self.data_perplexity / max(self.general_perplexity, 1e-9)


def resolve(
    remedies: dict[str, Any], evidence: Evidence | None, risk_ratio: float = RISK_RATIO
) -> dict[str, dict[str, Any]]:
    """At training start: each remedy on or off, with the reason (Auto decided here)."""
    out: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        s = remedies.get(name) or {}
        state = s.get("state", "Off")
        if state == "On":
            out[name] = {"on": True, "reason": "set On"}
        elif state == "Off":
            out[name] = {"on": False, "reason": "off"}
        elif evidence is None:
            why = "no general text, or ZeRO-3 or offload"
            out[name] = {"on": False, "reason": f"Auto: no evidence ({why})"}
        elif evidence.ratio >= risk_ratio:
            out[name] = {
                "on": True,
                "reason": (
                    f"Auto: the training targets' perplexity under the base model "
                    f"({evidence.data_perplexity:.1f}) is {evidence.ratio:.1f}x its general-text "
                    f"perplexity ({evidence.general_perplexity:.1f}), at least {risk_ratio:g}x: "
                    "the run is at risk of forgetting"
                ),
            }
        else:
            out[name] = {
                "on": False,
                "reason": (
                    f"Auto: the training targets' perplexity under the base model is "
                    f"{evidence.ratio:.1f}x its general-text perplexity, below {risk_ratio:g}x"
                ),
            }
    return out
