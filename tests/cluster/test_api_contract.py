"""The API contract: the real API server (with the CRD from crds/) and the pydantic models in
kubetune.api accept and reject the same manifests, for the same field and, for rejections,
with the expected validation or CEL message. Also: server defaults equal the model defaults,
immutability, the status subresource, `kubectl explain`, printer columns and the examples."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune import api
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ns(api_client: Any, crd_installed: str) -> Iterator[str]:
    """One namespace for this module's objects (dry runs create nothing)."""
    core = client.CoreV1Api(api_client)
    name = f"api-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name)


def _manifest(name: str = "job", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": "pvc://training-data/train.jsonl"},
    }
    base.update(spec)
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": base,
    }


@dataclass(frozen=True)
class ServerRejection:
    message: str
    paths: set[str]


def _norm_path(path: str) -> str:
    # The API server writes a map key as [key] in CEL errors and as .key in schema errors.
    return re.sub(r"\[([^\]0-9][^\]]*)\]", r".\1", path)


def _server_create(
    objects: Any, ns: str, body: dict[str, Any], dry_run: bool = True
) -> dict[str, Any] | ServerRejection:
    try:
        created: dict[str, Any] = objects.create_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            ns,
            api.PLURAL,
            body,
            dry_run="All" if dry_run else None,
            field_validation="Strict",
        )
    except ApiException as exc:
        if exc.status not in (400, 422):  # 400: strict decoding; 422: validation
            raise
        return _rejection(exc)
    return created


def _rejection(exc: ApiException) -> ServerRejection:
    status = json.loads(exc.body)
    message = str(status.get("message", ""))
    causes = (status.get("details") or {}).get("causes") or []
    paths = {_norm_path(c["field"]) for c in causes if c.get("field", "<nil>") != "<nil>"}
    paths |= {_norm_path(m) for m in re.findall(r'unknown field "([^"]+)"', message)}
    return ServerRejection(message, paths)


def _model_check(body: dict[str, Any]) -> api.SpecError | None:
    try:
        api.parse_job(copy.deepcopy(body))
    except api.SpecError as exc:
        return exc
    return None


# ---- the contract cases ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]
    #: None: both accept. Otherwise a fragment of the API server's message...
    server: str | None = None
    #: ...and the field path both report.
    path: str | None = None
    drop: tuple[str, ...] = field(default=())
    #: A CEL rule the models mirror: their message is the rule's message, verbatim.
    cel: bool = False


EVERYTHING: dict[str, Any] = {
    "model": {
        "uri": "hf://meta-llama/Llama-2-13b-hf",
        "revision": "main",
        "secretRef": {"name": "hf-token"},
    },
    "dataset": {
        "uri": "pvc://data/train.jsonl",
        "validationUri": "configmap://val/validation.jsonl",
        "validationSplit": 0.5,
        "format": "Chat",
        "generalTextUri": "hf://wikitext",
        "maxSeqLength": 131072,
    },
    "method": {
        "type": "LoRA",
        "lora": {"rank": 1024, "alpha": 1, "dropout": 0.9, "targetModules": ["q_proj"]},
    },
    "hyperparameters": {
        "learningRate": 1e-4,
        "epochs": 100,
        "microBatchSize": 512,
        "gradientAccumulationSteps": 4096,
        "warmupRatio": 0.5,
        "weightDecay": 1,
        "maxGradNorm": 0.5,
        "evalSteps": 1,
        "seed": -7,
        "incremental": True,
    },
    "resources": {
        "numNodes": 512,
        "gpusPerNode": 16,
        "gpuMemoryGiB": 79.6,
        "resourcesPerNode": {
            "requests": {"cpu": "500m", "memory": "64Gi", "example.com/fpga": 1},
            "limits": {"memory": "1536Mi", "cpu": "2e3"},
        },
    },
    "deepspeed": {"zeroStage": 3, "offload": "OptimizerAndParameters"},
    "earlyStopping": {
        "enabled": False,
        "patience": 1,
        "minDelta": 0.01,
        "maxLossGap": 0.1,
        "maxEvalPerplexity": 1.01,
        "overMemorization": False,
        "memorization": {"enabled": False, "margin": 0.5, "evaluations": 3},
        "forgetting": {"enabled": True, "maxRatio": 1.25, "evaluations": 1},
    },
    "output": {"uri": "file:///models/out"},
    "image": "ghcr.io/kubetune/trainer:0.1.0",
    "planOnly": False,
    "suspend": True,
    "stopRequested": False,
    "activeDeadlineSeconds": 1,
    "backoffLimit": 100,
    "ttlSecondsAfterFinished": 0,
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "k", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30},
    ],
    "priorityClassName": "high",
    "labels": {"kueue.x-k8s.io/queue-name": "gpu"},
    "annotations": {"example.com/note": "x" * 4096},
    "serviceAccountName": "trainer",
}

D = {"uri": "pvc://d/train.jsonl"}  # a dataset, to override one of its fields

CASES: list[Case] = [
    # -- accepted by both
    Case("minimal", {}),
    Case("every-field", EVERYTHING),
    Case("hf-model-without-org", {"model": {"uri": "hf://gpt2"}}),
    Case("pvc-model-at-claim-root", {"model": {"uri": "pvc://models"}}),
    Case(
        "configmap-model-plan-only",
        {"model": {"uri": "configmap://c/config.json"}, "planOnly": True},
    ),
    Case(
        "hf-and-configmap-data",
        {"dataset": {"uri": "hf://tatsu-lab/alpaca", "validationUri": "configmap://v/val.jsonl"}},
    ),
    Case("lora-settings-with-auto", {"method": {"lora": {"rank": 8}}}),
    Case("base-model-general-text", {"dataset": {**D, "generalText": "BaseModel"}}),
    Case("shipped-general-text", {"dataset": {**D, "generalText": "Shipped"}}),
    Case("partial-fraction-1", {"method": {"type": "Partial", "partial": {"fraction": 1}}}),
    Case("empty-method-objects", {"method": {"type": "Prefix", "prefix": {}}}),
    Case("zero-stage-0", {"deepspeed": {"zeroStage": 0}}),
    Case("whole-float-for-integer", {"resources": {"numNodes": 2.0}}),
    Case("integer-for-number", {"hyperparameters": {"epochs": 3, "maxGradNorm": 1}}),
    Case("cpu-training", {"resources": {"gpusPerNode": 0}}),
    Case("toleration-empty-effect", {"tolerations": [{"operator": "Exists", "effect": ""}]}),
    # -- rejected by both: required fields and types
    Case("missing-model", {}, "Required value", "spec.model", drop=("model",)),
    Case(
        "missing-dataset-uri", {"dataset": {"format": "Text"}}, "Required value", "spec.dataset.uri"
    ),
    Case(
        "nodes-as-string",
        {"resources": {"numNodes": "2"}},
        "must be of type integer",
        "spec.resources.numNodes",
    ),
    Case(
        "fractional-nodes",
        {"resources": {"numNodes": 1.5}},
        "must be of type integer",
        "spec.resources.numNodes",
    ),
    Case("bool-as-string", {"suspend": "yes"}, "must be of type boolean", "spec.suspend"),
    Case(
        "label-value-not-string",
        {"labels": {"kueue.x-k8s.io/queue-name": 1}},
        "must be of type string",
        "spec.labels.kueue.x-k8s.io/queue-name",
    ),
    Case("unknown-field", {"gpus": 8}, 'unknown field "spec.gpus"', "spec.gpus"),
    Case(
        "unknown-nested-field",
        {"method": {"type": "LoRA", "rank": 8}},
        'unknown field "spec.method.rank"',
        "spec.method.rank",
    ),
    # -- ranges
    Case(
        "zero-nodes",
        {"resources": {"numNodes": 0}},
        "should be greater than or equal to 1",
        "spec.resources.numNodes",
    ),
    Case(
        "too-many-gpus",
        {"resources": {"gpusPerNode": 17}},
        "should be less than or equal to 16",
        "spec.resources.gpusPerNode",
    ),
    Case(
        "negative-backoff",
        {"backoffLimit": -1},
        "should be greater than or equal to 0",
        "spec.backoffLimit",
    ),
    Case(
        "zero-gpu-memory",
        {"resources": {"gpuMemoryGiB": 0}},
        "should be greater than 0",
        "spec.resources.gpuMemoryGiB",
    ),
    Case(
        "learning-rate-1",
        {"hyperparameters": {"learningRate": 1}},
        "should be less than 1",
        "spec.hyperparameters.learningRate",
    ),
    Case(
        "validation-split-0",
        {"dataset": {**D, "validationSplit": 0}},
        "should be greater than 0",
        "spec.dataset.validationSplit",
    ),
    Case(
        "short-max-seq-length",
        {"dataset": {**D, "maxSeqLength": 8}},
        "should be greater than or equal to 16",
        "spec.dataset.maxSeqLength",
    ),
    Case(
        "lora-dropout",
        {"method": {"lora": {"dropout": 0.95}}},
        "should be less than or equal to 0.9",
        "spec.method.lora.dropout",
    ),
    Case(
        "patience-0",
        {"earlyStopping": {"patience": 0}},
        "should be greater than or equal to 1",
        "spec.earlyStopping.patience",
    ),
    Case(
        "perplexity-threshold-1",
        {"earlyStopping": {"maxEvalPerplexity": 1}},
        "should be greater than 1",
        "spec.earlyStopping.maxEvalPerplexity",
    ),
    Case(
        "uri-too-long",
        {"output": {"uri": "file:///" + "x" * 2048}},
        "may not be more than 2048",
        "spec.output.uri",
    ),
    Case(
        "too-many-labels",
        {"labels": {f"l{i}": "v" for i in range(65)}},
        "must have at most 64 items",
        "spec.labels",
    ),
    # -- enums
    Case(
        "unknown-method",
        {"method": {"type": "DPO"}},
        'Unsupported value: "DPO"',
        "spec.method.type",
    ),
    Case(
        "unknown-format",
        {"dataset": {**D, "format": "CSV"}},
        'Unsupported value: "CSV"',
        "spec.dataset.format",
    ),
    Case(
        "unknown-offload",
        {"deepspeed": {"offload": "CPU"}},
        'Unsupported value: "CPU"',
        "spec.deepspeed.offload",
    ),
    # -- CEL rules
    Case(
        "lora-with-full",
        {"method": {"type": "Full", "lora": {"rank": 8}}},
        "method.lora can only be set when method.type is LoRA, QLoRA or Auto",
        "spec.method.lora",
        cel=True,
    ),
    Case(
        "prefix-with-lora",
        {"method": {"type": "LoRA", "prefix": {"numVirtualTokens": 20}}},
        "method.prefix can only be set when method.type is Prefix or Auto",
        "spec.method.prefix",
        cel=True,
    ),
    Case(
        "partial-with-full",
        {"method": {"type": "Full", "partial": {"trainableLayers": 2}}},
        "method.partial can only be set when method.type is Partial or Auto",
        "spec.method.partial",
        cel=True,
    ),
    Case("cpu-processes-per-node", {"resources": {"gpusPerNode": 0, "processesPerNode": 2}}),
    Case(
        "processes-per-node-with-gpus",
        {"resources": {"gpusPerNode": 8, "processesPerNode": 2}},
        "processesPerNode is for CPU runs (gpusPerNode 0)",
        "spec.resources.processesPerNode",
        cel=True,
    ),
    Case(
        "shipped-general-text-and-a-uri",
        {"dataset": {**D, "generalTextUri": "pvc://d/general.txt", "generalText": "Shipped"}},
        "set generalTextUri or generalText: Shipped, not both",
        "spec.dataset.generalText",
        cel=True,
    ),
    Case(
        "partial-layers-and-fraction",
        {"method": {"partial": {"trainableLayers": 2, "fraction": 0.5}}},
        "set trainableLayers or fraction, not both",
        "spec.method.partial",
        cel=True,
    ),
    Case(
        "zero-stage-5",
        {"deepspeed": {"zeroStage": 5}},
        "deepspeed.zeroStage must be Auto, 0, 1, 2 or 3",
        "spec.deepspeed.zeroStage",
        cel=True,
    ),
    Case(
        "zero-stage-string-2",
        {"deepspeed": {"zeroStage": "2"}},
        "deepspeed.zeroStage must be Auto, 0, 1, 2 or 3",
        "spec.deepspeed.zeroStage",
        cel=True,
    ),
    Case(
        "zero-stage-whole-float",
        {"deepspeed": {"zeroStage": 3.0}},
        "expected XIntOrString value to be either a string or integer",
        "spec.deepspeed.zeroStage",
    ),
    Case(
        "model-uri-scheme",
        {"model": {"uri": "gs://bucket/llama"}},
        "model.uri must be hf://org/name, pvc://claim/path, file:///absolute/path, "
        "configmap://name/key or s3://bucket/key",
        "spec.model.uri",
        cel=True,
    ),
    Case(
        "model-relative-file",
        {"model": {"uri": "file://models/llama"}},
        "model.uri must be",
        "spec.model.uri",
        cel=True,
    ),
    Case(
        "configmap-model-training",
        {"model": {"uri": "configmap://c/config.json"}},
        "configmap:// holds only a config.json",
        "spec.model.uri",
        cel=True,
    ),
    Case(
        "dataset-uri-scheme",
        {"dataset": {"uri": "https://example.com/d.jsonl"}},
        "dataset.uri must be file:///absolute/path, pvc://claim/path, configmap://name/key, "
        "hf://datasets/org/name or s3://bucket/key",
        "spec.dataset.uri",
        cel=True,
    ),
    Case(
        "general-text-uri-scheme",
        {"dataset": {**D, "generalTextUri": "/data/wiki.txt"}},
        "dataset.generalTextUri must be",
        "spec.dataset.generalTextUri",
        cel=True,
    ),
    Case(
        "output-configmap",
        {"output": {"uri": "configmap://a/b"}},
        "output.uri must be pvc://claim/path, file:///absolute/path or s3://bucket/prefix",
        "spec.output.uri",
        cel=True,
    ),
    Case(
        "bad-quantity",
        {"resources": {"resourcesPerNode": {"limits": {"memory": "64GB"}}}},
        "must be a quantity such as 8, 500m or 64Gi",
        "spec.resources.resourcesPerNode.limits.memory",
        cel=True,
    ),
    Case(
        "negative-quantity",
        {"resources": {"resourcesPerNode": {"requests": {"cpu": -1}}}},
        "must be a quantity",
        "spec.resources.resourcesPerNode.requests.cpu",
        cel=True,
    ),
    Case(
        "quantity-too-long",
        {"resources": {"resourcesPerNode": {"requests": {"memory": "1" * 65}}}},
        "may not be more than 64",
        "spec.resources.resourcesPerNode.requests.memory",
    ),
    Case(
        "toleration-exists-with-value",
        {"tolerations": [{"operator": "Exists", "value": "x"}]},
        "toleration value must be empty when operator is Exists",
        "spec.tolerations[0]",
        cel=True,
    ),
    Case(
        "toleration-seconds-without-noexecute",
        {"tolerations": [{"key": "k", "tolerationSeconds": 5}]},
        "toleration tolerationSeconds requires effect NoExecute",
        "spec.tolerations[0]",
        cel=True,
    ),
]


def _body(case: Case) -> dict[str, Any]:
    body = _manifest(f"c-{case.id}"[:63], **copy.deepcopy(case.spec))
    for key in case.drop:
        del body["spec"][key]
    return body


def test_there_are_enough_contract_cases() -> None:
    assert len(CASES) >= 24
    assert sum(c.server is None for c in CASES) >= 10
    assert sum(c.server is not None for c in CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_server_and_models_agree(api_client: Any, ns: str, case: Case) -> None:
    body = _body(case)
    server = _server_create(client.CustomObjectsApi(api_client), ns, body)
    model_error = _model_check(body)
    if case.server is None:
        assert not isinstance(server, ServerRejection), server.message
        assert model_error is None, str(model_error)
        return
    assert isinstance(server, ServerRejection), f"the API server accepted {case.id}"
    assert model_error is not None, f"the models accepted {case.id}"
    assert case.server in server.message
    model_paths = {_norm_path(path) for path, _ in model_error.problems}
    assert case.path in server.paths, server.message
    assert case.path in model_paths, str(model_error)


def test_cel_rule_messages_are_the_models_messages(api_client: Any, ns: str) -> None:
    # For the rules the models mirror, the message text is identical, not just similar.
    cel_cases = [case for case in CASES if case.cel]
    assert len(cel_cases) >= 15
    for case in cel_cases:
        server = _server_create(client.CustomObjectsApi(api_client), ns, _body(case))
        model_error = _model_check(_body(case))
        assert isinstance(server, ServerRejection)
        assert model_error is not None
        ((path, model_message),) = model_error.problems
        assert _norm_path(path) in server.paths
        assert server.message.endswith(f": {model_message}"), case.id


def test_server_defaults_equal_model_defaults(api_client: Any, ns: str) -> None:
    body = _manifest("defaults")
    created = _server_create(client.CustomObjectsApi(api_client), ns, body)
    assert isinstance(created, dict)
    assert created["spec"] == api.parse_job(body).spec.to_manifest()
    assert created["spec"]["method"] == {"type": "Auto"}
    assert created["spec"]["deepspeed"] == {"zeroStage": "Auto", "offload": "Auto"}
    # And for a job that sets some fields of each section.
    body = _manifest(
        "partial-defaults",
        method={"lora": {"rank": 8}},
        resources={"numNodes": 2},
        earlyStopping={"maxLossGap": 0.4},
        hyperparameters={"learningRate": 2e-4},
    )
    created = _server_create(client.CustomObjectsApi(api_client), ns, body)
    assert isinstance(created, dict)
    assert created["spec"] == api.parse_job(body).spec.to_manifest()


# ---- immutability and status ----------------------------------------------------------------


def _patch(objects: Any, ns: str, name: str, spec: dict[str, Any]) -> ServerRejection | None:
    try:
        objects.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.PLURAL, name, {"spec": spec}
        )
    except ApiException as exc:
        if exc.status != 422:
            raise
        return _rejection(exc)
    return None


def test_model_dataset_method_resources_are_immutable(api_client: Any, ns: str) -> None:
    objects = client.CustomObjectsApi(api_client)
    created = _server_create(objects, ns, _manifest("immutable"), dry_run=False)
    assert isinstance(created, dict)
    old = api.parse_job(created).spec
    changes: list[tuple[str, dict[str, Any]]] = [
        ("model", {"model": {"uri": "hf://gpt2"}}),
        ("dataset", {"dataset": {"validationSplit": 0.2}}),
        ("method", {"method": {"type": "LoRA"}}),
        ("resources", {"resources": {"numNodes": 2}}),
    ]
    for section, change in changes:
        rejected = _patch(objects, ns, "immutable", change)
        assert rejected is not None, f"spec.{section} could be changed"
        expected = f"spec.{section} is immutable: create a new FineTuneJob to change the"
        assert expected in rejected.message
        assert f"spec.{section}" in rejected.paths
        new_spec = {**created["spec"], **change}
        if section == "dataset":
            new_spec["dataset"] = {**created["spec"]["dataset"], **change["dataset"]}
        (model_message,) = api.check_update(old, api.parse_job(_manifest(**new_spec)).spec)
        assert model_message in rejected.message

    # The mutable fields change; the generation moves on.
    assert _patch(objects, ns, "immutable", {"suspend": True, "planOnly": True}) is None
    assert _patch(objects, ns, "immutable", {"stopRequested": True, "backoffLimit": 1}) is None
    current = objects.get_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL, "immutable"
    )
    assert current["spec"]["suspend"] is True
    assert current["metadata"]["generation"] == 3
    assert api.check_update(old, api.parse_job(current).spec) == []


def _status(**extra: Any) -> api.FineTuneJobStatus:
    return api.FineTuneJobStatus.model_validate(
        {
            "observedGeneration": 1,
            "state": "Running",
            "conditions": [
                {
                    "type": "Planned",
                    "status": "True",
                    "reason": "PlanReady",
                    "message": "LoRA rank 16: 31.2 GiB per GPU of 71.6 GiB usable",
                    "lastTransitionTime": api.format_time(),
                    "observedGeneration": 1,
                },
                {"type": "Running", "status": "True", "reason": "Training", "message": "step 30"},
            ],
            "plan": {
                "method": "LoRA",
                "fits": True,
                "error": None,
                "reasons": ["800 examples: LoRA rank 8"],
                "warnings": [],
                "zeroStage": 2,
                "offload": "None",
                "model": {"name": "Llama-2-7b-hf", "family": "llama"},
                "numNodes": 1,
                "gpusPerNode": 8,
                "trainableParameters": 39_976_960,
                "totalParameters": 6_778_392_576,
                "exampleCount": 800,
                "tokenCount": 240_000,
                "tokenCountEstimated": True,
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
                    "learningRate": 2e-4,
                    "epochs": 3,
                    "microBatchSize": 4,
                    "gradientAccumulationSteps": 2,
                    "effectiveBatchSize": 64,
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
                    "loraTargetModules": ["q_proj"],
                    "somethingNew": {"a": 1},
                },
            },
            "progress": {
                "step": 30,
                "totalSteps": 120,
                "epoch": 0.75,
                "percentage": 25.0,
                "etaSeconds": 600,
            },
            "metrics": {
                "trainLoss": 1.21,
                "evalLoss": 1.4,
                "lossGap": 0.19,
                "evalPerplexity": 4.06,
                "bestEvalLoss": 1.4,
                "bestStep": 30,
                "evalsSinceBest": 0,
                "evalTokenAccuracy": 0.61,
                "memorizationRate": 0.0,
                "generalPerplexityRatio": 1.02,
            },
            "warnings": ["12 duplicate examples removed"],
            "startTime": api.format_time(),
            "trainingJobName": "status-train",
            "earlyStop": {"reason": "NoImprovement", "message": "3 evaluations"},
            **extra,
        }
    )


def _kubectl(dev_cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(dev_cluster.bins.kubectl), "--kubeconfig", str(dev_cluster.layout.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def _kubectl_when_served(dev_cluster: Any, *args: str) -> str:
    """kubectl's discovery may lag a moment behind a just-Established CRD: retry until served."""

    def attempt() -> str | None:
        done = _kubectl(dev_cluster, *args, check=False)
        if done.returncode == 0:
            # Served; an empty list prints nothing on stdout, which must still count.
            return done.stdout or done.stderr or "served"
        assert "doesn't have a resource type" in done.stderr, done.stderr
        return None

    out = wait_for(attempt, 30, f"kubectl {' '.join(args)}")
    assert out is not None
    return out


def test_status_subresource_and_printer_columns(dev_cluster: Any, api_client: Any, ns: str) -> None:
    objects = client.CustomObjectsApi(api_client)
    created = _server_create(objects, ns, _manifest("status"), dry_run=False)
    assert isinstance(created, dict)
    status = _status()
    # The status written from the models is accepted as is by the schema (strict: nothing
    # pruned) and reads back equal, unknown plan.hyperparameters included.
    written = objects.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        ns,
        api.PLURAL,
        "status",
        {"status": status.to_manifest(), "spec": {"suspend": True}},
        field_validation="Strict",
    )
    assert api.FineTuneJobStatus.model_validate(written["status"]) == status
    assert written["status"]["plan"]["hyperparameters"]["somethingNew"] == {"a": 1}
    # A spec change through /status is ignored, and so is a status change through the object.
    assert written["spec"] == created["spec"]
    assert written["metadata"]["generation"] == 1
    after = objects.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL, "status", {"status": {"state": "Failed"}}
    )
    assert after["status"]["state"] == "Running"

    out = _kubectl_when_served(dev_cluster, "get", "ftj", "status", "-n", ns)
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "NAME",
        "STATUS",
        "METHOD",
        "PROGRESS",
        "EVAL-LOSS",
        "GAP",
        "PPL",
        "AGE",
    ]
    assert row.split()[:7] == ["status", "Running", "LoRA", "25", "1.4", "0.19", "4.06"]
    wide = _kubectl(dev_cluster, "get", "kubetune", "status", "-n", ns, "-o", "wide").stdout
    assert wide.splitlines()[0].split()[-3:] == ["MODEL", "NODES", "GPUS"]


def test_status_rejects_an_unknown_state(api_client: Any, ns: str) -> None:
    objects = client.CustomObjectsApi(api_client)
    _server_create(objects, ns, _manifest("bad-status"), dry_run=False)
    with pytest.raises(ApiException) as err:
        objects.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, ns, api.PLURAL, "bad-status", {"status": {"state": "Done"}}
        )
    assert 'spec.state: Unsupported value: "Done"' not in err.value.body
    assert 'status.state: Unsupported value: "Done"' in json.loads(err.value.body)["message"]


def test_kubectl_explain_teaches_the_api(dev_cluster: Any, crd_installed: str) -> None:
    out = _kubectl_when_served(dev_cluster, "explain", "finetunejob.spec.earlyStopping")
    assert "When to stop before the planned steps are done" in out
    for fieldname in (
        "enabled",
        "patience",
        "minDelta",
        "maxLossGap",
        "maxEvalPerplexity",
        "overMemorization",
    ):
        assert re.search(rf"^\s+{fieldname}\s+<", out, re.MULTILINE), fieldname
    assert "Evaluations without an improvement" in out
    out = _kubectl(dev_cluster, "explain", "ftj.spec.method.type").stdout
    assert "Auto: let the planner choose" in out
    out = _kubectl(dev_cluster, "explain", "ftj.status.conditions").stdout
    assert "CamelCase reason" in out


# ---- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_documents_are_valid_on_the_server(api_client: Any, ns: str, path: Path) -> None:
    documents = api.load_yaml_documents(path.read_text())
    assert documents
    for document in documents:
        if document["kind"] == api.KIND:
            result = _server_create(client.CustomObjectsApi(api_client), ns, document)
            assert not isinstance(result, ServerRejection), result.message
            assert result["spec"] == api.parse_job(document).spec.to_manifest()
        else:
            assert document["kind"] == "ConfigMap", path
            client.CoreV1Api(api_client).create_namespaced_config_map(
                ns, document, dry_run="All", field_validation="Strict"
            )
    api.job_from_yaml_file(path)


def test_examples_apply_with_kubectl(dev_cluster: Any, ns: str) -> None:
    # What a user runs: kubectl's own YAML reading (1e-4, 2.0...) and strict validation.
    _kubectl_when_served(dev_cluster, "get", "ftj", "-n", ns)
    done = _kubectl(
        dev_cluster,
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        ns,
        "-f",
        str(EXAMPLES),
    )
    lines = done.stdout.splitlines()
    assert any(line.startswith("configmap/support-faq") for line in lines), done.stdout
    expected = sum(
        1
        for f in EXAMPLES.glob("*.yaml")
        for line in f.read_text().splitlines()
        if line.strip() == "kind: FineTuneJob"
    )
    assert expected >= 5  # minimal, LoRA multi-node, plan-only, ConfigMap, quickstart
    assert sum("finetunejob.kubetune.dev/" in line for line in lines) == expected, done.stdout
