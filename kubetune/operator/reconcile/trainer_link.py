"""What the operator reads from the trainer's rank 0 over HTTP while it runs (its live
figures, GET /metrics; Auto's decisions, GET /decisions; the evaluation history, GET
/evaluations) and the stop request it sends (POST /stop with the job's token)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from kubetune.api.plan import PlanDocument
from kubetune.operator import builders as b
from kubetune.operator import status as st
from kubetune.operator.reconcile.base import ReconcilerBase
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.policy import EvalPoint

log = logging.getLogger("kubetune.operator")

T = TypeVar("T")


def _decision_list(raw: bytes) -> list[Any]:
    """GET /decisions' body (anything but a list holds no decision)."""
    body = json.loads(raw)
    return body if isinstance(body, list) else []


class TrainerLink(ReconcilerBase):
    def _get(self, ip: str, path: str, parse: Callable[[bytes], T]) -> T | None:
        """GET `path` from rank 0 and parse the body; None when it cannot be read (yet)."""
        url = f"http://{ip}:{self.settings.trainer_metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return parse(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _copy_live_metrics(
        self, ref: b.JobRef, ip: str, draft: StatusDraft
    ) -> dict[str, float] | None:
        """Copy rank 0's current figures into status.metrics and status.progress, and
        return the scraped values (None when there was nothing to read: a trainer that is
        still starting has no endpoint yet). After a failed scrape the next ones wait
        longer (doubling from the sync interval up to 5 minutes)."""
        key = (ref.namespace, ref.name)
        failures, not_before = self.scrape_backoff.get(key, (0, 0.0))
        if time.monotonic() < not_before:
            return None
        text = self._get(ip, "/metrics", bytes.decode)
        if text is None:
            delay = min(self.settings.sync_interval_seconds * 2**failures, 300.0)
            self.scrape_backoff[key] = (failures + 1, time.monotonic() + delay)
            return None
        self.scrape_backoff.pop(key, None)
        values = st.scalar_samples(text)
        metrics, progress = st.status_from_metrics(values)
        if metrics:
            draft.new["metrics"] = {**(draft.new.get("metrics") or {}), **metrics}
        if progress:
            draft.new["progress"] = {**(draft.new.get("progress") or {}), **progress}
        warning = st.data_warning_from_metrics(values, draft.new.get("warnings") or [])
        if warning:
            draft.new["warnings"] = [*(draft.new.get("warnings") or []), warning]
            draft.events.append(("Warning", "HighDataPerplexity", warning))
        return values

    def _read_decisions(self, ip: str, draft: StatusDraft, scraped: dict[str, float]) -> None:
        """When rank 0 counts more Auto decisions than status.plan's reasons hold, read
        them (GET /decisions) into status.plan, with an Event each."""
        count = int(scraped.get("kubetune_auto_decisions_total") or 0)
        key = (draft.ref.namespace, draft.ref.name, ip)  # a restarted pod counts from 0
        if count == 0 or self.decisions_seen.get(key) == count:
            return
        decisions = self._get(ip, "/decisions", _decision_list)
        if decisions is None:
            return
        self._record_decisions(decisions, draft)
        self.decisions_seen[key] = count

    def _forget_decisions(self, ref: b.JobRef) -> None:
        """A finished job's pods count no more decisions."""
        for seen in [k for k in self.decisions_seen if k[:2] == (ref.namespace, ref.name)]:
            del self.decisions_seen[seen]

    @staticmethod
    def _record_decisions(decisions: Any, draft: StatusDraft) -> None:
        before = (draft.new.get("plan") or {}).get("method")
        plan, added = st.apply_decisions(draft.new.get("plan"), decisions)
        if plan is not None and added:
            draft.new["plan"] = plan
            for text in added:
                draft.events.append(("Normal", "AutoDecision", text))
            if plan.get("method") != before:
                note = f" (Auto switched from {before} at training start)"
                draft.plan_ready(PlanDocument.model_validate(plan), note)

    def _evaluations(self, ip: str) -> list[EvalPoint] | None:
        """Rank 0's evaluation history (GET /evaluations), or None when it cannot be read."""
        return self._get(ip, "/evaluations", lambda raw: st.eval_points(json.loads(raw)))

    def _send_stop(self, ref: b.JobRef, ip: str, reason: str, message: str) -> None:
        """POST /stop to rank 0 with the job's token (idempotent: repeated each reconcile
        until the trainer has stopped)."""
        token = self.kube.read_secret_key(ref.namespace, b.control_name(ref), b.CONTROL_TOKEN_KEY)
        if not token:
            return
        url = f"http://{ip}:{self.settings.trainer_metrics_port}/stop"
        req = urllib.request.Request(
            url,
            method="POST",
            data=json.dumps({"reason": reason, "message": message}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            log.info("stop request to %s not delivered yet (%s); will retry", url, exc)
