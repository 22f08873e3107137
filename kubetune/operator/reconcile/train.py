"""The training phase: create the training Job and its siblings once, apply spec.suspend,
follow the run (refused pods, live figures, Auto's decisions, stop requests and the
early-stop policy) and read its outcome and final report when it ends."""

from __future__ import annotations

import json
import secrets
from typing import Any

from kubetune import contract
from kubetune.api.plan import PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator import builders as b
from kubetune.operator import gang, metrics, queueing
from kubetune.operator import status as st
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.operator.reconcile.stopping import StopControl

#: A Job younger than this is not looked at for refused pods (see `_train`).
FRESH_JOB_SECONDS = 5.0


class TrainPhase(StopControl):
    def _train(
        self, ref: b.JobRef, spec: FineTuneJobSpec, plan: PlanDocument, draft: StatusDraft
    ) -> str:
        name = b.train_name(ref)
        # The training Job is created last: once it exists (and is ours), the ConfigMap,
        # Secret and Service exist too, and a running job's reconcile needs one read
        # instead of four create attempts answered 409.
        # A job whose status names no training Job yet has none (the status is written in
        # the reconcile that creates it): no read first. If that write was lost, the creates
        # below are answered 409 and read the objects back.
        job = self.kube.get_job(ref.namespace, name) if draft.old.get("trainingJobName") else None
        if job is not None and (job.get("metadata") or {}).get("deletionTimestamp"):
            # A gang restart: the previous attempt's pods are stopping (foreground deletion).
            draft.new["trainingJobName"] = name
            draft.condition(
                "Running",
                "False",
                "Restarting",
                f"{name}: the previous attempt's pods are stopping; all "
                f"{spec.resources.num_nodes} pod(s) then start again from the newest checkpoint",
            )
            return "training"
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
        failure: tuple[str, str] | None = None
        if view.failed_reason and view.failed_reason not in (
            "PodFailurePolicy",
            "DeadlineExceeded",
        ):
            decided = self._pods_failed(ref, spec, plan, job, draft)
            if decided is None:
                return "training"
            failure = decided or None
        applied = ((job.get("metadata") or {}).get("annotations") or {}).get(
            contract.SUSPEND_ANNOTATION
        )
        wanted = str(bool(spec.suspend)).lower()
        queue = queueing.queue_name(spec, self.settings.default_queue)
        finished = view.complete or view.failed_reason
        kueue = False
        if queue and view.exists and not finished:
            # Kueue suspends and starts the Job; spec.suspend goes to its Workload.
            # A running job already seen Admitted costs no read.
            if (
                view.suspended
                or view.active == 0
                or applied != wanted
                or not st.is_true(draft.conditions, "Admitted")
            ):
                kueue = self._follow_queue(ref, job, queue, spec, applied != wanted, draft)
            else:
                kueue = True
            if not kueue and view.suspended != bool(spec.suspend):
                # No Kueue: the Job (created suspended for the queue) follows spec.suspend.
                self.kube.set_job_suspend(ref.namespace, name, bool(spec.suspend), wanted)
                view = st.ChildJobView(**{**view.__dict__, "suspended": bool(spec.suspend)})
        elif view.exists and applied != wanted and not finished:
            # spec.suspend changed since we last applied it: apply it (and remember it).
            self.kube.set_job_suspend(ref.namespace, name, bool(spec.suspend), wanted)
            view = st.ChildJobView(**{**view.__dict__, "suspended": bool(spec.suspend)})
        if view.start_time and "startTime" not in draft.new:
            draft.new["startTime"] = view.start_time
        running = view.active > 0 and not (view.complete or view.failed_reason)
        # Pods the API server refuses: the run cannot start (or rendezvous), so that is what
        # `Running` says, set once per reconcile, and there is nothing to ask to stop.
        # A Job created moments ago has had no pod refused yet (the Job controller has not
        # tried): no Events list for it; the next reconcile (its Job's events, the resync
        # round) looks.
        blocked = (
            None
            if created or st.created_within(job, FRESH_JOB_SECONDS)
            else self._pods_blocked(
                ref, job, view, int(spec.resources.num_nodes), bool(spec.stop_requested)
            )
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
        outcome = st.training_outcome(
            view,
            int(spec.resources.num_nodes),
            termination,
            queued=kueue and not spec.suspend,
        )
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
                draft.fail(*(failure or (reason, message)))
            else:
                draft.condition(ctype, cstatus, reason, message)
        if blocked:
            draft.say_blocked("Running", blocked)
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
            self._forget_decisions(ref)
            draft.new["completionTime"] = view.completion_time or st.now_iso()
            if termination:
                self._absorb_final_report(termination, draft)
            return "finished"
        return "training"

    def _pods_failed(
        self,
        ref: b.JobRef,
        spec: FineTuneJobSpec,
        plan: PlanDocument,
        job: dict[str, Any],
        draft: StatusDraft,
    ) -> tuple[str, str] | tuple[()] | None:
        """The training Job failed on a pod: None after restarting a multi-node gang (the
        Job is being deleted; the next reconcile creates it again), else the (reason,
        message) to fail with instead of the Job's own, or () to keep the Job's."""
        name = str(job["metadata"]["name"])
        ends = gang.pod_ends(self.kube.job_pods(ref.namespace, name))
        nodes = int(spec.resources.num_nodes)
        found = gang.gang_failure(ends)
        if found is None:
            if nodes == 1:
                return ()
            found = gang.deleted_gang()
        if found.kind == "oom":
            return "OOMKilled", gang.oom_message(
                found.pod,
                gang.memory_limit(job),
                plan.memory.cpu_per_node_gib,
            )
        if nodes == 1:
            return ()  # the Job retried its pod up to spec.backoffLimit already
        restarts = dict(draft.new.get("restarts") or {})
        # Rank 0's step as last read, against the step at the previous restart: an
        # interruption with no step between them adds to a bounded run of stalls.
        step = int((draft.new.get("progress") or {}).get("step") or 0)
        progressed = step > int(restarts.get("stepAtLastRestart", -1))
        stalled = 0 if progressed else int(restarts.get("interruptionsWithoutProgress") or 0)
        decision = gang.decide_restart(
            found,
            int(restarts.get("count") or 0),
            int(spec.backoff_limit),
            stalled + 1 if found.kind == "interrupted" else 0,
        )
        if not decision.restart:
            return decision.reason, decision.message
        key = "count" if decision.counted else "interruptions"
        restarts[key] = int(restarts.get(key) or 0) + 1
        restarts.update(
            lastReason=decision.reason,
            lastMessage=decision.message,
            lastTime=st.now_iso(),
            stepAtLastRestart=step,
            interruptionsWithoutProgress=0 if decision.counted else stalled + 1,
        )
        self.kube.delete_job(ref.namespace, name)
        draft.new["restarts"] = restarts
        draft.condition(
            "Running",
            "False",
            "Restarting",
            f"{decision.message}: restarting all {nodes} pods from the newest checkpoint",
        )
        draft.events.append(
            (
                "Warning" if decision.counted else "Normal",
                "GangRestart",
                f"{decision.message}; all {nodes} pods restart from the newest checkpoint"
                + (
                    f" (restart {restarts['count']} of spec.backoffLimit {spec.backoff_limit})"
                    if decision.counted
                    else " (an interruption: not counted against spec.backoffLimit)"
                ),
            )
        )
        return None

    def _follow_queue(
        self,
        ref: b.JobRef,
        job: dict[str, Any],
        queue: str,
        spec: FineTuneJobSpec,
        apply_suspend: bool,
        draft: StatusDraft,
    ) -> bool:
        """The Admitted condition and status.queue from the Workload Kueue made for the
        Job (one list by the Job's uid; while it waits, the LocalQueue and its pending
        Workloads from Kueue's visibility API for the position), and spec.suspend
        applied to the Workload's spec.active. False when Kueue is not installed."""
        meta = job.get("metadata") or {}
        name = str(meta.get("name"))
        workloads = self.kube.job_workloads(ref.namespace, str(meta.get("uid") or ""))
        workload = queueing.newest_workload(workloads or [])
        local_queue = None
        known = False
        admitted = (
            workload is not None
            and queueing.admission_of(queue, name, ref.namespace, workload).admitted
        )
        pending = None
        if workloads is not None and not admitted:
            local_queue = self.kube.get_local_queue(ref.namespace, queue)
            known = True
            if local_queue is not None and workload is not None:
                pending = self.kube.pending_workloads(ref.namespace, queue)
        admission = queueing.admission_of(
            queue,
            name,
            ref.namespace,
            workload,
            workload_api=workloads is not None,
            local_queue=local_queue,
            local_queue_known=known,
            pending=pending,
        )
        if apply_suspend and workload is not None:
            wanted = str(bool(spec.suspend)).lower()
            self.kube.set_workload_active(
                ref.namespace,
                str(workload["metadata"]["name"]),
                not spec.suspend,
                name,
                wanted,
            )
        draft.new["queue"] = admission.status()
        draft.transition(
            "Admitted",
            "True" if admission.admitted else "False",
            admission.reason,
            admission.message,
            "Warning" if admission.warning else "Normal",
        )
        return workloads is not None

    @classmethod
    def _absorb_final_report(cls, termination: str, draft: StatusDraft) -> None:
        """The trainer's termination message: its final figures, early stop and decisions."""
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
                cls._record_decisions(data["decisions"], draft)
