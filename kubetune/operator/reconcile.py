"""One reconcile of one FineTuneJob: read it and its children, act, write status.

Idempotent and level-triggered: it is called on create/resume/update, on every event of
the training or prepare Job, and on a timer, and each call converges from whatever it
finds (so an operator restart at any point loses nothing and duplicates nothing).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kubetune import contract
from kubetune.contract import decode_prepare_message
from kubetune.operator import builders as b
from kubetune.operator import metrics
from kubetune.operator import status as st
from kubetune.operator.k8s import (
    ChildConflictError,
    ChildRejectedError,
    Kube,
)
from kubetune.operator.planstep import (
    PlanRequestError,
    build_plan,
    known_model_config,
    resolve_gpu_memory,
)
from kubetune.operator.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

EventSink = Callable[[dict[str, Any], str, str, str], None]  # body, type, reason, message

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(ns: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((ns, name), threading.Lock())


@dataclass
class StatusDraft:
    """The status being built in this reconcile, with the events its changes imply."""

    ref: b.JobRef
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

    def fail(self, reason: str, message: str) -> None:
        if st.is_true(self.conditions, "Running"):
            self.condition("Running", "False", reason, "training stopped")
        self.condition("Failed", "True", reason, message, event_type="Warning")
        self.new.setdefault("completionTime", st.now_iso())

    def changed(self) -> bool:
        return self.new != self.old


class Reconciler:
    def __init__(
        self, kube: Kube, settings: OperatorSettings, events: EventSink | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.emit = events or (lambda *_: None)
        # Last known state of every job this operator reconciled (for the jobs gauge).
        self.states: dict[tuple[str, str], str] = {}
        # Per job: failed live scrapes in a row, and when the next may be tried.
        self.scrape_backoff: dict[tuple[str, str], tuple[int, float]] = {}
        #: The Auto-decision count last read from each job's rank-0 pod (by its address).
        self.decisions_seen: dict[tuple[str, str, str], int] = {}

    def reconcile(self, namespace: str, name: str) -> str:
        """Reconcile one FineTuneJob; returns a short result label for metrics."""
        with _lock(namespace, name):
            ftj = self.kube.get_ftj(namespace, name)
            if ftj is None:
                self.states.pop((namespace, name), None)
                return "gone"
            return self._reconcile(ftj)

    def _reconcile(self, ftj: dict[str, Any]) -> str:
        from kubetune.api import SpecError, parse_job

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

    # ------------------------------------------------------------ phases
    def _advance(self, ref: b.JobRef, spec: Any, draft: StatusDraft) -> str:
        plan = draft.new.get("plan")
        if plan is None:
            plan = self._plan(ref, spec, draft)
            if plan is None:
                return "planning"
        if not plan.get("fits", False):
            draft.fail("DoesNotFit", plan.get("error") or "the plan does not fit in memory")
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

    def _plan(self, ref: b.JobRef, spec: Any, draft: StatusDraft) -> dict[str, Any] | None:
        """Plan in-process when the inputs can be read through the API, else via the
        prepare Job. Returns the plan once known."""
        from kubetune.data import DataError
        from kubetune.planning import ModelConfigError

        nodes = (
            self.kube.list_nodes()
            if int(spec.resources.gpus_per_node) > 0 and not (spec.resources.gpu_memory_gib)
            else []
        )
        gpu_memory = resolve_gpu_memory(spec, nodes, self.settings.default_gpu_memory_gib)
        try:
            inputs = self._inputs_via_api(ref, spec)
            if inputs is not None:
                plan = build_plan(
                    spec,
                    inputs["train"],
                    spec.dataset.uri,
                    inputs["model"],
                    spec.model.uri,
                    gpu_memory,
                    inputs.get("validation"),
                    spec.dataset.validation_uri or "",
                )
            else:
                from_pod = self._plan_via_pod(ref, spec, draft, gpu_memory[0])
                if from_pod is None:
                    return None
                plan = from_pod
        except (DataError, ModelConfigError, ValueError) as exc:
            reason = (
                "ModelConfigError"
                if isinstance(exc, ModelConfigError)
                else "InvalidSpec"
                if isinstance(exc, PlanRequestError)
                else "DataError"
            )
            draft.fail(reason, str(exc))
            return None
        except _InputMissingError as exc:
            if exc.reason == "InputNotFound":
                # Like a pod waiting for its ConfigMap: not fatal, retried every resync.
                before = st.get_condition(draft.conditions, "Planned") or {}
                draft.condition("Planned", "False", "InputNotFound", str(exc))
                if before.get("reason") != "InputNotFound":
                    draft.events.append(("Warning", "InputNotFound", str(exc)))
                return None
            draft.fail(exc.reason, str(exc))
            return None
        draft.new["plan"] = plan
        warnings = list(dict.fromkeys([*draft.new.get("warnings", []), *plan["warnings"]]))
        draft.new["warnings"] = warnings
        mem = plan.get("memory") or {}
        if plan.get("fits", False):
            draft.condition(
                "Planned",
                "True",
                "PlanReady",
                f"{plan['method']} with ZeRO-{plan['zeroStage']}, offload {plan['offload']}: "
                f"{mem.get('perGpuGiB', 0):.1f} GiB per GPU of {mem.get('gpuMemoryGiB', 0):.0f}",
            )
        else:
            draft.condition(
                "Planned", "False", "DoesNotFit", str(plan.get("error") or "the plan does not fit")
            )
        return plan

    def _inputs_via_api(self, ref: b.JobRef, spec: Any) -> dict[str, Any] | None:
        """Dataset (and validation set) from ConfigMaps and a model config we ship or that
        sits in a ConfigMap: everything needed to plan without a pod. None otherwise."""
        uris = [spec.dataset.uri] + (
            [spec.dataset.validation_uri] if spec.dataset.validation_uri else []
        )
        if not all(u.startswith("configmap://") for u in uris):
            return None
        model = known_model_config(spec.model.uri)
        if model is None and spec.model.uri.startswith("configmap://"):
            text = self._config_map_uri(ref, spec.model.uri, "spec.model.uri")
            try:
                model = json.loads(text)
            except ValueError as exc:
                raise _InputMissingError(
                    f"{spec.model.uri}: not valid JSON ({exc})", "ModelConfigError"
                ) from exc
        if model is None:
            return None
        out: dict[str, Any] = {
            "model": model,
            "train": self._config_map_uri(ref, spec.dataset.uri, "spec.dataset.uri"),
        }
        if spec.dataset.validation_uri:
            out["validation"] = self._config_map_uri(
                ref, spec.dataset.validation_uri, "spec.dataset.validationUri"
            )
        return out

    def _config_map_uri(self, ref: b.JobRef, uri: str, field_path: str) -> str | bytes:
        parsed = urlparse(uri)
        cm, key = parsed.netloc, parsed.path.lstrip("/")
        text = self.kube.config_map_key(ref.namespace, cm, key)
        if text is None:
            raise _InputMissingError(
                f"{field_path}: ConfigMap {ref.namespace}/{cm} has no key {key!r} (or does "
                "not exist); waiting for it: create it or fix the URI",
                "InputNotFound",
            )
        return text

    def _plan_via_pod(
        self, ref: b.JobRef, spec: Any, draft: StatusDraft, gpu_memory_gib: float
    ) -> dict[str, Any] | None:
        manifest = b.prepare_job(ref, spec, self.settings, gpu_memory_gib)
        job, created = self.kube.ensure(manifest)
        if created:
            draft.events.append(
                (
                    "Normal",
                    "Preparing",
                    f"started {manifest['metadata']['name']} to read the data "
                    "and the model config and plan",
                )
            )
        view = st.view_job(job)
        planned = st.get_condition(draft.conditions, "Planned") or {}
        if (
            view.failed_reason == "DeadlineExceeded"
            and planned.get("reason") == "PodCreationFailed"
        ):
            # Its deadline ran out while the API server refused the pod: say that, not DataError.
            raise _InputMissingError(
                f"{b.prepare_name(ref)} ran out of its deadline ({view.failed_message}) while "
                f"its pod was refused; the last refusal: {planned.get('message')}",
                "PodCreationFailed",
            )
        if view.failed_reason:
            message = self.kube.termination_message(ref.namespace, b.prepare_name(ref), None)
            try:
                result = decode_prepare_message(message or "")
            except ValueError:
                result = {}
            raise _InputMissingError(
                str(
                    result.get("error")
                    or message
                    or view.failed_message
                    or "the prepare step failed; see its pod's logs"
                ),
                str(result.get("reason") or "DataError"),
            )
        if not view.complete:
            blocked = self._pods_blocked(ref, job, view, 1)
            if blocked:
                self._say_blocked(draft, "Planned", blocked)
            elif planned.get("reason") == "PodCreationFailed" and (view.active or view.succeeded):
                draft.condition(
                    "Planned",
                    "False",
                    "Preparing",
                    f"{b.prepare_name(ref)} reads the data and the model config and plans",
                )
            return None
        message = self.kube.termination_message(ref.namespace, b.prepare_name(ref), None)
        if not message:
            raise _InputMissingError("the prepare step finished without writing a plan")
        result = decode_prepare_message(message)
        if "plan" not in result:
            raise _InputMissingError(str(result.get("error", "the prepare step wrote no plan")))
        plan: dict[str, Any] = result["plan"]
        return plan

    def _train(self, ref: b.JobRef, spec: Any, plan: dict[str, Any], draft: StatusDraft) -> str:
        name = b.train_name(ref)
        # The training Job is created last: once it exists (and is ours), the ConfigMap,
        # Secret and Service exist too, and a running job's reconcile needs one read
        # instead of four create attempts answered 409.
        job = self.kube.get_job(ref.namespace, name)
        owners = {
            o.get("uid") for o in ((job or {}).get("metadata") or {}).get("ownerReferences") or []
        }
        created = False
        if job is None or ref.uid not in owners:
            self.kube.ensure(b.config_map(ref, spec, plan, self.settings))
            self.kube.ensure(b.control_secret(ref, secrets.token_urlsafe(32)))
            self.kube.ensure(b.headless_service(ref, self.settings))
            job, created = self.kube.ensure(b.training_job(ref, spec, plan, self.settings))
        if created:
            draft.events.append(
                (
                    "Normal",
                    "Created",
                    f"created training Job {name} "
                    f"({spec.resources.num_nodes} node(s) x "
                    f"{spec.resources.gpus_per_node} GPU(s))",
                )
            )
        draft.new["trainingJobName"] = name
        view = st.view_job(job)
        applied = ((job.get("metadata") or {}).get("annotations") or {}).get(
            contract.SUSPEND_ANNOTATION
        )
        wanted = str(bool(spec.suspend)).lower()
        if view.exists and applied != wanted and not (view.complete or view.failed_reason):
            # spec.suspend changed since we last applied it: apply it (and remember it).
            self.kube.set_job_suspend(ref.namespace, name, bool(spec.suspend), wanted)
            view = st.ChildJobView(**{**view.__dict__, "suspended": bool(spec.suspend)})
        if view.start_time and "startTime" not in draft.new:
            draft.new["startTime"] = view.start_time
        running = view.active > 0 and not (view.complete or view.failed_reason)
        # Pods the API server refuses: the run cannot start (or rendezvous), so that is what
        # `Running` says, set once per reconcile, and there is nothing to ask to stop.
        blocked = self._pods_blocked(
            ref, job, view, int(spec.resources.num_nodes), bool(spec.stop_requested)
        )
        # Rank 0's address, looked up once for the stop request and the live metrics.
        ip = self.kube.pod0_ip(ref.namespace, name) if running else None
        if spec.stop_requested and not (view.complete or view.failed_reason or blocked):
            self._request_stop(ref, draft, ip)
        if ip:
            scraped = self._copy_live_metrics(ref, ip, draft)
            if scraped is not None:
                self._read_decisions(ip, draft, scraped)
            if scraped is not None and not (spec.stop_requested or blocked):
                self._apply_policy(ref, spec, draft, ip, scraped)
        termination = (
            self.kube.termination_message(ref.namespace, name)
            if view.complete or view.failed_reason
            else None
        )
        outcome = st.training_outcome(view, int(spec.resources.num_nodes), termination)
        for ctype, cstatus, reason, message in outcome.conditions:
            if blocked and ctype == "Running":
                continue
            if (
                ctype == "EarlyStopped"
                and cstatus == "True"
                and not st.is_true(draft.conditions, "EarlyStopped")
            ):
                metrics.EARLY_STOPS.labels(reason=reason).inc()
            if ctype == "Failed" and cstatus == "True":
                draft.fail(reason, message)
            else:
                draft.condition(ctype, cstatus, reason, message)
        if blocked:
            self._say_blocked(draft, "Running", blocked)
        elif (
            not outcome.finished
            and (st.get_condition(draft.conditions, "Running") or {}).get("reason")
            == "PodCreationFailed"
        ):
            # The refusal ended (a pod was created since) and no pod runs right now.
            draft.condition(
                "Running", "False", "Starting", f"{name}: the pods are being created or restarted"
            )
        if spec.stop_requested and not outcome.finished and not blocked:
            draft.condition(
                "Running",
                "True",
                "StopRequested",
                "spec.stopRequested is true: the trainer stops after this step",
            )
        if outcome.finished:
            for seen in [k for k in self.decisions_seen if k[:2] == (ref.namespace, ref.name)]:
                del self.decisions_seen[seen]
            draft.new["completionTime"] = view.completion_time or st.now_iso()
            if termination:
                self._absorb_final_report(termination, draft)
            return "finished"
        return "training"

    def _pods_blocked(
        self,
        ref: b.JobRef,
        job: dict[str, Any],
        view: st.ChildJobView,
        pods: int,
        stop_requested: bool = False,
    ) -> tuple[str, str] | None:
        """(reason, message) when an unfinished child Job has fewer pods than it needs
        (running or done) and the Job controller reports that the API server refuses them."""
        if view.suspended or view.complete or view.failed_reason:
            return None
        if view.active + view.succeeded >= pods:
            return None
        failure = self.kube.pod_creation_failure(ref.namespace, job)
        if not failure:
            return None
        name = str((job.get("metadata") or {}).get("name"))
        return st.pod_creation_blocked(name, failure, stop_requested)

    @staticmethod
    def _say_blocked(draft: StatusDraft, ctype: str, blocked: tuple[str, str]) -> None:
        """The condition (kept current) and one Warning Event each time pods become blocked."""
        before = st.get_condition(draft.old.get("conditions") or [], ctype) or {}
        draft.condition(ctype, "False", *blocked)
        if before.get("reason") != blocked[0]:
            draft.events.append(("Warning", *blocked))

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
        url = f"http://{ip}:{self.settings.trainer_metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
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
        url = f"http://{ip}:{self.settings.trainer_metrics_port}/decisions"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                decisions = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return
        self._record_decisions(decisions, draft)
        self.decisions_seen[key] = count

    @staticmethod
    def _record_decisions(decisions: Any, draft: StatusDraft) -> None:
        before = (draft.new.get("plan") or {}).get("method")
        plan, added = st.apply_decisions(draft.new.get("plan"), decisions)
        if plan is not None and added:
            draft.new["plan"] = plan
            for text in added:
                draft.events.append(("Normal", "AutoDecision", text))
            if plan.get("method") != before:
                mem = plan.get("memory") or {}
                draft.condition(
                    "Planned",
                    "True",
                    "PlanReady",
                    f"{plan['method']} with ZeRO-{plan.get('zeroStage')}, offload "
                    f"{plan.get('offload')}: {mem.get('perGpuGiB', 0):.1f} GiB per GPU of "
                    f"{mem.get('gpuMemoryGiB', 0):.0f} (Auto switched from {before} at "
                    "training start)",
                )

    def _apply_policy(
        self,
        ref: b.JobRef,
        spec: Any,
        draft: StatusDraft,
        ip: str,
        scraped: dict[str, float],
    ) -> None:
        """Run the early-stop policy on rank 0's evaluation history (GET /evaluations)
        and, on a stop decision, tell the trainer (POST /stop with the job's token)."""
        from kubetune.policy import StopSettings, decide

        if not scraped.get("kubetune_evaluations_total"):
            return
        url = f"http://{ip}:{self.settings.trainer_metrics_port}/evaluations"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                history = st.eval_points(json.loads(resp.read()))
        except (urllib.error.URLError, OSError, ValueError):
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

    def _send_stop(self, ref: b.JobRef, ip: str, reason: str, message: str) -> None:
        """POST /stop to rank 0 with the job's token (idempotent: repeated each reconcile
        until the trainer has stopped)."""
        token = self.kube.read_secret_key(ref.namespace, b.control_name(ref), "token")
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

    @staticmethod
    def _absorb_final_report(termination: str, draft: StatusDraft) -> None:
        try:
            data = json.loads(termination)
        except ValueError:
            return
        if isinstance(data, dict):
            for key in ("metrics", "progress"):
                if isinstance(data.get(key), dict):
                    draft.new[key] = data[key]
            if isinstance(data.get("earlyStop"), dict):
                draft.new["earlyStop"] = data["earlyStop"]
            if "decisions" in data:
                Reconciler._record_decisions(data["decisions"], draft)

    def _finished(self, ftj: dict[str, Any], ref: b.JobRef, draft: StatusDraft) -> str:
        """A finished job stays as it is; only ttlSecondsAfterFinished acts on it."""
        import datetime as dt

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

    # ------------------------------------------------------------ status
    def _write(self, ftj: dict[str, Any], ref: b.JobRef, draft: StatusDraft) -> None:
        conds = draft.conditions
        planning = not draft.new.get("plan") and not st.is_true(conds, "Failed")
        draft.new["state"] = st.state_of(conds, bool(draft.new.get("plan")), planning)
        draft.new["observedGeneration"] = ref.generation
        self.states[(ref.namespace, ref.name)] = draft.new["state"]
        if not draft.changed():
            return
        self.kube.patch_ftj_status(ref.namespace, ref.name, draft.new)
        for etype, reason, message in draft.events:
            self.emit(ftj, etype, reason, message)


class _InputMissingError(RuntimeError):
    """An input the plan needs cannot be read; the message says which and how to fix it."""

    def __init__(self, message: str, reason: str = "DataError") -> None:
        super().__init__(message)
        self.reason = reason
