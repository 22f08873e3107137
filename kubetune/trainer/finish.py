"""The finish phase's messages: what Auto decided at training start (GET /decisions, the
termination message, the report) and the termination message the operator reads."""

from __future__ import annotations

import json
import logging
from typing import Any

from kubetune.contract import SHORT_PLAN_KEYS, SWITCHED_PLAN_KEYS, TERMINATION_LIMIT_BYTES
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.setup import RunInputs

log = logging.getLogger("kubetune.trainer")


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
        (compact, ("output",)),  # a switch's plan without its long parts
        (compact, ("output", "warnings")),
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


def start_decisions(inputs: RunInputs, remedies: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """What Auto decided at training start, for GET /decisions, the termination message
    and the report: the method (when the plan had an alternative) and each Auto remedy."""

    out: list[dict[str, Any]] = []
    if inputs.decision:
        entry: dict[str, Any] = {"kind": "method", "step": 0, "text": inputs.decision}
        if inputs.plan.switched_from:
            entry["plan"] = inputs.plan.to_short_json(SWITCHED_PLAN_KEYS)
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
