"""`FineTuneJob.status` as pydantic models, written by the operator through /status.

Every field is optional; `model_dump(by_alias=True, exclude_none=True)` gives the camelCase
object to patch. Unknown fields are ignored when reading (a newer operator may write more);
`plan` is the plan document (`kubetune.api.plan.PlanDocument`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError, ValidatorFunctionWrapHandler, field_validator

from kubetune.api._types import StatusModel
from kubetune.api.plan import PlanDocument

JobState = Literal[
    "Pending",
    "Planning",
    "Planned",
    "Blocked",
    "Queued",
    "Admitted",
    "Running",
    "Suspended",
    "Stopping",
    "Succeeded",
    "Failed",
]
ConditionStatus = Literal["True", "False", "Unknown"]

ConditionType = Literal[
    "Planned", "Admitted", "Running", "Suspended", "EarlyStopped", "Succeeded", "Failed"
]
CONDITION_TYPES: tuple[ConditionType, ...] = (
    "Planned",
    "Admitted",
    "Running",
    "Suspended",
    "EarlyStopped",
    "Succeeded",
    "Failed",
)

#: Condition reasons (CamelCase). docs/api.md says which condition each one goes with.
ConditionReason = Literal[
    "PlanReady",
    "PlanOnly",
    "InvalidSpec",
    "DoesNotFit",
    "DataError",
    "Training",
    "Suspended",
    "Completed",
    "NoImprovement",
    "Overfitting",
    "OverMemorization",
    "LossGapExceeded",
    "Diverged",
    "StopRequested",
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "PerplexityExceeded",
    "MemorizationExceeded",
    "ForgettingExceeded",
    "ModelConfigError",
    "ConfigError",
    "ChildConflict",
    "InputNotFound",
    "PodCreationFailed",
    "Preparing",
    "Starting",
    "Resumed",
    "EarlyStopped",
    # The Admitted condition (a queue: Kueue).
    "Queued",
    "Admitted",
    "Preempted",
    "Inadmissible",
    "QueueNotFound",
    "KueueNotInstalled",
]
#: The reasons of an EarlyStopped condition (and of status.earlyStop.reason).
EARLY_STOP_REASONS: tuple[ConditionReason, ...] = (
    "NoImprovement",
    "Overfitting",
    "OverMemorization",
    "LossGapExceeded",
    "PerplexityExceeded",
    "MemorizationExceeded",
    "ForgettingExceeded",
    "Diverged",
    "StopRequested",
)


def format_time(moment: datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp as Kubernetes writes them ("2025-01-31T12:00:00Z"); now by
    default. A naive datetime is taken to be UTC."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Condition(StatusModel):
    """One aspect of the job's state (metav1.Condition)."""

    type: str
    status: ConditionStatus
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Progress(StatusModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    #: step / totalSteps in percent, 0-100 (the PROGRESS printer column).
    percentage: float | None = None
    eta_seconds: int | None = None


class Metrics(StatusModel):
    train_loss: float | None = None
    eval_loss: float | None = None
    loss_gap: float | None = None
    eval_perplexity: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int | None = None
    eval_token_accuracy: float | None = None
    memorization_rate: float | None = None
    general_perplexity_ratio: float | None = None
    general_perplexity: float | None = None
    heldout_memorization_rate: float | None = None
    near_verbatim_rate: float | None = None
    data_perplexity: float | None = None
    high_perplexity_token_ratio: float | None = None


class QueueStatus(StatusModel):
    """Where a job with a queue (Kueue) stands: its LocalQueue, the Workload Kueue made for
    the training Job, the ClusterQueue that admitted it, the queue's pending count and, while
    it waits, its position."""

    name: str | None = None
    cluster_queue: str | None = None
    workload: str | None = None
    pending_workloads: int | None = None
    #: How many wait ahead of it (0: the next), from Kueue's visibility API while it waits.
    position_in_local_queue: int | None = None
    position_in_cluster_queue: int | None = None
    message: str | None = None


class RestartsStatus(StatusModel):
    """Gang restarts of a multi-node run (`kubetune.operator.gang`)."""

    count: int | None = None
    interruptions: int | None = None
    last_reason: str | None = None
    last_message: str | None = None
    last_time: str | None = None
    step_at_last_restart: int | None = None
    interruptions_without_progress: int | None = None


class EarlyStop(StatusModel):
    reason: str | None = None
    message: str | None = None


class FineTuneJobStatus(StatusModel):
    """FineTuneJob.status."""

    observed_generation: int | None = None
    state: JobState | None = None
    conditions: list[Condition] | None = None
    #: The plan document (`kubetune.api.plan`), as the planner made it and the trainer's
    #: decisions at training start updated it.
    plan: PlanDocument | None = None
    progress: Progress | None = None
    metrics: Metrics | None = None
    warnings: list[str] | None = None
    start_time: str | None = None
    completion_time: str | None = None
    training_job_name: str | None = None
    restarts: RestartsStatus | None = None
    early_stop: EarlyStop | None = None
    queue: QueueStatus | None = None

    @field_validator("plan", mode="wrap")
    @classmethod
    def _readable_plan(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A status.plan this version cannot read (written by an older operator, or by hand)
        reads as no plan instead of failing the whole object: the operator plans again."""
        try:
            return handler(value)
        except ValidationError:
            return None

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if there is one."""
        return next((c for c in self.conditions or [] if c.type == type_), None)

    def to_manifest(self) -> dict[str, Any]:
        """The status as a camelCase object for a /status patch (unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)
