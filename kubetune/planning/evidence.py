"""Auto's evidence rule: the base model's perplexity on the training targets against its
perplexity on general text, measured at training start (by the trainer), decides the Auto
remedies and method Auto's switch to the plan's alternative. Pure: the measurement itself is
the trainer's (`kubetune.trainer.startup`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.planning.remedies import NAMES, RISK_RATIO

__all__ = ["RISK_RATIO", "Evidence", "resolve"]


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
