"""`FineTuneJob.spec` as pydantic models: the same fields, defaults, ranges, enums and CEL
rules as crds/kubetune.dev_finetunejobs.yaml (the CRD is the source of truth; the field
descriptions live there: `kubectl explain finetunejob.spec`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune.api._types import (
    DATA_URI_PATTERN,
    DATA_URI_SCHEMES,
    DNS_NAME_PATTERN,
    ENDPOINT_URL_PATTERN,
    MODEL_URI_PATTERN,
    MODEL_URI_SCHEMES,
    OUTPUT_URI_PATTERN,
    OUTPUT_URI_SCHEMES,
    Int,
    Quantity,
    SpecModel,
    Str253,
    Str256,
    Str316,
    Str1024,
    Str4096,
    Uri,
    WholeFloat,
    ZeroStage,
    cel_error,
    check_uri,
)
from kubetune.contract import MAX_DATA_SOURCES

MethodType = Literal["Auto", "Full", "Partial", "LoRA", "QLoRA", "Prefix"]
DatasetFormat = Literal["Auto", "Text", "PromptCompletion", "Chat"]
GeneralTextSource = Literal["BaseModel", "Shipped"]
OverlongRows = Literal["Truncate", "Drop"]
FileFormat = Literal["Auto", "JSONL", "JSON", "CSV", "Parquet", "Text"]
OffloadType = Literal["Auto", "None", "Optimizer", "OptimizerAndParameters"]
RemedyMode = Literal["Auto", "On", "Off"]
TolerationOperator = Literal["Exists", "Equal"]
TolerationEffect = Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"]


# ---- model and data -------------------------------------------------------------------------


class SecretRef(SpecModel):
    name: Str253


class ModelSource(SpecModel):
    """spec.model: the base model."""

    uri: Uri
    revision: Str256 | None = None
    secret_ref: SecretRef | None = None
    from_: Uri | None = Field(default=None, alias="from")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value, "model.uri", MODEL_URI_PATTERN, MODEL_URI_SCHEMES)

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_uri(value, "model.from", OUTPUT_URI_PATTERN, OUTPUT_URI_SCHEMES)


class DatasetColumns(SpecModel):
    """spec.dataset.columns: which column holds each field kubetune trains on."""

    prompt: Str256 | None = None
    completion: Str256 | None = None
    messages: Str256 | None = None
    text: Str256 | None = None
    system: Str256 | None = None

    def mapping(self) -> dict[str, str]:
        """Role -> column, for the roles that are set."""
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if v}


class HubDataset(SpecModel):
    """spec.dataset.hub (and sources[i].hub): which part of an hf:// dataset repository."""

    config: Str256 | None = None
    split: Str256 = "train"
    revision: Str256 | None = None


class Deduplicate(SpecModel):
    """spec.dataset.deduplicate: duplicate removal before the validation split."""

    exact: bool = True
    near: bool = True
    threshold: Annotated[float, Field(ge=0.5, le=1)] = 0.9


MAX_SOURCES = MAX_DATA_SOURCES
Weight = Annotated[float, Field(gt=0, le=100)]


class DataSource(SpecModel):
    """spec.dataset.sources[i]: another training file mixed with dataset.uri."""

    uri: Uri
    weight: Weight = 1.0
    file_format: FileFormat = "Auto"
    columns: DatasetColumns | None = None
    hub: HubDataset | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value, "dataset.sources.uri", DATA_URI_PATTERN, DATA_URI_SCHEMES)


class Dataset(SpecModel):
    """spec.dataset: the training data."""

    uri: Uri
    validation_uri: Uri | None = None
    validation_split: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    format: DatasetFormat = "Auto"
    file_format: FileFormat = "Auto"
    columns: DatasetColumns | None = None
    weight: Weight = 1.0
    sources: Annotated[list[DataSource], Field(max_length=MAX_SOURCES)] | None = None
    general_text_uri: Uri | None = None
    general_text: GeneralTextSource = "BaseModel"
    max_seq_length: Annotated[int, Field(ge=16, le=131072), WholeFloat] | None = None
    overlong_rows: OverlongRows = "Truncate"
    hub: HubDataset | None = None
    deduplicate: Deduplicate = Field(default_factory=Deduplicate)

    @model_validator(mode="after")
    def _one_general_text(self) -> Self:
        if self.general_text_uri is not None and self.general_text == "Shipped":
            raise cel_error(
                "dataset: set generalTextUri or generalText: Shipped, not both",
                field_path="generalText",
            )
        return self

    @field_validator("uri", "validation_uri", "general_text_uri")
    @classmethod
    def _uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        label = "dataset." + to_camel(info.field_name or "")
        return check_uri(value, label, DATA_URI_PATTERN, DATA_URI_SCHEMES)


# ---- method ---------------------------------------------------------------------------------


class LoRA(SpecModel):
    rank: Annotated[int, Field(ge=1, le=1024), WholeFloat] | None = None
    alpha: Annotated[int, Field(ge=1), WholeFloat] | None = None
    dropout: Annotated[float, Field(ge=0, le=0.9)] | None = None
    target_modules: Annotated[list[Str256], Field(max_length=64)] | None = None
    use_dora: bool | None = None


class Prefix(SpecModel):
    num_virtual_tokens: Annotated[int, Field(ge=1, le=1024), WholeFloat] | None = None


class Partial(SpecModel):
    trainable_layers: Annotated[int, Field(ge=1), WholeFloat] | None = None
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if self.trainable_layers is not None and self.fraction is not None:
            raise cel_error("method.partial: set trainableLayers or fraction, not both")
        return self


class Method(SpecModel):
    """spec.method: Auto, or an explicit method with optional settings."""

    type: MethodType = "Auto"
    lora: LoRA | None = None
    prefix: Prefix | None = None
    partial: Partial | None = None

    @model_validator(mode="after")
    def _settings_match_type(self) -> Self:
        for field, allowed in (
            ("lora", ("LoRA", "QLoRA")),
            ("prefix", ("Prefix",)),
            ("partial", ("Partial",)),
        ):
            if getattr(self, field) is not None and self.type not in (*allowed, "Auto"):
                raise cel_error(
                    f"method.{field} can only be set when method.type is "
                    f"{', '.join(allowed)} or Auto",
                    field_path=field,
                )
        return self


# ---- training -------------------------------------------------------------------------------


class CrossValidation(SpecModel):
    """hyperparameters.crossValidation: k-fold choice of the epoch count for tiny sets."""

    mode: RemedyMode = "Auto"
    folds: Annotated[int, Field(ge=2, le=10), WholeFloat] = 4


class Hyperparameters(SpecModel):
    """spec.hyperparameters: each unset value is planned."""

    learning_rate: Annotated[float, Field(gt=0, lt=1)] | None = None
    epochs: Annotated[float, Field(gt=0, le=100)] | None = None
    micro_batch_size: Annotated[int, Field(ge=1, le=512), WholeFloat] | None = None
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096), WholeFloat] | None = None
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] | None = None
    weight_decay: Annotated[float, Field(ge=0, le=1)] | None = None
    max_grad_norm: Annotated[float, Field(gt=0)] | None = None
    eval_steps: Annotated[int, Field(ge=1), WholeFloat] | None = None
    seed: Int = 42
    incremental: bool = False
    cross_validation: CrossValidation = Field(default_factory=CrossValidation)


class ResourceRequirements(SpecModel):
    """requests/limits of each training pod, as in a container's resources."""

    requests: Annotated[dict[str, Quantity], Field(max_length=16)] | None = None
    limits: Annotated[dict[str, Quantity], Field(max_length=16)] | None = None


class Resources(SpecModel):
    """spec.resources: numNodes pods with gpusPerNode GPUs each (or, on CPU,
    processesPerNode training processes each)."""

    num_nodes: Annotated[int, Field(ge=1, le=512), WholeFloat] = 1
    gpus_per_node: Annotated[int, Field(ge=0, le=16), WholeFloat] = 1
    processes_per_node: Annotated[int, Field(ge=1, le=64), WholeFloat] | None = None
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = Field(default=None, alias="gpuMemoryGiB")
    resources_per_node: ResourceRequirements | None = None

    @model_validator(mode="after")
    def _processes_on_cpu(self) -> Self:
        procs = self.processes_per_node
        if procs is not None and self.gpus_per_node > 0 and procs != self.gpus_per_node:
            raise cel_error(
                "resources: processesPerNode is for CPU runs (gpusPerNode 0); "
                "with GPUs a pod runs one process per GPU",
                field_path="processesPerNode",
            )
        return self

    @property
    def processes(self) -> int:
        """Training processes per pod: one per GPU, else processesPerNode (default 1)."""
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.processes_per_node or 1)


class DeepSpeed(SpecModel):
    zero_stage: ZeroStage = "Auto"
    offload: OffloadType = "Auto"


class MemorizationStop(SpecModel):
    """earlyStopping.memorization: stop when the training sample's memorisation rate
    exceeds the held-out baseline's by more than `margin` at `evaluations` probed
    evaluations in a row (reason MemorizationExceeded)."""

    enabled: bool = True
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.2
    evaluations: Annotated[int, Field(ge=1, le=100), WholeFloat] = 2


class ForgettingStop(SpecModel):
    """earlyStopping.forgetting: stop when the general-text perplexity ratio (now / base)
    exceeds `maxRatio` at `evaluations` probed evaluations in a row (ForgettingExceeded)."""

    enabled: bool = True
    max_ratio: Annotated[float, Field(gt=1, le=1000)] = 2.0
    evaluations: Annotated[int, Field(ge=1, le=100), WholeFloat] = 2


class EarlyStopping(SpecModel):
    enabled: bool = True
    patience: Annotated[int, Field(ge=1), WholeFloat] = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    max_loss_gap: Annotated[float, Field(gt=0)] | None = None
    max_eval_perplexity: Annotated[float, Field(gt=1)] | None = None
    over_memorization: bool = True
    memorization: MemorizationStop = Field(default_factory=MemorizationStop)
    forgetting: ForgettingStop = Field(default_factory=ForgettingStop)


class Diagnostics(SpecModel):
    """spec.diagnostics: the bounded probes run before training and at each evaluation."""

    enabled: bool = True
    memorization_samples: Annotated[int, Field(ge=0, le=1024), WholeFloat] = 32
    prefix_tokens: Annotated[int, Field(ge=1, le=512), WholeFloat] = 8
    continuation_tokens: Annotated[int, Field(ge=1, le=512), WholeFloat] = 16
    near_verbatim_distance: Annotated[float, Field(ge=0, le=1)] = 0.1
    token_budget: Annotated[int, Field(ge=0, le=1048576), WholeFloat] = 8192
    high_perplexity_threshold: Annotated[float, Field(gt=1)] = 100.0
    data_perplexity_warning_ratio: Annotated[float, Field(gt=1)] = 3.0
    max_overhead: Annotated[float, Field(gt=0, le=1)] = 0.05


class Replay(SpecModel):
    mode: RemedyMode = "Auto"
    ratio: Annotated[float, Field(gt=0, le=0.9)] = 0.25
    trigger_ratio: Annotated[float, Field(gt=1, le=100)] = 1.5


class EWC(SpecModel):
    mode: RemedyMode = "Auto"
    lambda_: Annotated[float, Field(gt=0)] = Field(default=5000.0, alias="lambda")
    fisher_tokens: Annotated[int, Field(ge=64, le=1048576), WholeFloat] = 4096


class LowPerplexityTargets(SpecModel):
    mode: RemedyMode = "Auto"
    threshold: Annotated[float, Field(gt=1)] = 1000.0
    weight: Annotated[float, Field(ge=0, lt=1)] = 0.0


class HalfFineTuning(SpecModel):
    mode: RemedyMode = "Auto"


class SAM(SpecModel):
    mode: RemedyMode = "Auto"
    rho: Annotated[float, Field(gt=0, le=1)] = 0.05


class SelfRewrite(SpecModel):
    mode: RemedyMode = "Auto"
    min_overlap: Annotated[float, Field(ge=0, le=1)] = 0.3
    max_length_ratio: Annotated[float, Field(ge=1, le=4)] = 1.5


class Remedies(SpecModel):
    """spec.remedies: what keeps the base model's knowledge (docs/remedies.md)."""

    replay: Replay = Field(default_factory=Replay)
    ewc: EWC = Field(default_factory=EWC)
    low_perplexity_targets: LowPerplexityTargets = Field(default_factory=LowPerplexityTargets)
    half_fine_tuning: HalfFineTuning = Field(default_factory=HalfFineTuning)
    sam: SAM = Field(default_factory=SAM)
    self_rewrite: SelfRewrite = Field(default_factory=SelfRewrite)


class Augmentation(SpecModel):
    """spec.augmentation: more training rows for tiny sets, written by a model."""

    model_uri: Uri | None = None
    paraphrases: Annotated[int, Field(ge=0, le=8), WholeFloat] = 0
    back_translations: Annotated[int, Field(ge=0, le=8), WholeFloat] = 0
    pivot_language: Annotated[str, Field(min_length=1, max_length=256)] = "French"

    @field_validator("model_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("configmap://"):
            raise ValueError(
                "augmentation.modelUri: a ConfigMap key cannot hold a model directory; use "
                "hf://org/name, pvc://claim/path or file:///absolute/path"
            )
        return check_uri(value, "augmentation.modelUri", MODEL_URI_PATTERN, MODEL_URI_SCHEMES)


class Output(SpecModel):
    uri: Uri | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_uri(value, "output.uri", OUTPUT_URI_PATTERN, OUTPUT_URI_SCHEMES)


class S3Storage(SpecModel):
    """spec.storage.s3: how the pods and `kubetune` reach s3:// URIs."""

    credentials_secret: Str253 | None = None
    endpoint_url: Str1024 | None = None
    region: Str256 | None = None
    path_style: bool = True

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(ENDPOINT_URL_PATTERN, value):
            raise cel_error(
                "storage.s3.endpointUrl must be http://host[:port] or https://host[:port]"
            )
        return value


class ModelCache(SpecModel):
    """spec.storage.modelCache: a PVC the prepare step downloads the base model into once."""

    claim_name: Str253

    @field_validator("claim_name")
    @classmethod
    def _claim(cls, value: str) -> str:
        if not re.fullmatch(DNS_NAME_PATTERN, value):
            raise cel_error("storage.modelCache.claimName must be a PersistentVolumeClaim name")
        return value


class Storage(SpecModel):
    """spec.storage: object storage settings and the job's model cache."""

    s3: S3Storage | None = None
    model_cache: ModelCache | None = None


class Toleration(SpecModel):
    """A core/v1 Toleration."""

    key: Str316 | None = None
    operator: TolerationOperator | None = None
    value: Str256 | None = None
    effect: TolerationEffect | None = None
    toleration_seconds: Int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.operator == "Exists" and self.value:
            raise cel_error("toleration value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise cel_error("toleration tolerationSeconds requires effect NoExecute")
        return self


# ---- the spec -------------------------------------------------------------------------------

IMMUTABLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("dataset", "dataset"),
    ("method", "method"),
    ("resources", "resources"),
)


class FineTuneJobSpec(SpecModel):
    """FineTuneJob.spec."""

    model: ModelSource
    dataset: Dataset
    method: Method = Field(default_factory=Method)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    remedies: Remedies = Field(default_factory=Remedies)
    augmentation: Augmentation = Field(default_factory=Augmentation)
    output: Output | None = None
    storage: Storage | None = None
    image: Str1024 | None = None
    plan_only: bool = False
    suspend: bool = False
    stop_requested: bool = False
    active_deadline_seconds: Annotated[int, Field(ge=1), WholeFloat] | None = None
    backoff_limit: Annotated[int, Field(ge=0, le=100), WholeFloat] = 3
    ttl_seconds_after_finished: Annotated[int, Field(ge=0), WholeFloat] | None = None
    node_selector: Annotated[dict[str, Str256], Field(max_length=64)] | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    priority_class_name: Str253 | None = None
    labels: Annotated[dict[str, Str256], Field(max_length=64)] | None = None
    annotations: Annotated[dict[str, Str4096], Field(max_length=64)] | None = None
    service_account_name: Str253 | None = None

    @model_validator(mode="after")
    def _configmap_model_plans_only(self) -> Self:
        if self.model.uri.startswith("configmap://") and not self.plan_only:
            raise cel_error(
                "model.uri configmap:// holds only a config.json: it can be used with "
                "planOnly: true only",
                field_path="model.uri",
            )
        return self

    def to_manifest(self) -> dict[str, Any]:
        """The spec as the API server returns it: camelCase, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True)


def check_update(old: FineTuneJobSpec, new: FineTuneJobSpec) -> list[str]:
    """The CRD's transition rules: one message per immutable section that `new` changes."""
    errors = []
    for field, noun in IMMUTABLE_FIELDS:
        if getattr(old, field) != getattr(new, field):
            errors.append(
                f"spec.{field} is immutable: create a new FineTuneJob to change the {noun}"
            )
    return errors
