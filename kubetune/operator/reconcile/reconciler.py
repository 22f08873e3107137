"""One reconcile of one FineTuneJob: read it, run the phase it is in, write its status.

The phases are the reconciler's bases, one module each: the plan phase (`plan.py`), the
training phase (`train.py`) with stopping (`stopping.py`) and the HTTP link to the trainer
(`trainer_link.py`), all on what they share (`base.py`: the API as `kubeapi.KubeApi`, the
settings, what is remembered between reconciles). The status being built is a
`draft.StatusDraft`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from pydantic import ValidationError

from kubetune.api import SpecError, parse_job
from kubetune.api.plan import PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator import builders as b
from kubetune.operator import status as st
from kubetune.operator.k8s import ChildConflictError, ChildRejectedError
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.operator.reconcile.plan import PlanPhase
from kubetune.operator.reconcile.train import TrainPhase

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(ns: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((ns, name), threading.Lock())


log = logging.getLogger("kubetune.operator")


class Reconciler(PlanPhase, TrainPhase):
    def reconcile(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> str:
        """Reconcile one FineTuneJob; returns a short result label for metrics. `body` is
        the object as the event that created it carried it (no status yet): used instead of
        a read unless this process has written the job's status since (then it is stale)."""
        with _lock(namespace, name):
            fresh = body is not None and (namespace, name) not in self.written
            ftj = body if fresh else self.kube.get_ftj(namespace, name)
            if ftj is None:
                self.states.pop((namespace, name), None)
                self.written.discard((namespace, name))
                return "gone"
            return self._reconcile(ftj)

    def _reconcile(self, ftj: dict[str, Any]) -> str:
        meta = ftj["metadata"]
        if meta.get("deletionTimestamp"):
            return "deleting"
        ref = b.JobRef(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
        )
        draft = StatusDraft(ref=ref, old=ftj.get("status") or {})
        result = "ok"
        try:
            if any(st.is_true(draft.conditions, t) for t in st.TERMINAL):
                return self._finished(ftj, ref, draft)
            try:
                spec = parse_job(ftj).spec
            except SpecError as exc:
                draft.fail("InvalidSpec", str(exc))
                return "invalid"
            result = self._advance(ref, spec, draft)
        except ChildConflictError as exc:
            draft.fail("ChildConflict", str(exc))
            result = "conflict"
        except ChildRejectedError as exc:
            draft.fail("InvalidSpec", f"the API server refused a child object: {exc}")
            result = "invalid"
        finally:
            self._write(ftj, ref, draft)
        return result

    def _advance(self, ref: b.JobRef, spec: FineTuneJobSpec, draft: StatusDraft) -> str:
        plan = _stored_plan(draft)
        if plan is None:
            plan = self._plan(ref, spec, draft)
        if plan is None:
            return "planning"
        if not plan.fits:
            draft.fail("DoesNotFit", plan.error or "the plan does not fit in memory")
            return "failed"
        if spec.plan_only:
            draft.condition(
                "Succeeded",
                "True",
                "PlanOnly",
                "spec.planOnly is true: the plan is in status.plan; no GPU was used",
            )
            draft.new.setdefault("completionTime", st.now_iso())
            return "planned"
        return self._train(ref, spec, plan, draft)

    def _finished(self, ftj: dict[str, Any], ref: b.JobRef, draft: StatusDraft) -> str:
        """A finished job stays as it is; only ttlSecondsAfterFinished acts on it."""
        ttl = (ftj.get("spec") or {}).get("ttlSecondsAfterFinished")
        done = draft.new.get("completionTime")
        if ttl is not None and done:
            end = dt.datetime.fromisoformat(str(done).replace("Z", "+00:00"))
            if end.tzinfo is None:
                end = end.replace(tzinfo=dt.UTC)
            if (dt.datetime.now(dt.UTC) - end).total_seconds() >= int(ttl):
                self.kube.delete_ftj(ref.namespace, ref.name)
                return "expired"
        return "finished"

    def _write(self, ftj: dict[str, Any], ref: b.JobRef, draft: StatusDraft) -> None:
        """The one-word state and observedGeneration; the status and its Events written
        only when something changed."""
        conds = draft.conditions
        planning = not draft.new.get("plan") and not st.is_true(conds, "Failed")
        draft.new["state"] = st.state_of(conds, bool(draft.new.get("plan")), planning)
        draft.new["observedGeneration"] = ref.generation
        self.states[(ref.namespace, ref.name)] = draft.new["state"]
        if not draft.changed():
            return
        self.kube.patch_ftj_status(ref.namespace, ref.name, draft.new)
        self.written.add((ref.namespace, ref.name))
        for etype, reason, message in draft.events:
            self.emit(ftj, etype, reason, message)


def _stored_plan(draft: StatusDraft) -> PlanDocument | None:
    """status.plan as a plan document; an older operator's plan (no decisions) is written
    back in this version's form. None when there is none or it cannot be read (it is planned
    again, with a log line)."""
    stored = draft.new.get("plan")
    if not stored:
        return None
    try:
        plan = PlanDocument.model_validate(stored)
    except ValidationError as exc:
        log.warning("status.plan of %s cannot be read (%s); planning again", draft.ref.name, exc)
        draft.new.pop("plan", None)
        return None
    if "decisions" not in stored:  # the CRD now requires them (a write per version, not per call)
        draft.new["plan"] = plan.to_json()
    return plan
