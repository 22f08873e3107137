"""`FineTuneJob.status` as pydantic models, written by the operator through /status.

Every field is optional; `model_dump(by_alias=True, exclude_none=True)` gives the camelCase
object to patch. Unknown fields are ignored when reading (a newer operator may write more);
`plan.hyperparameters` keeps them, like the CRD's x-kubernetes-preserve-unknown-fields.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from kubetune.api._types import StatusModel

JobState = Literal[
    "Pending",
    "Planning",
    "Planned",
    "Blocked",
    "Running",
    "Suspended",
    "Stopping",
    "Succeeded",
    "Failed",
]
ConditionStatus = Literal["True", "False", "Unknown"]
ResolvedMethod = Literal["Full", "Partial", "LoRA", "Prefix"]

ConditionType = Literal["Planned", "Running", "Suspended", "EarlyStopped", "Succeeded", "Failed"]
CONDITION_TYPES: tuple[ConditionType, ...] = (
    "Planned",
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
    "ModelConfigError",
    "ConfigError",
    "ChildConflict",
    "InputNotFound",
    "PodCreationFailed",
    "Preparing",
    "Starting",
    "Resumed",
    "EarlyStopped",
]
#: The reasons of an EarlyStopped condition (and of status.earlyStop.reason).
EARLY_STOP_REASONS: tuple[ConditionReason, ...] = (
    "NoImprovement",
    "Overfitting",
    "OverMemorization",
    "LossGapExceeded",
    "PerplexityExceeded",
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


class PlanModel(StatusModel):
    name: str | None = None
    family: str | None = None


class PlanMemory(StatusModel):
    """Per-GPU memory estimate in GiB."""

    per_gpu_gib: float | None = Field(default=None, alias="perGpuGiB")
    model_states_gib: float | None = Field(default=None, alias="modelStatesGiB")
    activations_gib: float | None = Field(default=None, alias="activationsGiB")
    overhead_gib: float | None = Field(default=None, alias="overheadGiB")
    gpu_memory_gib: float | None = Field(default=None, alias="gpuMemoryGiB")
    usable_gib: float | None = Field(default=None, alias="usableGiB")
    cpu_per_node_gib: float | None = Field(default=None, alias="cpuPerNodeGiB")
    cpu_memory_gib: float | None = Field(default=None, alias="cpuMemoryGiB")


class PlanHyperparameters(StatusModel):
    """The resolved hyperparameters; unknown keys are kept (newer planners add some)."""

    model_config = ConfigDict(extra="allow")

    learning_rate: float | None = None
    epochs: float | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    eval_steps: int | None = None
    weight_decay: float | None = None
    dropout: float | None = None
    max_grad_norm: float | None = None
    sequence_length: int | None = None
    gradient_checkpointing: bool | None = None
    lr_scheduler: str | None = None
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_target_modules: list[str] | None = None
    prefix_tokens: int | None = None
    trainable_layers: int | None = None


class PlanStatus(StatusModel):
    """status.plan: what will be trained and how, and why (reasons).

    `kubetune.planning.Plan.to_dict()` validates as this model as is.
    """

    method: ResolvedMethod | None = None
    fits: bool | None = None
    error: str | None = None
    reasons: list[str] | None = None
    warnings: list[str] | None = None
    zero_stage: int | None = None
    offload: str | None = None
    model: PlanModel | None = None
    num_nodes: int | None = None
    gpus_per_node: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    example_count: int | None = None
    token_count: int | None = None
    token_count_estimated: bool | None = None
    memory: PlanMemory | None = None
    hyperparameters: PlanHyperparameters | None = None
    alternative: dict[str, Any] | None = None
    cross_validation: dict[str, Any] | None = None
    remedies: dict[str, Any] | None = None
    switched_from: str | None = None


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


class EarlyStop(StatusModel):
    reason: str | None = None
    message: str | None = None


class FineTuneJobStatus(StatusModel):
    """FineTuneJob.status."""

    observed_generation: int | None = None
    state: JobState | None = None
    conditions: list[Condition] | None = None
    plan: PlanStatus | None = None
    progress: Progress | None = None
    metrics: Metrics | None = None
    warnings: list[str] | None = None
    start_time: str | None = None
    completion_time: str | None = None
    training_job_name: str | None = None
    early_stop: EarlyStop | None = None

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if there is one."""
        return next((c for c in self.conditions or [] if c.type == type_), None)

    def to_manifest(self) -> dict[str, Any]:
        """The status as a camelCase object for a /status patch (unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)
