"""Bad input, refused with a message a person can act on.

- Invalid FineTuneJob manifests through `kubectl apply` (what a user runs): the rejected
  cases of the API contract (test_api_contract.py) plus more here, each with its message.
- Specs only the operator can judge: `Failed` with reason `InvalidSpec`.
- Bad datasets: a `Failed/DataError` condition naming the source and line, the job never
  retried, no pod started, and `kubetune validate` printing the same message.
- Models that cannot be read or cannot fit: a plan failure before any pod starts.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubernetes import client

from tests.cluster.test_api_contract import CASES as CONTRACT_CASES
from tests.cluster.test_operator import (
    GROUP,
    PLURAL,
    VERSION,
    OperatorProcess,
    _cond,
    _create,
    _events,
    _ftj,
    _get,
    _job_or_none,
    _rows,
    _wait_cond,
    operator,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
__all__ = ["operator"]  # the in-process operator fixture of test_operator.py

BASE: dict[str, Any] = {
    "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
    "dataset": {"uri": "pvc://training-data/train.jsonl"},
}
D = {"uri": "pvc://d/train.jsonl"}


def _manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {**BASE, **spec},
    }


# (id, spec, a fragment of what `kubectl apply` prints) beyond the contract's cases.
MORE: list[tuple[str, dict[str, Any], str]] = [
    # negative and zero counts
    ("negative-nodes", {"resources": {"numNodes": -1}}, "should be greater than or equal to 1"),
    ("negative-gpus", {"resources": {"gpusPerNode": -1}}, "should be greater than or equal to 0"),
    ("too-many-nodes", {"resources": {"numNodes": 513}}, "should be less than or equal to 512"),
    ("negative-epochs", {"hyperparameters": {"epochs": -1}}, "should be greater than 0"),
    ("epochs-101", {"hyperparameters": {"epochs": 101}}, "should be less than or equal to 100"),
    (
        "micro-batch-0",
        {"hyperparameters": {"microBatchSize": 0}},
        "should be greater than or equal to 1",
    ),
    (
        "accumulation-0",
        {"hyperparameters": {"gradientAccumulationSteps": 0}},
        "should be greater than or equal to 1",
    ),
    ("eval-steps-0", {"hyperparameters": {"evalSteps": 0}}, "should be greater than or equal to 1"),
    (
        "warmup-0.6",
        {"hyperparameters": {"warmupRatio": 0.6}},
        "should be less than or equal to 0.5",
    ),
    (
        "weight-decay-2",
        {"hyperparameters": {"weightDecay": 2}},
        "should be less than or equal to 1",
    ),
    ("grad-norm-0", {"hyperparameters": {"maxGradNorm": 0}}, "should be greater than 0"),
    ("negative-lr", {"hyperparameters": {"learningRate": -0.1}}, "should be greater than 0"),
    ("lora-rank-0", {"method": {"lora": {"rank": 0}}}, "should be greater than or equal to 1"),
    (
        "prefix-tokens-0",
        {"method": {"type": "Prefix", "prefix": {"numVirtualTokens": 0}}},
        "should be greater than or equal to 1",
    ),
    (
        "partial-fraction-0",
        {"method": {"type": "Partial", "partial": {"fraction": 0}}},
        "should be greater than 0",
    ),
    ("deadline-0", {"activeDeadlineSeconds": 0}, "should be greater than or equal to 1"),
    ("negative-ttl", {"ttlSecondsAfterFinished": -1}, "should be greater than or equal to 0"),
    ("backoff-101", {"backoffLimit": 101}, "should be less than or equal to 100"),
    (
        "negative-min-delta",
        {"earlyStopping": {"minDelta": -1}},
        "should be greater than or equal to 0",
    ),
    ("loss-gap-0", {"earlyStopping": {"maxLossGap": 0}}, "should be greater than 0"),
    ("negative-gpu-memory", {"resources": {"gpuMemoryGiB": -4}}, "should be greater than 0"),
    (
        "split-0.6",
        {"dataset": {**D, "validationSplit": 0.6}},
        "should be less than or equal to 0.5",
    ),
    (
        "context-too-long",
        {"dataset": {**D, "maxSeqLength": 131073}},
        "should be less than or equal to 131072",
    ),
    # wrong types
    ("epochs-as-word", {"hyperparameters": {"epochs": "three"}}, "must be of type number"),
    ("model-as-string", {"model": "hf://gpt2"}, "must be of type object"),
    (
        # The server reports the map's key as an unknown field before the type.
        "tolerations-as-map",
        {"tolerations": {"key": "a"}},
        'unknown field "spec.tolerations.key"',
    ),
    ("node-selector-as-list", {"nodeSelector": ["a"]}, "must be of type object"),
    ("plan-only-as-string", {"planOnly": "true"}, "must be of type boolean"),
    ("dataset-null", {"dataset": None}, "Required value"),
    ("secret-ref-without-name", {"model": {"uri": "hf://gpt2", "secretRef": {}}}, "Required"),
    # unknown enum values
    ("toleration-operator", {"tolerations": [{"key": "a", "operator": "Maybe"}]}, "Maybe"),
    ("toleration-effect", {"tolerations": [{"key": "a", "effect": "Sometimes"}]}, "Sometimes"),
    ("format-lower-case", {"dataset": {**D, "format": "text"}}, 'Unsupported value: "text"'),
    # oversized values
    ("annotation-too-long", {"annotations": {"a": "x" * 4097}}, "may not be more than 4096"),
    (
        "too-many-tolerations",
        {"tolerations": [{"key": f"k{i}", "operator": "Exists"} for i in range(33)]},
        "must have at most 32 items",
    ),
    ("priority-class-too-long", {"priorityClassName": "x" * 254}, "may not be more than 253"),
    ("revision-too-long", {"model": {"uri": "hf://gpt2", "revision": "x" * 257}}, "256"),
    # bad URIs
    (
        "validation-uri-gs",
        {"dataset": {**D, "validationUri": "gs://b/v.jsonl"}},
        "dataset.validationUri must be",
    ),
    ("empty-hf-model", {"model": {"uri": "hf://"}}, "model.uri must be"),
    ("pvc-output-without-claim", {"output": {"uri": "pvc://"}}, "output.uri must be"),
]

# kubectl sends a JSON 3.0 as 3, so the int-or-string case passes through kubectl.
REJECTED_CONTRACT = [
    c for c in CONTRACT_CASES if c.server is not None and c.id != "zero-stage-whole-float"
]
ALL_CASES: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    *((c.id, c.spec, c.server or "", c.drop) for c in REJECTED_CONTRACT),
    *((i, s, m, ()) for i, s, m in MORE),
]


def test_there_are_at_least_30_invalid_manifests() -> None:
    assert len(ALL_CASES) >= 60
    assert len({c[0] for c in ALL_CASES}) == len(ALL_CASES)


def _kubectl(dev_cluster: Any, *args: str, stdin: str | None = None) -> Any:
    return subprocess.run(
        [str(dev_cluster.bins.kubectl), f"--kubeconfig={dev_cluster.layout.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def bad_ns(dev_cluster: Any, api_client: Any, crd_installed: str) -> Iterator[str]:
    import uuid

    core = client.CoreV1Api(api_client)
    name = f"bad-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})

    def served() -> bool:  # kubectl's discovery may lag behind a new CRD
        return bool(_kubectl(dev_cluster, "get", "ftj", "-n", name).returncode == 0)

    wait_for(served, 30, "kubectl to serve FineTuneJobs")
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.mark.parametrize(
    ("case_id", "spec", "message", "drop"), ALL_CASES, ids=[c[0] for c in ALL_CASES]
)
def test_kubectl_apply_refuses_an_invalid_manifest(
    dev_cluster: Any,
    bad_ns: str,
    case_id: str,
    spec: dict[str, Any],
    message: str,
    drop: tuple[str, ...],
) -> None:
    body = _manifest(f"x-{case_id}"[:63].lower().replace(".", "-"), spec)
    for key in drop:
        del body["spec"][key]
    done = _kubectl(dev_cluster, "apply", "-n", bad_ns, "-f", "-", stdin=json.dumps(body))
    assert done.returncode != 0, f"kubectl apply accepted {case_id}: {done.stdout}"
    assert message in done.stderr, done.stderr
    gone = _kubectl(dev_cluster, "get", "ftj", "-n", bad_ns, body["metadata"]["name"])
    assert gone.returncode != 0  # nothing was stored


@pytest.mark.parametrize(
    ("section", "change"),
    [
        ("model", {"model": {"uri": "hf://gpt2"}}),
        ("dataset", {"dataset": {"uri": "pvc://other/train.jsonl"}}),
        ("method", {"method": {"type": "LoRA"}}),
        ("resources", {"resources": {"numNodes": 4}}),
    ],
)
def test_kubectl_apply_refuses_a_change_of_an_immutable_field(
    dev_cluster: Any, bad_ns: str, section: str, change: dict[str, Any]
) -> None:
    name = f"immutable-{section}"
    first = _kubectl(
        dev_cluster, "apply", "-n", bad_ns, "-f", "-", stdin=json.dumps(_manifest(name, {}))
    )
    assert first.returncode == 0, first.stderr
    done = _kubectl(
        dev_cluster, "apply", "-n", bad_ns, "-f", "-", stdin=json.dumps(_manifest(name, change))
    )
    assert done.returncode != 0
    assert (
        f"spec.{section} is immutable: create a new FineTuneJob to change the {section}"
        in done.stderr
    ), done.stderr


# ---- what only the operator can know ---------------------------------------------------------

OPERATOR_INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "offload-without-zero",
        {"deepspeed": {"zeroStage": 0, "offload": "Optimizer"}},
        "spec: ",  # the planner's PlanRequest message, prefixed by the field
    ),
    (
        "bad-service-account",
        {"serviceAccountName": "Bad_Name"},
        'the API server refused a child object: Job.batch "bad-service-account-train" is '
        'invalid: spec.template.spec.serviceAccountName: Invalid value: "Bad_Name"',
    ),
    (
        "bad-label-key",
        {"labels": {"bad key!": "v"}},
        'spec.template.labels: Invalid value: "bad key!"',
    ),
    (
        "empty-secret-name",
        {"model": {"uri": "hf://meta-llama/Llama-2-7b-hf", "secretRef": {"name": ""}}},
        ".secret.secretName: Required value",
    ),
    (
        "name-too-long-for-the-children-" + "x" * 27,
        {},
        "must be no more than 63 characters",
    ),
]


@pytest.mark.parametrize(
    ("name", "spec", "message"), OPERATOR_INVALID, ids=[c[0][:30] for c in OPERATOR_INVALID]
)
def test_specs_only_the_operator_can_judge_fail_with_invalid_spec(
    operator: OperatorProcess,
    api: dict[str, Any],
    namespace: str,
    name: str,
    spec: dict[str, Any],
    message: str,
) -> None:
    _create(api, namespace, _ftj(name, resources={"numNodes": 1, "gpusPerNode": 8}, **spec))
    failed = _wait_cond(api, namespace, name, "Failed", timeout=60)
    assert failed["reason"] == "InvalidSpec"
    assert message in failed["message"]
    _assert_settled(api, namespace, name)
    assert not api["core"].list_namespaced_pod(namespace).items


def _assert_settled(api: dict[str, Any], ns: str, name: str) -> None:
    """No retry loop: over three resync intervals the spec and status are not written
    again and the failure event was posted once. (Not the resourceVersion: Kopf records
    its handling in an annotation, which on a busy machine can land after the status.)"""
    obj = _get(api, ns, name)
    before = (obj["spec"], obj["status"])
    time.sleep(6)
    obj = _get(api, ns, name)
    assert (obj["spec"], obj["status"]) == before
    failed = _cond(_get(api, ns, name), "Failed")
    assert failed is not None
    assert _events(api, ns, name).count(failed["reason"]) == 1


# ---- bad datasets ----------------------------------------------------------------------------


def _pc(i: int) -> str:
    return json.dumps({"prompt": f"Define term {i}: ", "completion": f"Term {i} means {i}."})


SRC = "configmap://{name}-data/train.jsonl"
# (id, train text, validation text or None, the message after "<source>")
BAD_DATASETS: list[tuple[str, str, str | None, str]] = [
    ("empty", "", None, ": the dataset is empty; it needs at least one JSON line"),
    ("blank-lines", "\n  \n\n", None, ": the dataset is empty; it needs at least one JSON line"),
    ("not-json", _pc(1) + "\nhello world\n", None, " line 2: not valid JSON"),
    ("not-an-object", _pc(1) + "\n" + _pc(2) + "\n[1, 2]", None, " line 3: each line must be"),
    (
        "mixed-formats",
        "\n".join([_pc(1), _pc(2), _pc(3), json.dumps({"text": "plain text"})]),
        None,
        " line 4: this row is Text but the file started as PromptCompletion; "
        "use one format per file",
    ),
    (
        "missing-field",
        "\n".join([_pc(1), _pc(2), json.dumps({"prompt": "no answer"})]),
        None,
        " line 3: missing field 'completion'",
    ),
    (
        "wrong-type",
        "\n".join([_pc(1), json.dumps({"prompt": "x", "completion": 5})]),
        None,
        " line 2: field 'completion' must be a string, not int",
    ),
    (
        "unknown-format",
        json.dumps({"question": "q", "answer": "a"}),
        None,
        " line 1: cannot tell the format",
    ),
    (
        "chat-ends-with-user",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        None,
        " line 1: the last message must be the assistant's reply",
    ),
    (
        "all-duplicates",
        "\n".join([_pc(7)] * 20),
        None,
        ": all 20 examples are the same text; there is nothing to learn beyond one example",
    ),
    (
        "validation-is-train",
        "\n".join(_pc(i) for i in range(30)),
        "\n".join(_pc(i) for i in range(30)),
        ": every validation example also occurs in the training data",
    ),
    ("deeply-nested", _pc(1) + "\n" + "[" * 100_000 + "]" * 100_000, None, " line 2: JSON nested"),
]


def _data_job(name: str, train: str | bytes, validation: str | None, **spec: Any) -> Any:
    dataset: dict[str, Any] = {"uri": SRC.format(name=name)}
    if validation is not None:
        dataset["validationUri"] = f"configmap://{name}-data/val.jsonl"
    return _ftj(name, dataset=dataset, resources={"numNodes": 1, "gpusPerNode": 8}, **spec)


def _config_map(name: str, train: str | bytes, validation: str | None) -> dict[str, Any]:
    cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
    if isinstance(train, bytes):
        cm["binaryData"] = {"train.jsonl": base64.b64encode(train).decode()}
    else:
        cm["data"] = {"train.jsonl": train}
    if validation is not None:
        cm.setdefault("data", {})["val.jsonl"] = validation
    return cm


def _validate_locally(tmp_path: Path, job: dict[str, Any], cm: dict[str, Any]) -> Any:
    from kubetune.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([cm, job]))
    return CliRunner().invoke(main, ["validate", str(path)])


@pytest.mark.parametrize(
    ("case_id", "train", "validation", "message"), BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS]
)
def test_a_bad_dataset_fails_once_with_source_and_line_and_validate_agrees(
    operator: OperatorProcess,
    api: dict[str, Any],
    namespace: str,
    tmp_path: Path,
    case_id: str,
    train: str,
    validation: str | None,
    message: str,
) -> None:
    name = f"data-{case_id}"
    job = _data_job(name, train, validation)
    cm = _config_map(f"{name}-data", train, validation)
    api["core"].create_namespaced_config_map(namespace, cm)
    api["custom"].create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    failed = _wait_cond(api, namespace, name, "Failed", timeout=60)
    assert failed["reason"] == "DataError"
    source = SRC.format(name=name)
    assert failed["message"].startswith(source + message), failed["message"]
    _assert_settled(api, namespace, name)
    assert _job_or_none(api, namespace, f"{name}-train") is None  # no pod ever started
    assert not api["core"].list_namespaced_pod(namespace).items
    # The same words from `kubetune validate` on the same files, before any cluster.
    local = _validate_locally(tmp_path, job, cm)
    assert local.exit_code == 1
    assert local.output.strip().splitlines()[-1] == f"Error: {failed['message']}"


def test_a_dataset_in_the_wrong_encoding_names_the_line(
    operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Path
) -> None:
    """Latin-1 bytes in a binaryData ConfigMap: reported, not silently replaced."""
    from kubetune.cli import main

    raw = (_pc(1) + "\n" + _pc(2) + "\n").encode() + '{"prompt": "café", "completion": "x"}'.encode(
        "latin-1"
    )
    name = "data-latin1"
    api["core"].create_namespaced_config_map(namespace, _config_map(f"{name}-data", raw, None))
    api["custom"].create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _data_job(name, raw, None)
    )
    failed = _wait_cond(api, namespace, name, "Failed", timeout=60)
    assert failed["reason"] == "DataError"
    byte = raw.index("é".encode("latin-1"))
    expected = f"line 3: not valid UTF-8 (byte {byte}); save the file as UTF-8"
    assert failed["message"] == f"{SRC.format(name=name)} {expected}"
    _assert_settled(api, namespace, name)
    # Locally (a file: ConfigMaps in a YAML file cannot hold binaryData here).
    data = tmp_path / "train.jsonl"
    data.write_bytes(raw)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_ftj("local", dataset={"uri": f"file://{data}"})))
    local = CliRunner().invoke(main, ["validate", str(path)])
    assert local.exit_code == 1
    assert local.output.strip().splitlines()[-1] == f"Error: {data} {expected}"


def test_rows_longer_than_the_context_are_a_warning_naming_the_first_line(
    operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Path
) -> None:
    """Truncation is legitimate, so over-long rows do not fail the job; status.warnings
    and `kubetune validate` say how many and where the first one is."""
    rows = [_pc(i) for i in range(40)]
    rows[6] = json.dumps({"prompt": "long: ", "completion": "word " * 400})
    train = "\n".join(rows)
    name = "data-overlong"
    job = _data_job(name, train, None, planOnly=True)
    job["spec"]["dataset"]["maxSeqLength"] = 64
    cm = _config_map(f"{name}-data", train, None)
    api["core"].create_namespaced_config_map(namespace, cm)
    api["custom"].create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    _wait_cond(api, namespace, name, "Succeeded", timeout=60, reason="PlanOnly")
    # The plan's warning: how many, the planned length, and the first one with its line.
    planned = (
        "1 of 36 training examples are longer than the planned sequence length of 64 tokens "
        f"and will be truncated, cutting their completions (the first: {SRC.format(name=name)} "
        "line 7, "
    )
    warnings = _get(api, namespace, name)["status"]["warnings"]
    assert any(w.startswith(planned) for w in warnings), warnings
    # `kubetune validate` says it of the file, before any plan.
    expected = (
        f"{SRC.format(name=name)}: 1 examples are longer than maxSeqLength 64 "
        "(estimated; the first at line 7) and will be truncated"
    )
    local = _validate_locally(tmp_path, job, cm)
    assert local.exit_code == 0
    assert f"warning: {expected}" in local.output


def test_a_missing_configmap_key_waits_with_a_clear_condition_not_a_failure(
    operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Path
) -> None:
    """Like a pod whose ConfigMap is not there yet, the job waits (Planned=False,
    InputNotFound) and says which key of which ConfigMap; one event, no failure."""
    name = "data-no-key"
    api["core"].create_namespaced_config_map(
        namespace, {"metadata": {"name": f"{name}-data"}, "data": {"other.jsonl": _rows(5)}}
    )
    job = _data_job(name, "", None)
    api["custom"].create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)

    def waiting() -> dict[str, Any] | None:
        c = _cond(_get(api, namespace, name), "Planned")
        return c if c and c["reason"] == "InputNotFound" else None

    cond = wait_for(waiting, 30, "Planned=False/InputNotFound")
    assert cond is not None
    assert cond["status"] == "False"
    assert cond["message"].startswith(
        f"spec.dataset.uri: ConfigMap {namespace}/{name}-data has no key 'train.jsonl'"
    )
    time.sleep(6)
    assert _cond(_get(api, namespace, name), "Failed") is None
    assert _events(api, namespace, name).count("InputNotFound") == 1
    local = _validate_locally(
        tmp_path,
        job,
        {"kind": "ConfigMap", "metadata": {"name": f"{name}-data"}, "data": {"x": "y"}},
    )
    assert f"ConfigMap '{name}-data' has no key 'train.jsonl'" in local.output


def test_a_missing_dataset_file_fails_in_the_prepare_step(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    from kubetune.devcluster.components import local_runner_pod_placement

    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    job = _ftj(
        "nofile",
        resources={"numNodes": 1, "gpusPerNode": 0},
        dataset={"uri": "file:///nonexistent/kubetune/train.jsonl"},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
    )
    _create(api, namespace, job, rows=None)
    failed = _wait_cond(api, namespace, "nofile", "Failed", timeout=120)
    assert failed["reason"] == "DataError"
    assert "dataset file not found: /nonexistent/kubetune/train.jsonl" in failed["message"]
    assert _job_or_none(api, namespace, "nofile-train") is None
    prepare = api["batch"].read_namespaced_job("nofile-prepare", namespace)
    assert (prepare.status.failed or 0) == 1  # exit 78: failed at once, not retried


# ---- models that cannot be read or cannot fit ------------------------------------------------


@pytest.mark.parametrize(
    ("case_id", "config", "reason", "message"),
    [
        ("not-json", "{not json", "ModelConfigError", "configmap://model/config.json: not valid"),
        (
            "missing-keys",
            json.dumps({"model_type": "llama"}),
            "ModelConfigError",
            "configmap://model/config.json: missing required key 'hidden_size'",
        ),
    ],
)
def test_a_model_config_that_cannot_be_read_fails_the_plan(
    operator: OperatorProcess,
    api: dict[str, Any],
    namespace: str,
    case_id: str,
    config: str,
    reason: str,
    message: str,
) -> None:
    api["core"].create_namespaced_config_map(
        namespace, {"metadata": {"name": "model"}, "data": {"config.json": config}}
    )
    name = f"model-{case_id}"
    _create(
        api, namespace, _ftj(name, planOnly=True, model={"uri": "configmap://model/config.json"})
    )
    failed = _wait_cond(api, namespace, name, "Failed", timeout=60)
    assert failed["reason"] == reason
    assert failed["message"].startswith(message), failed["message"]
    _assert_settled(api, namespace, name)


def test_a_model_that_cannot_fit_even_with_full_offload_fails_before_any_pod(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    """Full fine-tuning of a 70B model on one 8 GiB GPU with 64 GiB of host memory: even
    ZeRO-3 with the optimizer and parameters offloaded needs far more host memory."""
    _create(
        api,
        namespace,
        _ftj(
            "huge",
            model={"uri": "hf://meta-llama/Llama-2-70b-hf"},
            method={"type": "Full"},
            resources={
                "numNodes": 1,
                "gpusPerNode": 1,
                "gpuMemoryGiB": 8,
                "resourcesPerNode": {"limits": {"memory": "64Gi"}},
            },
        ),
    )
    failed = _wait_cond(api, namespace, "huge", "Failed", timeout=60)
    assert failed["reason"] == "DoesNotFit"
    assert "ZeRO-3, OptimizerAndParameters offload" in failed["message"]
    assert "of host memory per node for the offload but has 64.0 GiB" in failed["message"]
    planned = _cond(_get(api, namespace, "huge"), "Planned")
    assert planned is not None
    assert (planned["status"], planned["reason"]) == ("False", "DoesNotFit")
    _assert_settled(api, namespace, "huge")
    assert _job_or_none(api, namespace, "huge-train") is None
    assert not api["core"].list_namespaced_pod(namespace).items


# ---- pods the API server refuses -------------------------------------------------------------


def test_pods_refused_by_pod_security_are_named_with_the_field_to_change(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    """A namespace at Pod Security `baseline` refuses the default file:// output (a hostPath):
    the training Job exists but cannot create its pods. The FineTuneJob says so (Running
    False, PodCreationFailed, the server's words and spec.output.uri), with one Warning
    Event, and does not fail: the Job controller keeps retrying."""
    api["core"].patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "baseline",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    _create(api, namespace, _ftj("pss"))

    def blocked() -> dict[str, Any] | None:
        c = _cond(_get(api, namespace, "pss"), "Running")
        return c if c and c["reason"] == "PodCreationFailed" else None

    cond = wait_for(blocked, 60, "Running=False/PodCreationFailed")
    assert cond is not None
    assert cond["status"] == "False"
    assert cond["message"].startswith("Job pss-train cannot create its pods: ")
    assert "violates PodSecurity" in cond["message"]
    assert "hostPath" in cond["message"]
    assert "set spec.output.uri" in cond["message"]
    assert (
        api["core"].list_namespaced_pod(namespace, label_selector="job-name=pss-train").items == []
    )
    time.sleep(6)  # three resync rounds: the condition stays, no failure, no repeated Event
    assert _cond(_get(api, namespace, "pss"), "Failed") is None
    assert _events(api, namespace, "pss").count("PodCreationFailed") == 1


def test_pods_refused_by_a_quota_are_reported_and_the_runs_start_once_it_is_gone(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    """A ResourceQuota of zero pods refuses the prepare pod of one job (a pvc:// dataset is
    read in a pod) and the training pods of another: both say so (state Blocked) and neither
    fails. Once the quota is deleted the Job controller's retries create the pods and the
    conditions move on (Planned=False/Preparing; Running=True)."""
    api["core"].create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    # Until the quota controller fills its status, refusals say "status unknown for quota".
    wait_for(
        lambda: (
            api["core"].read_namespaced_resource_quota("no-pods", namespace).status.hard or None
        ),
        30,
        "the quota's status",
    )
    _create(api, namespace, _ftj("quota-train"))
    _create(
        api,
        namespace,
        _ftj("quota-prep", dataset={"uri": "pvc://quota-data/train.jsonl"}),
        rows=None,
    )

    def reason(name: str, ctype: str) -> str | None:
        c = _cond(_get(api, namespace, name), ctype)
        return c["reason"] if c else None

    def both_blocked() -> bool:
        return (
            reason("quota-train", "Running")
            == reason("quota-prep", "Planned")
            == "PodCreationFailed"
        )

    wait_for(both_blocked, 60, "both jobs Blocked by the quota")
    for name, ctype, job in (
        ("quota-train", "Running", "quota-train-train"),
        ("quota-prep", "Planned", "quota-prep-prepare"),
    ):
        obj = _get(api, namespace, name)
        cond = _cond(obj, ctype)
        assert cond is not None
        assert obj["status"]["state"] == "Blocked"
        assert cond["message"].startswith(f"Job {job} cannot create its pods: ")
        assert "exceeded quota" in cond["message"]
        assert "the namespace's ResourceQuota is used up" in cond["message"]
        assert _cond(obj, "Failed") is None
        assert _events(api, namespace, name).count("PodCreationFailed") == 1
    api["core"].delete_namespaced_resource_quota("no-pods", namespace)
    wait_for(
        lambda: (
            reason("quota-train", "Running") == "Training"
            and reason("quota-prep", "Planned") != "PodCreationFailed"
        ),
        150,
        "the pods created once the quota is gone",
    )
    assert _get(api, namespace, "quota-train")["status"]["state"] == "Running"
    assert reason("quota-prep", "Planned") in ("Preparing", "PlanReady")
