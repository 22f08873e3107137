"""The plan document: one typed model for what the planner decided, read by everyone.

The planner returns it, the operator writes it to `status.plan` and the `<job>-config`
ConfigMap (`plan.json`), the prepare pod sends it in its termination message, the CLI prints
it and the trainer trains from it; `PlanDocument.model_validate(data)` reads any of them and
`to_json()` writes the camelCase JSON they all hold.

Each decision is structured (`Decision`: a key, a value, a sentence with its numbers), so an
alternative plan or a switch at training start replaces a decision by its key; `reasons`
(the sentences in order) is derived from the decisions. Steps are computed in one place
(`kubetune.planning.hyperparameters.training_steps`), never here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

ResolvedMethod = Literal["Full", "Partial", "LoRA", "QLoRA", "Prefix"]
RemedyState = Literal["On", "Off", "Auto"]
DataFormat = Literal["PromptCompletion", "Chat", "Text"]
#: The remedies every plan carries, in the order its reasons give them.
REMEDY_NAMES = ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning", "sam", "selfRewrite")

#: A section the CRD keeps without a schema (x-kubernetes-preserve-unknown-fields).
Schemaless = WithJsonSchema({"type": "object", "additionalProperties": True})


class PlanSection(BaseModel):
    """camelCase on the wire; unknown fields ignored (a newer planner may add some)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _without_none(section: BaseModel, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
    data: dict[str, Any] = handler(section)
    return {k: v for k, v in data.items() if v is not None}


class ModelIdentity(PlanSection):
    name: str | None = None
    family: str | None = None


class MemoryPlan(PlanSection):
    """The per-GPU (and per-node host) memory estimate, in GiB."""

    per_gpu_gib: float = Field(alias="perGpuGiB")
    model_states_gib: float = Field(alias="modelStatesGiB")
    activations_gib: float = Field(alias="activationsGiB")
    overhead_gib: float = Field(alias="overheadGiB")
    gpu_memory_gib: float = Field(alias="gpuMemoryGiB")
    usable_gib: float = Field(alias="usableGiB")
    cpu_per_node_gib: float = Field(alias="cpuPerNodeGiB")
    cpu_memory_gib: float | None = Field(default=None, alias="cpuMemoryGiB")


class HyperparametersPlan(PlanSection):
    """The resolved hyperparameters; unknown keys are kept (newer planners add some)."""

    model_config = ConfigDict(extra="allow")

    learning_rate: float
    epochs: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_steps: int
    weight_decay: float
    dropout: float
    max_grad_norm: float
    sequence_length: int
    gradient_checkpointing: bool
    lr_scheduler: str
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_target_modules: list[str] | None = None
    lora_use_dora: bool | None = None
    quant_type: str | None = None
    double_quant: bool | None = None
    compute_dtype: str | None = None
    prefix_tokens: int | None = None
    trainable_layers: int | None = None


class RemedyPlan(PlanSection):
    """One remedy: the spec's mode and settings, and the planned state (Auto: decided at
    training start)."""

    mode: RemedyState
    state: RemedyState
    ratio: float | None = None
    trigger_ratio: float | None = None
    lambda_: float | None = Field(default=None, alias="lambda")
    fisher_tokens: int | None = None
    threshold: float | None = None
    weight: float | None = None
    rho: float | None = None
    min_overlap: float | None = None
    max_length_ratio: float | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(self, handler)


class RemediesPlan(PlanSection):
    """Every remedy's plan, and the previous output an incremental update continues from."""

    replay: RemedyPlan
    ewc: RemedyPlan
    low_perplexity_targets: RemedyPlan
    half_fine_tuning: RemedyPlan
    sam: RemedyPlan
    self_rewrite: RemedyPlan
    from_: str | None = Field(default=None, alias="from")

    def get(self, name: str) -> RemedyPlan:
        """A remedy by its camelCase name (`REMEDY_NAMES`)."""
        remedy: RemedyPlan = getattr(self, _SNAKE[name])
        return remedy

    def states(self) -> dict[str, RemedyState]:
        return {name: self.get(name).state for name in REMEDY_NAMES}

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(self, handler)


_SNAKE = {
    "replay": "replay",
    "ewc": "ewc",
    "lowPerplexityTargets": "low_perplexity_targets",
    "halfFineTuning": "half_fine_tuning",
    "sam": "sam",
    "selfRewrite": "self_rewrite",
}


class CrossValidationPlan(PlanSection):
    folds: int
    max_epochs: int


class Decision(PlanSection):
    """One decision of the plan: what it is about (`key`), what was chosen (`value`, as text,
    when there is one) and the sentence that says so with its numbers."""

    key: str
    sentence: str
    value: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(self, handler)


#: The keys of the decisions the trainer takes at training start (the same in its plan.json
#: and, through GET /decisions or its termination message, in status.plan).
METHOD_AT_START = "method.atTrainingStart"
EPOCHS_AT_START = "epochs.atTrainingStart"
STEPS_AT_START = "steps.atTrainingStart"
_KEY_BY_KIND = {"method": METHOD_AT_START, "epochs": EPOCHS_AT_START, "steps": STEPS_AT_START}
#: Where a decision taken at training start goes among the planner's (after the decision with
#: this key), in plan.json and status.plan alike; the others go last.
DECISION_ANCHORS = {STEPS_AT_START: "batch"}


def trainer_decision_key(kind: str, name: str | None = None) -> str:
    """The decision key of one of the trainer's decisions (its `kind` and, for a remedy,
    its `name`): never one of the planner's keys (`auto.remedy.replay`, not `remedy.replay`)."""
    return _KEY_BY_KIND.get(kind) or ".".join(p for p in ("auto", kind, name) if p)


class AlternativeWhen(PlanSection):
    data_perplexity_ratio: float


class Alternative(PlanSection):
    """Method Auto: the plan the trainer switches to at training start when `when` holds."""

    when: AlternativeWhen
    plan: PlanDocument


def _packed(decision: Decision) -> list[str]:
    out = [decision.key, decision.sentence]
    return out if decision.value is None else [*out, decision.value]


def _unpacked(item: Any) -> Any:
    """A packed decision as its JSON object (anything else as it is, for validation)."""
    if isinstance(item, list) and len(item) in (2, 3):
        return dict(zip(("key", "sentence", "value"), item, strict=False))
    return item


#: What an alternative plan often shares with its plan (left out of a compact document).
_SHAREABLE = ("warnings", "remedies", "model", "exampleCount", "tokenCount", "datasetFormat")

#: Plan keys left out of the JSON when unset (the others are always there, `error` as null).
_OPTIONAL_KEYS = ("alternative", "crossValidation", "switchedFrom", "remedies", "datasetFormat")


class PlanDocument(PlanSection):
    """status.plan and plan.json: what will be trained, how, and why."""

    method: ResolvedMethod
    zero_stage: int
    offload: str
    trainable_parameters: int
    total_parameters: int
    fits: bool
    error: str | None = None
    model: ModelIdentity
    num_nodes: int
    gpus_per_node: int
    memory: MemoryPlan
    hyperparameters: HyperparametersPlan
    decisions: list[Decision]
    #: One sentence per decision, in order (set from `decisions`, never on its own).
    reasons: list[str]
    warnings: list[str]
    example_count: int
    token_count: int
    token_count_estimated: bool
    #: The format the planner read the training data in (spec.dataset.format, or detected
    #: when Auto), for people and tools reading status.plan.
    dataset_format: DataFormat | None = None
    remedies: Annotated[RemediesPlan | None, Schemaless] = None
    alternative: Annotated[Alternative | None, Schemaless] = None
    cross_validation: Annotated[CrossValidationPlan | None, Schemaless] = None
    switched_from: ResolvedMethod | None = None

    @model_validator(mode="before")
    @classmethod
    def _reasons_from_decisions(cls, data: Any) -> Any:
        """`reasons` follows `decisions`; a document written before decisions were
        structured has its sentences only (each becomes a decision keyed "reason")."""
        if not isinstance(data, dict):
            return data
        decisions = data.get("decisions")
        if decisions is None:
            decisions = [{"key": "reason", "sentence": r} for r in data.get("reasons") or []]
        sentences = [
            d.sentence if isinstance(d, Decision) else d.get("sentence") for d in decisions
        ]
        return {**data, "decisions": decisions, "reasons": sentences}

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def model_on_one_device(self) -> bool:
        """The whole model sits on one device before training (no ZeRO-3, no offload), so
        the base model can be scored on it."""
        return self.zero_stage < 3 and self.offload == "None"

    # ---- decisions ----------------------------------------------------------------------
    def decision(self, key: str) -> Decision | None:
        return next((d for d in self.decisions if d.key == key), None)

    def with_decision(self, decision: Decision, after: str | None = None) -> PlanDocument:
        """The plan with `decision` replacing the one with its key, or inserted after the
        decision keyed `after` (appended when there is none)."""
        decisions = list(self.decisions)
        at = next((i for i, d in enumerate(decisions) if d.key == decision.key), None)
        if at is not None:
            decisions[at] = decision
        else:
            anchor = next((i for i, d in enumerate(decisions) if d.key == after), None)
            decisions.insert(len(decisions) if anchor is None else anchor + 1, decision)
        return self.with_decision_list(decisions)

    def with_decisions(self, extra: Iterable[Decision]) -> PlanDocument:
        """The plan with `extra` decisions after its own."""
        return self.with_decision_list([*self.decisions, *extra])

    def with_decision_list(self, decisions: list[Decision]) -> PlanDocument:
        """The plan with exactly these decisions (and their sentences as reasons)."""
        return self.model_copy(
            update={"decisions": decisions, "reasons": [d.sentence for d in decisions]}
        )

    # ---- the wire -----------------------------------------------------------------------
    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {
            k: v for k, v in data.items() if not (k in _OPTIONAL_KEYS and (v is None or v == []))
        }

    def to_json(self) -> dict[str, Any]:
        """The camelCase JSON-ready document (status.plan, plan.json)."""
        data: dict[str, Any] = self.model_dump(by_alias=True, mode="json")
        return data

    def to_compact_json(self) -> dict[str, Any]:
        """The document for the prepare pod's termination message, which the kubelet keeps to
        4 KiB: without what reading it recomputes (`reasons`), each decision as a list
        (`[key, sentence]` or `[key, sentence, value]`), and what the alternative shares with
        the plan left out of it (a shared decision as its index in the plan's decisions;
        warnings, remedies and the like named in `same`). `from_compact_json` reads it back."""
        data = self.to_json()
        data.pop("reasons", None)
        mine = [_packed(d) for d in self.decisions]
        data["decisions"] = mine
        if self.alternative is not None:
            alt = data["alternative"]["plan"]
            alt.pop("reasons", None)
            packed = [_packed(d) for d in self.alternative.plan.decisions]
            alt["decisions"] = [mine.index(d) if d in mine else d for d in packed]
            same = [k for k in _SHAREABLE if k in alt and alt[k] == data.get(k)]
            for key in same:
                del alt[key]
            data["alternative"]["same"] = same
        return data

    @classmethod
    def from_compact_json(cls, data: dict[str, Any]) -> PlanDocument:
        """A document written by `to_compact_json` (or `to_json`)."""
        mine = [_unpacked(d) for d in data.get("decisions") or []]
        data = {**data, "decisions": mine}
        alternative = data.get("alternative")
        if isinstance(alternative, dict) and isinstance(alternative.get("plan"), dict):
            alt = dict(alternative["plan"])
            alt["decisions"] = [
                mine[d] if isinstance(d, int) and 0 <= d < len(mine) else _unpacked(d)
                for d in alt.get("decisions") or []
            ]
            for key in alternative.get("same") or []:
                if key in _SHAREABLE and key in data:
                    alt[key] = data[key]
            data["alternative"] = {"when": alternative.get("when"), "plan": alt}
        return cls.model_validate(data)

    def to_short_json(self, keys: Iterable[str]) -> dict[str, Any]:
        """Only `keys` of the JSON document (a switch's plan in a short message)."""
        data = self.to_json()
        return {k: data.get(k) for k in keys}


Alternative.model_rebuild()
