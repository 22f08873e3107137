"""The FineTuneJob models: defaults, every validation naming its field path, YAML parsing,
the immutability check and the status models."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune.api import FineTuneJobSpec, SpecError, check_update, parse_job

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": base,
    }


def _error(data: Any) -> str:
    with pytest.raises(SpecError) as err:
        parse_job(data)
    return str(err.value)


# ---- defaults -------------------------------------------------------------------------------


def test_minimal_job_gets_every_default() -> None:
    spec = parse_job(_job()).spec
    assert spec.method.type == "Auto"
    assert spec.method.lora is None
    assert spec.dataset.validation_split == 0.1
    assert spec.dataset.format == "Auto"
    assert (spec.hyperparameters.seed, spec.hyperparameters.incremental) == (42, False)
    assert spec.hyperparameters.learning_rate is None
    assert (spec.resources.num_nodes, spec.resources.gpus_per_node) == (1, 1)
    assert spec.resources.gpu_memory_gib is None
    assert (spec.deepspeed.zero_stage, spec.deepspeed.offload) == ("Auto", "Auto")
    stopping = spec.early_stopping
    assert (stopping.enabled, stopping.patience, stopping.min_delta) == (True, 3, 0.0)
    assert stopping.over_memorization is True
    assert stopping.max_loss_gap is None
    assert (stopping.memorization.enabled, stopping.memorization.margin) == (True, 0.2)
    assert stopping.memorization.evaluations == 2
    assert (stopping.forgetting.enabled, stopping.forgetting.max_ratio) == (True, 2.0)
    assert stopping.forgetting.evaluations == 2
    assert (spec.dataset.general_text, spec.dataset.general_text_uri) == ("BaseModel", None)
    assert (spec.plan_only, spec.suspend, spec.stop_requested) == (False, False, False)
    assert spec.backoff_limit == 3
    assert spec.output is None


def test_manifest_is_camel_case_without_unset_fields() -> None:
    job = parse_job(_job(resources={"gpuMemoryGiB": 80, "numNodes": 2}))
    manifest = job.to_manifest()
    assert manifest["spec"]["resources"] == {"numNodes": 2, "gpusPerNode": 1, "gpuMemoryGiB": 80}
    assert manifest["spec"]["earlyStopping"]["overMemorization"] is True
    assert "output" not in manifest["spec"]
    assert "status" not in manifest
    assert parse_job(manifest) == job  # round trip


def test_python_names_work_too() -> None:
    spec = FineTuneJobSpec(
        model=api.ModelSource(uri="hf://gpt2"),
        dataset=api.Dataset(uri="file:///data/train.jsonl"),
        resources=api.Resources(num_nodes=2, gpus_per_node=8),
    )
    assert spec.to_manifest()["resources"] == {"numNodes": 2, "gpusPerNode": 8}


# ---- validation: one problem per case, the message names the path ---------------------------

INVALID: list[tuple[str, dict[str, Any], str]] = [
    # (case, spec overrides, expected "path: message" fragment)
    (
        "zero nodes",
        {"resources": {"numNodes": 0}},
        "spec.resources.numNodes: Input should be greater than or equal to 1",
    ),
    (
        "too many nodes",
        {"resources": {"numNodes": 513}},
        "spec.resources.numNodes: Input should be less than or equal to 512",
    ),
    (
        "gpus as string",
        {"resources": {"gpusPerNode": "2"}},
        "spec.resources.gpusPerNode: Input should be a valid integer",
    ),
    (
        "fractional nodes",
        {"resources": {"numNodes": 1.5}},
        "spec.resources.numNodes: Input should be a valid integer",
    ),
    ("bool for int", {"backoffLimit": True}, "spec.backoffLimit: Input should be a valid integer"),
    (
        "zero gpu memory",
        {"resources": {"gpuMemoryGiB": 0}},
        "spec.resources.gpuMemoryGiB: Input should be greater than 0",
    ),
    (
        "bad quantity",
        {"resources": {"resourcesPerNode": {"limits": {"memory": "64GB"}}}},
        "spec.resources.resourcesPerNode.limits.memory: must be a quantity",
    ),
    (
        "negative quantity",
        {"resources": {"resourcesPerNode": {"requests": {"cpu": -1}}}},
        "spec.resources.resourcesPerNode.requests.cpu: must be a quantity",
    ),
    (
        "unknown method",
        {"method": {"type": "DoRA"}},
        "spec.method.type: Input should be 'Auto', 'Full', 'Partial', 'LoRA', 'QLoRA' or 'Prefix'",
    ),
    (
        "lora with Full",
        {"method": {"type": "Full", "lora": {"rank": 8}}},
        "spec.method.lora: method.lora can only be set when method.type is LoRA, QLoRA or Auto",
    ),
    (
        "prefix with LoRA",
        {"method": {"type": "LoRA", "prefix": {}}},
        "spec.method.prefix: method.prefix can only be set when method.type is Prefix or Auto",
    ),
    (
        "partial with Prefix",
        {"method": {"type": "Prefix", "partial": {"fraction": 0.5}}},
        "spec.method.partial: method.partial can only be set when method.type is Partial or Auto",
    ),
    (
        "partial both",
        {"method": {"partial": {"fraction": 0.5, "trainableLayers": 4}}},
        "spec.method.partial: method.partial: set trainableLayers or fraction, not both",
    ),
    (
        "lora rank 0",
        {"method": {"lora": {"rank": 0}}},
        "spec.method.lora.rank: Input should be greater than or equal to 1",
    ),
    (
        "lora dropout",
        {"method": {"lora": {"dropout": 0.95}}},
        "spec.method.lora.dropout: Input should be less than or equal to 0.9",
    ),
    (
        "fraction 0",
        {"method": {"partial": {"fraction": 0}}},
        "spec.method.partial.fraction: Input should be greater than 0",
    ),
    (
        "zero stage 5",
        {"deepspeed": {"zeroStage": 5}},
        "spec.deepspeed.zeroStage: deepspeed.zeroStage must be Auto, 0, 1, 2 or 3",
    ),
    (
        "zero stage '2'",
        {"deepspeed": {"zeroStage": "2"}},
        "spec.deepspeed.zeroStage: deepspeed.zeroStage must be Auto, 0, 1, 2 or 3",
    ),
    (
        "zero stage bool",
        {"deepspeed": {"zeroStage": True}},
        "spec.deepspeed.zeroStage: Input should be an integer or a string",
    ),
    ("offload", {"deepspeed": {"offload": "CPU"}}, "spec.deepspeed.offload: Input should be"),
    (
        "lr 1",
        {"hyperparameters": {"learningRate": 1}},
        "spec.hyperparameters.learningRate: Input should be less than 1",
    ),
    (
        "epochs 0",
        {"hyperparameters": {"epochs": 0}},
        "spec.hyperparameters.epochs: Input should be greater than 0",
    ),
    (
        "warmup",
        {"hyperparameters": {"warmupRatio": 0.6}},
        "spec.hyperparameters.warmupRatio: Input should be less than or equal to 0.5",
    ),
    (
        "micro batch",
        {"hyperparameters": {"microBatchSize": 1024}},
        "spec.hyperparameters.microBatchSize: Input should be less than or equal to 512",
    ),
    (
        "patience 0",
        {"earlyStopping": {"patience": 0}},
        "spec.earlyStopping.patience: Input should be greater than or equal to 1",
    ),
    (
        "perplexity 1",
        {"earlyStopping": {"maxEvalPerplexity": 1}},
        "spec.earlyStopping.maxEvalPerplexity: Input should be greater than 1",
    ),
    (
        "memorization margin 1",
        {"earlyStopping": {"memorization": {"margin": 1}}},
        "spec.earlyStopping.memorization.margin: Input should be less than 1",
    ),
    (
        "forgetting ratio 1",
        {"earlyStopping": {"forgetting": {"maxRatio": 1}}},
        "spec.earlyStopping.forgetting.maxRatio: Input should be greater than 1",
    ),
    (
        "forgetting evaluations 0",
        {"earlyStopping": {"forgetting": {"evaluations": 0}}},
        "spec.earlyStopping.forgetting.evaluations: Input should be greater than or equal to 1",
    ),
    (
        "shipped general text and a uri",
        {
            "dataset": {
                "uri": "pvc://d/x",
                "generalTextUri": "pvc://d/general.txt",
                "generalText": "Shipped",
            }
        },
        "spec.dataset.generalText: dataset: set generalTextUri or generalText: Shipped, not both",
    ),
    (
        "processes per node with GPUs",
        {"resources": {"gpusPerNode": 8, "processesPerNode": 2}},
        "spec.resources.processesPerNode: resources: processesPerNode is for CPU runs "
        "(gpusPerNode 0); with GPUs a pod runs one process per GPU",
    ),
    (
        "general text source",
        {"dataset": {"uri": "pvc://d/x", "generalText": "English"}},
        "spec.dataset.generalText: Input should be 'BaseModel' or 'Shipped'",
    ),
    (
        "split 0",
        {"dataset": {"uri": "pvc://d/x", "validationSplit": 0}},
        "spec.dataset.validationSplit: Input should be greater than 0",
    ),
    (
        "format",
        {"dataset": {"uri": "pvc://d/x", "format": "CSV"}},
        "spec.dataset.format: Input should be 'Auto', 'Text', 'PromptCompletion' or 'Chat'",
    ),
    (
        "seq 8",
        {"dataset": {"uri": "pvc://d/x", "maxSeqLength": 8}},
        "spec.dataset.maxSeqLength: Input should be greater than or equal to 16",
    ),
    (
        "model scheme",
        {"model": {"uri": "gs://bucket/model"}},
        "spec.model.uri: model.uri must be hf://org/name, pvc://claim/path, "
        "file:///absolute/path, configmap://name/key or s3://bucket/key",
    ),
    ("relative file", {"model": {"uri": "file://models/x"}}, "spec.model.uri: model.uri must be"),
    (
        "configmap model",
        {"model": {"uri": "configmap://cfg/config.json"}},
        "spec.model.uri: model.uri configmap:// holds only a config.json",
    ),
    (
        "data scheme",
        {"dataset": {"uri": "https://example.com/x.jsonl"}},
        "spec.dataset.uri: "
        "dataset.uri must be file:///absolute/path, pvc://claim/path, configmap://name/key, "
        "hf://datasets/org/name or s3://bucket/key",
    ),
    (
        "validation scheme",
        {"dataset": {"uri": "pvc://d/x", "validationUri": "gs://b/v"}},
        "spec.dataset.validationUri: dataset.validationUri must be",
    ),
    (
        "general scheme",
        {"dataset": {"uri": "pvc://d/x", "generalTextUri": "/tmp/x"}},
        "spec.dataset.generalTextUri: dataset.generalTextUri must be",
    ),
    (
        "output configmap",
        {"output": {"uri": "configmap://a/b"}},
        "spec.output.uri: output.uri must be pvc://claim/path, file:///absolute/path or "
        "s3://bucket/prefix",
    ),
    (
        "uri too long",
        {"output": {"uri": "file:///" + "x" * 2048}},
        "spec.output.uri: String should have at most 2048 characters",
    ),
    ("unknown field", {"gpus": 8}, "spec.gpus: Extra inputs are not permitted"),
    (
        "nested unknown field",
        {"method": {"type": "LoRA", "rank": 8}},
        "spec.method.rank: Extra inputs are not permitted",
    ),
    (
        "negative backoff",
        {"backoffLimit": -1},
        "spec.backoffLimit: Input should be greater than or equal to 0",
    ),
    (
        "deadline 0",
        {"activeDeadlineSeconds": 0},
        "spec.activeDeadlineSeconds: Input should be greater than or equal to 1",
    ),
    (
        "toleration Exists+value",
        {"tolerations": [{"operator": "Exists", "value": "x"}]},
        "spec.tolerations[0]: toleration value must be empty when operator is Exists",
    ),
    (
        "toleration seconds",
        {"tolerations": [{"key": "k", "tolerationSeconds": 5}]},
        "spec.tolerations[0]: toleration tolerationSeconds requires effect NoExecute",
    ),
    (
        "label value type",
        {"labels": {"kueue.x-k8s.io/queue-name": 1}},
        "spec.labels[kueue.x-k8s.io/queue-name]: Input should be a valid string",
    ),
    (
        "too many labels",
        {"labels": {f"l{i}": "v" for i in range(65)}},
        "spec.labels: Dictionary should have at most 64 items",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_spec_names_the_field(overrides: dict[str, Any], expected: str) -> None:
    message = _error(_job(**overrides))
    assert expected in message
    assert len(message.splitlines()) == 1, message


def test_missing_model_and_every_problem_reported() -> None:
    data = _job(resources={"numNodes": 0})
    del data["spec"]["model"]
    err = _error(data)
    assert "spec.model: Field required" in err
    assert "spec.resources.numNodes: Input should be greater than or equal to 1" in err


def test_wrong_kind_and_api_version() -> None:
    data = _job()
    data["apiVersion"] = "kubetune.dev/v1"
    assert "apiVersion: Input should be 'kubetune.dev/v1alpha1'" in _error(data)
    data = _job()
    data["kind"] = "Job"
    assert "kind: Input should be 'FineTuneJob'" in _error(data)


VALID: list[tuple[str, dict[str, Any]]] = [
    ("hf without org", {"model": {"uri": "hf://gpt2"}}),
    ("pvc model", {"model": {"uri": "pvc://models/llama"}}),
    ("pvc root", {"model": {"uri": "pvc://models"}}),
    ("file model", {"model": {"uri": "file:///models/llama"}}),
    (
        "configmap model plan-only",
        {"model": {"uri": "configmap://cfg/config.json"}, "planOnly": True},
    ),
    ("hf dataset", {"dataset": {"uri": "hf://tatsu-lab/alpaca"}}),
    ("configmap dataset", {"dataset": {"uri": "configmap://faq/train.jsonl"}}),
    ("lora with Auto", {"method": {"lora": {"rank": 8}}}),
    ("qlora with dora", {"method": {"type": "QLoRA", "lora": {"useDora": True}}}),
    ("partial fraction", {"method": {"type": "Partial", "partial": {"fraction": 1}}}),
    ("zero stage 0", {"deepspeed": {"zeroStage": 0}}),
    ("whole float int", {"resources": {"numNodes": 2.0}}),
    ("int for number", {"hyperparameters": {"epochs": 3, "learningRate": 0.0001}}),
    ("cpu job", {"resources": {"gpusPerNode": 0}}),
    (
        "quantities",
        {
            "resources": {
                "resourcesPerNode": {"requests": {"cpu": "500m", "memory": "1.5Gi", "x": 2}}
            }
        },
    ),
    (
        "toleration",
        {
            "tolerations": [
                {
                    "key": "k",
                    "operator": "Equal",
                    "value": "v",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                }
            ]
        },
    ),
    ("empty effect", {"tolerations": [{"operator": "Exists", "effect": ""}]}),
]


@pytest.mark.parametrize("overrides", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_spec(overrides: dict[str, Any]) -> None:
    parse_job(_job(**overrides))


def test_whole_floats_are_ints_but_not_int_or_string() -> None:
    # As the API server: an integer field takes 2.0 (and stores 2); an int-or-string field
    # does not (its CEL rule fails on a float).
    spec = parse_job(_job(resources={"numNodes": 2.0})).spec
    assert spec.resources.num_nodes == 2
    assert isinstance(spec.resources.num_nodes, int)
    assert "spec.deepspeed.zeroStage: Input should be an integer or a string" in _error(
        _job(deepspeed={"zeroStage": 3.0})
    )
    assert "requests.cpu: Input should be an integer or a string" in _error(
        _job(resources={"resourcesPerNode": {"requests": {"cpu": 4.0}}})
    )


# ---- YAML -----------------------------------------------------------------------------------

YAML_JOB = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: t
spec:
  model: {uri: hf://gpt2}
  dataset: {uri: pvc://data/train.jsonl}
  hyperparameters:
    learningRate: 1e-4
    weightDecay: 1.0e-2
"""


def test_yaml_numbers_read_as_kubectl_sends_them() -> None:
    # PyYAML alone (YAML 1.1) reads 1e-4 as a string; kubectl reads a float.
    hp = parse_job(YAML_JOB).spec.hyperparameters
    assert hp.learning_rate == pytest.approx(1e-4)
    assert hp.weight_decay == pytest.approx(0.01)
    # kubectl sends a whole float as an integer, so 3.0 is a valid ZeRO stage in YAML.
    spec = parse_job(YAML_JOB + "  deepspeed: {zeroStage: 3.0}\n").spec
    assert spec.deepspeed.zero_stage == 3
    assert api.load_yaml_documents("a: 2.5\nb: 1e3\nc: .5\nd: '1e3'\n---\n---\nx: 1\n") == [
        {"a": 2.5, "b": 1000, "c": 0.5, "d": "1e3"},
        {"x": 1},
    ]


def test_yaml_file_error_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(YAML_JOB + "  resources: {numNodes: 0}\n")
    with pytest.raises(SpecError) as err:
        api.job_from_yaml_file(path)
    assert str(err.value) == (
        f"{path}: spec.resources.numNodes: Input should be greater than or equal to 1"
    )
    assert err.value.source == str(path)
    assert err.value.problems == [
        ("spec.resources.numNodes", "Input should be greater than or equal to 1")
    ]
    with pytest.raises(SpecError, match=r"bad\.yaml: spec\.resources\.numNodes"):
        parse_job(path)  # a Path is a file


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: not valid YAML"):
        api.job_from_yaml_file(path)
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read"):
        api.job_from_yaml_file(tmp_path / "missing.yaml")


def test_multi_document_file_takes_the_one_finetunejob(tmp_path: Path) -> None:
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\ndata: {a: b}\n"
    path = tmp_path / "two.yaml"
    path.write_text(configmap + "---\n" + YAML_JOB)
    assert api.job_from_yaml_file(path).name == "t"
    path.write_text(configmap)
    with pytest.raises(
        SpecError,
        match=r"expected one FineTuneJob document, found no Fine.*"
        r"\(kinds: ConfigMap\)",
    ):
        api.job_from_yaml_file(path)
    path.write_text(YAML_JOB.replace("kind: FineTuneJob", "kind: FinetuneJob"))
    with pytest.raises(SpecError, match="kind: Input should be 'FineTuneJob'"):
        api.job_from_yaml_file(path)
    path.write_text(YAML_JOB + "---\n" + YAML_JOB)
    with pytest.raises(SpecError, match="found 2 FineTuneJobs"):
        api.job_from_yaml_file(path)


def test_any_mapping_is_accepted() -> None:
    # A Kopf body is a read-only mapping view, not a dict.
    from types import MappingProxyType

    data = _job(tolerations=({"operator": "Exists"},))
    data["spec"] = MappingProxyType(data["spec"])
    job = parse_job(MappingProxyType(data))
    assert job.spec.tolerations == [api.Toleration(operator="Exists")]


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)
    with pytest.raises(TypeError):
        parse_job(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    job = api.job_from_yaml_file(path)
    assert job.name
    assert job.namespace is None  # applied into whatever namespace the user picks


# ---- immutability ---------------------------------------------------------------------------


def test_check_update_reports_each_immutable_section() -> None:
    old = parse_job(_job()).spec
    data = _job(
        model={"uri": "hf://gpt2"},
        dataset={"uri": "pvc://data/other.jsonl"},
        method={"type": "LoRA"},
        resources={"numNodes": 2},
    )
    assert check_update(old, parse_job(data).spec) == [
        "spec.model is immutable: create a new FineTuneJob to change the model",
        "spec.dataset is immutable: create a new FineTuneJob to change the dataset",
        "spec.method is immutable: create a new FineTuneJob to change the method",
        "spec.resources is immutable: create a new FineTuneJob to change the resources",
    ]


def test_check_update_allows_the_mutable_fields() -> None:
    old = parse_job(_job()).spec
    changed = _job(suspend=True, stopRequested=True, planOnly=True, labels={"a": "b"})
    changed["spec"]["hyperparameters"] = {"learningRate": 0.001}
    assert check_update(old, parse_job(changed).spec) == []
    # A default written out is not a change.
    explicit = _job(method={"type": "Auto"}, resources={"numNodes": 1, "gpusPerNode": 1})
    assert check_update(old, parse_job(explicit).spec) == []


def test_check_update_sees_nested_changes() -> None:
    old = parse_job(_job(resources={"resourcesPerNode": {"requests": {"cpu": 4}}})).spec
    new = parse_job(_job(resources={"resourcesPerNode": {"requests": {"cpu": "4"}}})).spec
    # 4 and "4" are different JSON values, as for the API server's CEL `==`.
    assert len(check_update(old, new)) == 1


# ---- status ---------------------------------------------------------------------------------

PLANNER_DICT: dict[str, Any] = {
    # The shape of kubetune.planning.Plan.to_dict(), including its None values.
    "method": "LoRA",
    "zeroStage": 2,
    "offload": "None",
    "trainableParameters": 39_976_960,
    "totalParameters": 6_778_392_576,
    "fits": True,
    "error": None,
    "model": {"name": "Llama-2-7b-hf", "family": "llama"},
    "numNodes": 2,
    "gpusPerNode": 8,
    "memory": {
        "perGpuGiB": 31.2,
        "modelStatesGiB": 13.1,
        "activationsGiB": 16.4,
        "overheadGiB": 1.7,
        "gpuMemoryGiB": 79.6,
        "usableGiB": 71.6,
        "cpuPerNodeGiB": 0.0,
        "cpuMemoryGiB": None,
    },
    "hyperparameters": {
        "learningRate": 0.0002,
        "epochs": 3,
        "microBatchSize": 4,
        "gradientAccumulationSteps": 2,
        "effectiveBatchSize": 128,
        "stepsPerEpoch": 40,
        "totalSteps": 120,
        "warmupSteps": 6,
        "evalSteps": 10,
        "weightDecay": 0.03,
        "dropout": 0.15,
        "maxGradNorm": 1.0,
        "sequenceLength": 512,
        "gradientCheckpointing": False,
        "lrScheduler": "cosine",
        "loraRank": 16,
        "loraTargetModules": ["q_proj", "v_proj"],
        "prefixTokens": None,
        "aNewKnob": 1.5,
    },
    "reasons": ["800 examples: LoRA rank 8"],
    "warnings": [],
    "exampleCount": 800,
    "tokenCount": 240_000,
    "tokenCountEstimated": False,
}


def test_status_takes_a_planner_dict_and_dumps_it_back() -> None:
    status = api.FineTuneJobStatus.model_validate({"plan": copy.deepcopy(PLANNER_DICT)})
    assert status.plan is not None
    assert status.plan.memory is not None
    assert status.plan.memory.per_gpu_gib == 31.2
    dumped = status.to_manifest()["plan"]
    expected = copy.deepcopy(PLANNER_DICT)
    del expected["error"], expected["memory"]["cpuMemoryGiB"]
    del expected["hyperparameters"]["prefixTokens"]
    # A plan from before decisions were structured: each sentence becomes a decision.
    expected["decisions"] = [{"key": "reason", "sentence": "800 examples: LoRA rank 8"}]
    assert dumped == expected  # unknown hyperparameters (aNewKnob) are kept


def test_status_conditions_and_progress() -> None:
    status = api.FineTuneJobStatus(
        state="Running",
        observed_generation=2,
        conditions=[
            api.Condition(
                type="Planned",
                status="True",
                reason="PlanReady",
                message="LoRA rank 8 fits in 31 GiB per GPU",
                last_transition_time=api.format_time(),
                observed_generation=2,
            ),
            api.Condition(type="Running", status="True", reason="Training"),
        ],
        progress=api.Progress(step=30, total_steps=120, epoch=0.75, percentage=25.0),
        metrics=api.Metrics(train_loss=1.2, eval_loss=1.4, loss_gap=0.2, eval_perplexity=4.06),
    )
    out = status.to_manifest()
    assert out["observedGeneration"] == 2
    assert out["conditions"][1] == {"type": "Running", "status": "True", "reason": "Training"}
    assert out["progress"] == {"step": 30, "totalSteps": 120, "epoch": 0.75, "percentage": 25.0}
    assert out["metrics"]["lossGap"] == 0.2
    planned = status.condition("Planned")
    assert planned is not None
    assert planned.reason == "PlanReady"
    assert status.condition("Failed") is None
    assert api.format_time(None).endswith("Z")


def test_status_ignores_unknown_fields_and_full_job_reads_status() -> None:
    data = _job()
    data["status"] = {"state": "Succeeded", "somethingNew": 1, "earlyStop": {"reason": "Diverged"}}
    job = parse_job(data)
    assert job.status is not None
    assert job.status.state == "Succeeded"
    assert job.status.early_stop == api.EarlyStop(reason="Diverged")


def test_format_time() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    moment = datetime(2025, 1, 31, 13, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert api.format_time(moment) == "2025-01-31T12:00:00Z"
    assert api.format_time(datetime(2025, 1, 31, 12, 0, 0)) == "2025-01-31T12:00:00Z"
    assert api.format_time(datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)) == "2025-01-31T12:00:00Z"


def test_condition_vocabulary() -> None:
    assert api.CONDITION_TYPES == (
        "Planned",
        "Admitted",
        "Running",
        "Suspended",
        "EarlyStopped",
        "Succeeded",
        "Failed",
    )
    assert "StopRequested" in api.EARLY_STOP_REASONS


def _doc_snippets() -> list[dict[str, Any]]:
    text = (EXAMPLES.parent / "docs" / "api.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    return [doc for block in blocks for doc in api.load_yaml_documents(block)]


def test_docs_yaml_snippets_are_valid_specs() -> None:
    snippets = _doc_snippets()
    assert len(snippets) >= 11
    for snippet in snippets:
        data = _job()
        data["spec"].update(snippet)
        parse_job(data)
