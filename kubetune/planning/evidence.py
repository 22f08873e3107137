"""Auto's evidence rule: the base model's perplexity on the training targets against its
perplexity on general text, measured at training start (by the trainer), decides the Auto
remedies and method Auto's switch to the plan's alternative. Pure: the measurement itself is
the trainer's (`kubetune.trainer.startup`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.plan import METHOD_AT_START, Decision, PlanDocument
from kubetune.planning.remedies import NAMES, RISK_RATIO

__all__ = ["RISK_RATIO", "Evidence", "method_for_evidence", "needs_evidence", "resolve"]


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


def needs_evidence(plan: PlanDocument) -> bool:
    """Whether the base model is scored at training start: a remedy is Auto or the plan has
    an alternative, the whole model fits one device, and it is not an incremental update."""
    remedies = plan.remedies
    auto_remedy = remedies is not None and "Auto" in remedies.states().values()
    incremental = remedies is not None and bool(remedies.from_)
    wanted = auto_remedy or plan.alternative is not None
    return wanted and plan.model_on_one_device and not incremental


def method_for_evidence(plan: PlanDocument, evidence: Evidence) -> tuple[PlanDocument, str | None]:
    """Method Auto's rule at training start: the plan's alternative (full fine-tuning) when the
    base model finds the training targets at least `when.dataPerplexityRatio` times as
    surprising as general text, else the plan; with the sentence that says which (None
    without an alternative)."""
    alternative = plan.alternative
    if alternative is None:
        return plan, None
    threshold = alternative.when.data_perplexity_ratio
    figures = (
        f"the training targets' perplexity under the base model ({evidence.data_perplexity:.1f}) "
        f"is {evidence.ratio:.2f}x its general-text perplexity ({evidence.general_perplexity:.1f})"
    )
    if evidence.ratio < threshold:
        stays = f"Auto at training start: method stays {plan.method}: {figures}, below "
        return plan, stays + f"{threshold:g}x."
    chosen = alternative.plan
    decision = (
        f"Auto at training start: method {chosen.method} instead of {plan.method}: "
        f"{figures}, at least {threshold:g}x (the plan's alternative: "
        f"ZeRO-{chosen.zero_stage}, {chosen.memory.per_gpu_gib:.1f} GiB per GPU)."
    )
    switched = chosen.with_decision(
        Decision(key=METHOD_AT_START, value=chosen.method, sentence=decision)
    ).model_copy(update={"switched_from": plan.method})
    return switched, decision
