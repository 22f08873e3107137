"""Stopping a run before its last step: the early-stop policy the operator runs on rank 0's
evaluation history, and spec.stopRequested; both end in a POST /stop to rank 0."""

from __future__ import annotations

from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator import builders as b
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.operator.reconcile.trainer_link import TrainerLink
from kubetune.policy import StopSettings, decide


class StopControl(TrainerLink):
    def _apply_policy(
        self,
        ref: b.JobRef,
        spec: FineTuneJobSpec,
        draft: StatusDraft,
        ip: str,
        scraped: dict[str, float],
    ) -> None:
        """Run the early-stop policy on rank 0's evaluation history (GET /evaluations)
        and, on a stop decision, tell the trainer (POST /stop with the job's token)."""
        if not scraped.get("kubetune_evaluations_total"):
            return
        history = self._evaluations(ip)
        if history is None:
            return
        settings = StopSettings.from_spec(spec.early_stopping.model_dump(by_alias=True))
        decision = decide(history, settings)
        if not decision.stop:
            return
        draft.condition(
            "Running",
            "True",
            decision.reason,
            f"stopping early ({decision.reason}): {decision.message}",
        )
        self._send_stop(ref, ip, decision.reason, decision.message)

    def _request_stop(self, ref: b.JobRef, draft: StatusDraft, ip: str | None) -> None:
        """Ask rank 0 to stop after the current step (it keeps the best checkpoint)."""
        draft.condition(
            "Running",
            "True",
            "StopRequested",
            "spec.stopRequested is true: asking the trainer to stop",
        )
        if ip:
            self._send_stop(ref, ip, "StopRequested", "spec.stopRequested is true")
