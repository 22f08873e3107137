"""Pure status logic: conditions (Kubernetes API conventions), the state summary, and
what the training Job's status means for the FineTuneJob."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api.plan import DECISION_ANCHORS, Decision, PlanDocument, trainer_decision_key
from kubetune.api.status import CONDITION_TYPES as CONDITION_TYPES  # the status order
from kubetune.contract import SWITCHED_PLAN_KEYS
from kubetune.policy import EvalPoint

log = logging.getLogger("kubetune.operator")

TERMINAL = ("Succeeded", "Failed")


def now_iso(clock: dt.datetime | None = None) -> str:
    return (clock or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: list[dict[str, Any]], ctype: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == ctype), None)


def is_true(conditions: list[dict[str, Any]], ctype: str) -> bool:
    c = get_condition(conditions, ctype)
    return bool(c and c.get("status") == "True")


def set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    clock: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Return the conditions with one set; lastTransitionTime changes only when the status
    does (api-conventions)."""
    out = [dict(c) for c in conditions if c.get("type") != ctype]
    old = get_condition(conditions, ctype)
    changed = old is None or old.get("status") != status
    out.append(
        {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_iso(clock)
            if changed or old is None
            else old.get("lastTransitionTime", now_iso(clock)),
            "observedGeneration": generation,
        }
    )
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    out.sort(key=lambda c: order.get(c["type"], len(order)))
    return out


def state_of(conditions: list[dict[str, Any]], has_plan: bool, planning: bool) -> str:
    """One-word summary for printer columns (the conditions stay the source of truth)."""
    if is_true(conditions, "Failed"):
        return "Failed"
    if is_true(conditions, "Succeeded"):
        return "Succeeded"
    if is_true(conditions, "Suspended"):
        return "Suspended"
    if any(
        (get_condition(conditions, t) or {}).get("reason") == "PodCreationFailed"
        for t in ("Running", "Planned")
    ):
        return "Blocked"
    if is_true(conditions, "Running"):
        running = get_condition(conditions, "Running") or {}
        return "Stopping" if running.get("reason") == "StopRequested" else "Running"
    admitted = get_condition(conditions, "Admitted")
    if admitted is not None:
        return "Admitted" if admitted.get("status") == "True" else "Queued"
    if has_plan:
        return "Planned"
    return "Planning" if planning else "Pending"


@dataclass(frozen=True)
class ChildJobView:
    """What matters of a batch/v1 Job's status."""

    exists: bool
    suspended: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_reason: str | None = None
    failed_message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None


def view_job(job: dict[str, Any] | None) -> ChildJobView:
    if job is None:
        return ChildJobView(exists=False)
    spec = job.get("spec") or {}
    st = job.get("status") or {}
    complete = False
    failed_reason = failed_message = None
    for c in st.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") == "Complete":
            complete = True
        elif c.get("type") == "Failed":
            failed_reason = c.get("reason") or "Failed"
            failed_message = c.get("message") or ""
    return ChildJobView(
        exists=True,
        suspended=bool(spec.get("suspend")),
        active=int(st.get("active") or 0),
        ready=int(st.get("ready") or 0),
        succeeded=int(st.get("succeeded") or 0),
        failed=int(st.get("failed") or 0),
        complete=complete,
        failed_reason=failed_reason,
        failed_message=failed_message,
        start_time=st.get("startTime"),
        completion_time=st.get("completionTime"),
    )


# Reasons the Job controller gives -> ours.
_JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded": "BackoffLimitExceeded",
    "DeadlineExceeded": "DeadlineExceeded",
    "PodFailurePolicy": "ConfigError",
    "FailedIndexes": "BackoffLimitExceeded",
    "MaxFailedIndexesExceeded": "BackoffLimitExceeded",
}


@dataclass(frozen=True)
class Outcome:
    """The condition changes one observation of the training Job implies."""

    conditions: list[tuple[str, str, str, str]]  # (type, status, reason, message)
    finished: bool = False


def training_outcome(
    view: ChildJobView, nodes: int, termination: str | None, queued: bool = False
) -> Outcome:
    """Map the training Job's state to conditions. `termination` is rank 0's termination
    message when the pod has ended (it may name an early stop). `queued`: a queue (Kueue)
    holds the Job, so its suspension is the queue's, not spec.suspend."""
    if view.failed_reason:
        reason = _JOB_FAILURE_REASONS.get(view.failed_reason, view.failed_reason)
        detail = view.failed_message or ""
        if reason == "ConfigError":
            detail = "the trainer exited with the configuration-error code: " + (
                termination or detail or "see the pod's termination message"
            )
        elif termination:
            detail = f"{detail}; rank 0 said: {termination[-1500:]}"
        return Outcome(
            conditions=[
                ("Running", "False", reason, "training stopped"),
                ("Failed", "True", reason, detail or reason),
            ],
            finished=True,
        )
    if view.complete:
        stop = _early_stop_from(termination)
        conds = [("Running", "False", "Completed", "training finished")]
        if stop and stop[0] == "Diverged":
            # A diverged run's weights are not worth keeping as a success.
            conds[0] = ("Running", "False", "Diverged", "training diverged")
            conds.append(("EarlyStopped", "True", "Diverged", stop[1]))
            conds.append(("Failed", "True", "Diverged", stop[1]))
        elif stop:
            conds.append(("EarlyStopped", "True", stop[0], stop[1]))
            conds.append(("Succeeded", "True", "EarlyStopped", stop[1]))
        else:
            conds.append(
                ("Succeeded", "True", "Completed", f"training finished on {nodes} node(s)")
            )
        return Outcome(conditions=conds, finished=True)
    if view.suspended and queued:
        return Outcome(
            conditions=[
                ("Suspended", "False", "Resumed", "not suspended"),
                ("Running", "False", "Queued", "the queue has not admitted the Job; no pods run"),
            ]
        )
    if view.suspended:
        return Outcome(
            conditions=[
                ("Suspended", "True", "Suspended", "spec.suspend is true; no pods run"),
                ("Running", "False", "Suspended", "suspended"),
            ]
        )
    if view.active > 0:
        return Outcome(
            conditions=[
                ("Suspended", "False", "Resumed", "not suspended"),
                (
                    "Running",
                    "True",
                    "Training",
                    f"{view.active} of {nodes} pod(s) active, {view.ready} ready",
                ),
            ]
        )
    return Outcome(conditions=[("Suspended", "False", "Resumed", "not suspended")])


def parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time of the API (`2024-05-06T07:08:09Z`), or None."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def current_creation_failure(
    events: list[tuple[dt.datetime, str]], floor: list[dt.datetime]
) -> str | None:
    """The newest FailedCreate message that still holds: not older than any time in `floor`
    (the Job's status.startTime, its Suspended condition's last transition, its pods'
    creation: a refusal from before a (re)start, a suspension or a new pod has ended)."""
    since = max(floor, default=None)
    current = [(t, m) for t, m in events if m and (since is None or t >= since)]
    return max(current, key=lambda e: e[0])[1] if current else None


#: The hostPath volumes a FineTuneJob's pods can have, by name (builders.storage_for).
_HOST_VOLUMES = {
    '"output-host"': "spec.output.uri (its default is a file:// URI)",
    '"previous-host"': "spec.model.from",
}


def pod_creation_blocked(
    job: str, event_message: str, stop_requested: bool = False
) -> tuple[str, str]:
    """(reason, message) for a Job whose pods the API server refuses, with what to do."""
    hint = "the Job controller keeps retrying and the run starts once the cause is fixed"
    text = event_message.lower()
    if "hostpath" in text and "podsecurity" in text:
        named = [f for volume, f in _HOST_VOLUMES.items() if volume in event_message]
        fields = " and ".join(named or _HOST_VOLUMES.values())
        hint = (
            "a file:// URI is mounted as a hostPath volume, which this namespace's Pod "
            f"Security level forbids: set {fields} to a pvc:// claim, then delete and "
            "re-create the FineTuneJob"
        )
    elif "podsecurity" in text:
        hint = "this namespace's Pod Security level refuses the pods; " + hint
    elif "exceeded quota" in text or "for quota:" in text:
        hint = "the namespace's ResourceQuota is used up: free some or raise it; " + hint
    if stop_requested:
        hint += (
            "; spec.stopRequested is true but the run cannot start, so there is nothing to "
            "stop: delete the FineTuneJob to give it up"
        )
    return "PodCreationFailed", f"Job {job} cannot create its pods: {event_message} ({hint})"


def _early_stop_from(termination: str | None) -> tuple[str, str] | None:
    """The trainer writes `{"earlyStop": {"reason": ..., "message": ...}}` when it stopped
    early; anything else means a normal finish."""
    import json

    if not termination:
        return None
    try:
        data = json.loads(termination)
    except ValueError:
        return None
    stop = data.get("earlyStop") if isinstance(data, dict) else None
    if isinstance(stop, dict) and stop.get("reason"):
        return str(stop["reason"]), str(stop.get("message", ""))
    return None


# Trainer gauges -> status fields.
_METRIC_FIELDS = {
    "kubetune_train_loss": "trainLoss",
    "kubetune_eval_loss": "evalLoss",
    "kubetune_loss_gap": "lossGap",
    "kubetune_eval_perplexity": "evalPerplexity",
    "kubetune_best_eval_loss": "bestEvalLoss",
    "kubetune_best_step": "bestStep",
    "kubetune_evals_since_best": "evalsSinceBest",
    "kubetune_eval_token_accuracy": "evalTokenAccuracy",
    "kubetune_memorization_rate:train:exact": "memorizationRate",
    "kubetune_memorization_rate:heldout:exact": "heldoutMemorizationRate",
    "kubetune_memorization_rate:train:near": "nearVerbatimRate",
    "kubetune_general_perplexity": "generalPerplexity",
    "kubetune_general_perplexity_ratio": "generalPerplexityRatio",
    "kubetune_data_perplexity_base": "dataPerplexity",
    "kubetune_data_high_perplexity_token_ratio": "highPerplexityTokenRatio",
}
_PROGRESS_FIELDS = {
    "kubetune_step": "step",
    "kubetune_total_steps": "totalSteps",
    "kubetune_epoch": "epoch",
    "kubetune_eta_seconds": "etaSeconds",
}
_INTEGERS = {"bestStep", "evalsSinceBest", "step", "totalSteps", "etaSeconds"}


def scalar_samples(text: str) -> dict[str, float]:
    """The label-free samples of a Prometheus exposition, by sample name, plus the
    memorisation gauges under flat names (`kubetune_memorization_rate:<split>:<match>`)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = float(sample.value)
            elif sample.name == "kubetune_memorization_rate":
                split, match = sample.labels.get("split"), sample.labels.get("match")
                values[f"kubetune_memorization_rate:{split}:{match}"] = float(sample.value)
    return values


def eval_points(rows: object) -> list[EvalPoint]:
    """The trainer's GET /evaluations body as policy input (malformed rows are skipped)."""
    out: list[EvalPoint] = []
    if not isinstance(rows, list):
        return out
    for r in rows:
        if not isinstance(r, dict):
            continue

        def opt(key: str, r: dict[str, Any] = r) -> float | None:
            return None if r.get(key) is None else float(r[key])

        try:
            out.append(
                EvalPoint(
                    step=int(r["step"]),
                    eval_loss=float(r["evalLoss"]),
                    train_loss=opt("trainLoss"),
                    eval_accuracy=opt("evalTokenAccuracy"),
                    memorization_train=opt("memorizationRate"),
                    memorization_heldout=opt("heldoutMemorizationRate"),
                    general_ratio=opt("generalPerplexityRatio"),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def data_warning_from_metrics(values: dict[str, float], existing: list[str]) -> str | None:
    """The status warning for training data that is unusually surprising for the base model
    (from the trainer's base-model perplexity gauges), unless already in `existing`."""
    from kubetune.diagnostics import DiagnosticsSettings

    data = values.get("kubetune_data_perplexity_base") or 0.0
    general = values.get("kubetune_general_perplexity_base") or 0.0
    ratio = DiagnosticsSettings().data_perplexity_warning_ratio
    if data <= 0 or general <= 0 or data / general <= ratio:
        return None
    if any(w.startswith("training data perplexity") for w in existing):
        return None
    high = values.get("kubetune_data_high_perplexity_token_ratio", 0.0)
    return (
        f"training data perplexity {data:.1f} under the base model is {data / general:.1f}x "
        f"its general-text perplexity {general:.1f} ({100 * high:.0f}% of target tokens are "
        "high-perplexity): the model must move far from what it knows, which raises "
        "forgetting and memorisation; rephrase responses in the model's own style"
    )


def apply_decisions(
    plan: dict[str, Any] | None, decisions: Any
) -> tuple[dict[str, Any] | None, list[str]]:
    """status.plan with the trainer's Auto decisions in it (GET /decisions or the
    termination message): each decision added once (keyed by its kind, its sentence in the
    reasons), a method switch's plan fields (or the steps of an epoch or row count) replacing
    the planned ones. Returns (the new plan, the sentences that are new: one Event each).
    Idempotent: a decision already in the plan is not applied again."""
    if not isinstance(plan, dict) or not isinstance(decisions, list):
        return plan, []
    try:
        document = PlanDocument.model_validate(plan)
    except ValidationError:
        log.warning("status.plan is not a plan document; the trainer's decisions are not added")
        return plan, []
    added: list[str] = []
    for d in decisions:
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            continue
        text = d["text"][:1000]
        if text in document.reasons:
            continue
        switched = d.get("plan")
        if isinstance(switched, dict):  # a method switch, an epoch count by the folds
            replaced = {k: switched[k] for k in SWITCHED_PLAN_KEYS if switched.get(k) is not None}
            try:
                document = PlanDocument.model_validate({**document.to_json(), **replaced})
            except ValidationError:
                log.warning("a decision's plan is not a plan's fields; kept the plan as it was")
        key = trainer_decision_key(str(d.get("kind") or "decision"), d.get("name"))
        decision = Decision(key=key, sentence=text)
        document = (
            document.with_decision(decision, after=DECISION_ANCHORS[key])
            if key in DECISION_ANCHORS
            else document.with_decisions([decision])
        )
        added.append(text)
    return document.to_json(), added


def status_from_metrics(
    values: dict[str, float],
) -> tuple[dict[str, float | int], dict[str, float | int]]:
    """status.metrics and status.progress from rank 0's scraped values (`scalar_samples`).
    Gauges the trainer has not set yet (still 0 before the first evaluation) are left out."""

    def pick(mapping: dict[str, str]) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for name, field_name in mapping.items():
            # Labelled gauges exist only once set, so their zeros are real.
            if name in values and (values[name] != 0 or ":" in name):
                v = values[name]
                out[field_name] = int(v) if field_name in _INTEGERS else round(v, 6)
        return out

    metrics, progress = pick(_METRIC_FIELDS), pick(_PROGRESS_FIELDS)
    if progress.get("step") is not None and progress.get("totalSteps"):
        progress["percentage"] = round(100.0 * progress["step"] / progress["totalSteps"], 1)
    return metrics, progress


def created_within(obj: dict[str, Any], seconds: float, clock: Any = None) -> bool:
    """Whether the object's creationTimestamp is less than `seconds` old (a timestamp in
    the future, a skewed clock, counts as young; none or an unreadable one as old)."""
    try:
        made = parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    except ValueError:
        return False
    if made is None:
        return False
    now = clock() if clock is not None else dt.datetime.now(dt.UTC)
    return bool((now - made).total_seconds() < seconds)
