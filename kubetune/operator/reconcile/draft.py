"""The status one reconcile builds, with the Events its changes imply."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.operator import status as st
from kubetune.operator.builders import JobRef


@dataclass
class StatusDraft:
    """The status being built in this reconcile, with the events its changes imply."""

    ref: JobRef
    old: dict[str, Any]
    new: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.new = json.loads(json.dumps(self.old))
        self.new.setdefault("conditions", [])

    @property
    def conditions(self) -> list[dict[str, Any]]:
        conds: list[dict[str, Any]] = self.new["conditions"]
        return conds

    def condition(
        self, ctype: str, status: str, reason: str, message: str, event_type: str = "Normal"
    ) -> None:
        before = st.get_condition(self.conditions, ctype)
        self.new["conditions"] = st.set_condition(
            self.conditions, ctype, status, reason, message, self.ref.generation
        )
        if status == "True" and (
            before is None or before.get("status") != "True" or before.get("reason") != reason
        ):
            self.events.append((event_type, reason, f"{ctype}: {message}"))

    def transition(
        self, ctype: str, status: str, reason: str, message: str, event_type: str = "Normal"
    ) -> None:
        """Set a condition with one Event each time its status or reason changes (False
        ones too: a queue's Queued, Preempted and Inadmissible are news)."""
        before = st.get_condition(self.conditions, ctype) or {}
        self.new["conditions"] = st.set_condition(
            self.conditions, ctype, status, reason, message, self.ref.generation
        )
        if (before.get("status"), before.get("reason")) != (status, reason):
            self.events.append((event_type, reason, f"{ctype}: {message}"))

    def plan_ready(self, plan: PlanDocument, note: str = "") -> None:
        """Planned=True with the plan's method, ZeRO stage, offload and memory per GPU."""
        self.condition(
            "Planned",
            "True",
            "PlanReady",
            f"{plan.method} with ZeRO-{plan.zero_stage}, offload {plan.offload}: "
            f"{plan.memory.per_gpu_gib:.1f} GiB per GPU of {plan.memory.gpu_memory_gib:.0f}{note}",
        )

    def fail(self, reason: str, message: str) -> None:
        if st.is_true(self.conditions, "Running"):
            self.condition("Running", "False", reason, "training stopped")
        self.condition("Failed", "True", reason, message, event_type="Warning")
        self.new.setdefault("completionTime", st.now_iso())

    def say_blocked(self, ctype: str, blocked: tuple[str, str]) -> None:
        """`ctype`=False for pods the API server refuses (kept current), and one Warning
        Event each time they become blocked."""
        before = st.get_condition(self.old.get("conditions") or [], ctype) or {}
        self.condition(ctype, "False", *blocked)
        if before.get("reason") != blocked[0]:
            self.events.append(("Warning", *blocked))

    def changed(self) -> bool:
        return self.new != self.old
