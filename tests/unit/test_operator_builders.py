"""The pure manifest builders: storage URIs, the Indexed training Job, the prepare Job, the
ConfigMap, the control Secret and the headless Service."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune import contract
from kubetune.api import FineTuneJobSpec, parse_job
from kubetune.operator import builders as b
from kubetune.operator.builders import JobRef, Storage, storage_for
from kubetune.operator.settings import OperatorSettings
from tests.plans import plan_document
from tests.unit.specs import secret_file_source, spec_from

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REF = JobRef(name="demo", namespace="team-a", uid="0f1e2d3c-uid", generation=4)
SETTINGS = OperatorSettings()
PLAN = plan_document(zeroStage=2)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
    "dataset": {"uri": "pvc://training-data/support/train.jsonl"},
}


def make_spec(**extra: Any) -> FineTuneJobSpec:
    return spec_from(BASE_SPEC, REF.name, REF.namespace, **extra)


def example_spec(name: str) -> FineTuneJobSpec:
    return parse_job(EXAMPLES / name).spec


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(job)["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Env entries by name (and no name twice)."""
    entries = container(job)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e for e in entries}


def env_value(job: dict[str, Any], name: str) -> str:
    value: str = env_of(job)[name]["value"]
    return value


def arg(command: list[str], flag: str) -> str:
    found = [a.split("=", 1)[1] for a in command if a.startswith(flag + "=")]
    assert len(found) == 1, f"{flag} appears {len(found)} times in {command}"
    return found[0]


# ---- storage_for ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "role", "read_only", "expected"),
    [
        (
            "pvc://claim",
            "model",
            True,
            Storage(
                path="/mnt/model/claim",
                volume={
                    "name": "model-claim",
                    "persistentVolumeClaim": {"claimName": "claim", "readOnly": True},
                },
                mount={"name": "model-claim", "mountPath": "/mnt/model/claim", "readOnly": True},
            ),
        ),
        (
            "pvc://training-data/contracts/train.jsonl",
            "data",
            True,
            Storage(
                path="/mnt/data/training-data/contracts/train.jsonl",
                volume={
                    "name": "data-training-data",
                    "persistentVolumeClaim": {"claimName": "training-data", "readOnly": True},
                },
                mount={
                    "name": "data-training-data",
                    "mountPath": "/mnt/data/training-data",
                    "readOnly": True,
                },
            ),
        ),
        (
            "pvc://models/llama/out",
            "output",
            False,
            Storage(
                path="/mnt/output/models/llama/out",
                volume={
                    "name": "output-models",
                    "persistentVolumeClaim": {"claimName": "models", "readOnly": False},
                },
                mount={
                    "name": "output-models",
                    "mountPath": "/mnt/output/models",
                    "readOnly": False,
                },
            ),
        ),
        (
            "configmap://support-faq/train.jsonl",
            "data",
            True,
            Storage(
                path="/mnt/data/configmap-support-faq/train.jsonl",
                volume={"name": "data-cm-support-faq", "configMap": {"name": "support-faq"}},
                mount={
                    "name": "data-cm-support-faq",
                    "mountPath": "/mnt/data/configmap-support-faq",
                    "readOnly": True,
                },
            ),
        ),
        # A ConfigMap volume is always mounted read-only, whatever the caller asks.
        (
            "configmap://cfg/config.json",
            "model",
            False,
            Storage(
                path="/mnt/model/configmap-cfg/config.json",
                volume={"name": "model-cm-cfg", "configMap": {"name": "cfg"}},
                mount={
                    "name": "model-cm-cfg",
                    "mountPath": "/mnt/model/configmap-cfg",
                    "readOnly": True,
                },
            ),
        ),
        ("file:///data/train.jsonl", "data", True, Storage(path="/data/train.jsonl")),
        ("file:///models/llama", "model", True, Storage(path="/models/llama")),
        (
            "file:///tmp/kubetune-output/ns/job",
            "output",
            False,
            Storage(
                path="/tmp/kubetune-output/ns/job",
                volume={
                    "name": "output-host",
                    "hostPath": {
                        "path": "/tmp/kubetune-output/ns/job",
                        "type": "DirectoryOrCreate",
                    },
                },
                mount={"name": "output-host", "mountPath": "/tmp/kubetune-output/ns/job"},
            ),
        ),
        ("hf://Qwen/Qwen2-0.5B", "model", True, Storage(path="hf://Qwen/Qwen2-0.5B")),
        ("hf://stanfordnlp/imdb", "data", True, Storage(path="hf://stanfordnlp/imdb")),
    ],
)
def test_storage_for(uri: str, role: str, read_only: bool, expected: Storage) -> None:
    assert storage_for(uri, role, read_only=read_only) == expected


@pytest.mark.parametrize("uri", ["gs://bucket/train.jsonl", "https://x/y", "/plain/path"])
def test_storage_for_rejects_unknown_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage_for(uri, "data")


@pytest.mark.parametrize(
    ("uri", "role"),
    [
        ("pvc://my.claim.v2/x", "data"),
        ("pvc://" + "a" * 120 + "/x", "validation"),
        ("pvc://" + "b" * 61 + "-c/x", "general"),
        ("configmap://" + "c" * 100 + "/k.jsonl", "data"),
        ("file:///out", "output"),
    ],
)
def test_volume_names_are_dns_labels(uri: str, role: str) -> None:
    s = storage_for(uri, role, read_only=role != "output")
    assert s.volume is not None
    assert s.mount is not None
    name = s.volume["name"]
    assert len(name) <= 63
    assert DNS_LABEL.fullmatch(name), name
    assert s.mount["name"] == name


# ---- training_job -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "gpus", "shm"),
    [(1, 1, "8Gi"), (2, 8, "64Gi"), (3, 2, "16Gi"), (1, 0, "8Gi"), (4, 0, "8Gi")],
)
def test_training_job_shape(nodes: int, gpus: int, shm: str) -> None:
    spec = make_spec(resources={"numNodes": nodes, "gpusPerNode": gpus})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert job["metadata"]["name"] == "demo-train"
    assert job["metadata"]["namespace"] == "team-a"
    js = job["spec"]
    assert js["completionMode"] == "Indexed"
    assert js["completions"] == nodes
    assert js["parallelism"] == nodes
    ps = pod_spec(job)
    assert ps["restartPolicy"] == "Never"
    assert ps["subdomain"] == "demo-train"
    dshm = next(v for v in ps["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]
    assert env_value(job, "KUBETUNE_NUM_NODES") == str(nodes)


@pytest.mark.parametrize(
    ("per_gpu", "gpus", "shm"),
    [
        (2.0, 1, "2Gi"),
        (2.0, 4, "8Gi"),
        (2.0, 0, "2Gi"),  # a CPU job counts as one device
        (1.5, 3, "4.5Gi"),
        (0.25, 1, "1Gi"),  # never under 1 GiB
        (0.25, 8, "2Gi"),
    ],
)
def test_shm_size_follows_settings(per_gpu: float, gpus: int, shm: str) -> None:
    spec = make_spec(resources={"gpusPerNode": gpus})
    job = b.training_job(REF, spec, PLAN, OperatorSettings(shm_gib_per_gpu=per_gpu))
    dshm = next(v for v in pod_spec(job)["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["sizeLimit"] == shm


@pytest.mark.parametrize("gpus", [1, 2, 8, 16])
def test_gpus_requested_per_pod(gpus: int) -> None:
    job = b.training_job(REF, make_spec(resources={"gpusPerNode": gpus}), PLAN, SETTINGS)
    res = container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == str(gpus)
    assert res["requests"]["nvidia.com/gpu"] == str(gpus)
    assert "DS_ACCELERATOR" not in env_of(job)
    assert arg(container(job)["command"], "--nproc-per-node") == str(gpus)


def test_cpu_job_requests_no_gpu_and_uses_the_cpu_accelerator() -> None:
    job = b.training_job(REF, make_spec(resources={"gpusPerNode": 0}), PLAN, SETTINGS)
    c = container(job)
    # No GPU; CPU and memory from the plan: 0.01 GiB offloaded + 1.5 GiB per process + the
    # 0.28 GiB per-process working set (in host memory without GPUs) = 1.79 GiB; the limit
    # is 1.5 times that plus the 8 GiB /dev/shm.
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "1833Mi"},
        "limits": {"memory": "10942Mi"},
    }
    assert env_value(job, "DS_ACCELERATOR") == "cpu"
    assert arg(c["command"], "--nproc-per-node") == "1"


def test_cpu_job_keeps_resources_per_node() -> None:
    spec = make_spec(
        resources={
            "gpusPerNode": 0,
            "resourcesPerNode": {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}},
        }
    )
    res = container(b.training_job(REF, spec, PLAN, SETTINGS))["resources"]
    assert res == {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}}


def test_resources_per_node_merged_with_gpus() -> None:
    spec = example_spec("lora-multinode.yaml")
    res = container(b.training_job(REF, spec, PLAN, SETTINGS))["resources"]
    assert res == {
        "requests": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "256Gi", "nvidia.com/gpu": "8"},
    }


def test_gpus_per_node_wins_over_a_gpu_count_in_resources_per_node() -> None:
    spec = make_spec(
        resources={
            "gpusPerNode": 2,
            "resourcesPerNode": {"limits": {"nvidia.com/gpu": "7"}, "requests": {"cpu": 1}},
        }
    )
    res = container(b.training_job(REF, spec, PLAN, SETTINGS))["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2"
    # The user's CPU wins; the memory (named nowhere by the user) comes from the plan.
    assert res["requests"] == {"cpu": "1", "memory": "3083Mi", "nvidia.com/gpu": "2"}


@pytest.mark.parametrize(
    ("nodes", "gpus", "master"),
    [
        (1, 1, "127.0.0.1"),
        (1, 8, "127.0.0.1"),
        (1, 0, "127.0.0.1"),
        (2, 8, "demo-train-0.demo-train.team-a.svc"),
        (16, 4, "demo-train-0.demo-train.team-a.svc"),
        (3, 0, "demo-train-0.demo-train.team-a.svc"),
    ],
)
def test_torchrun_arguments(nodes: int, gpus: int, master: str) -> None:
    spec = make_spec(resources={"numNodes": nodes, "gpusPerNode": gpus})
    settings = OperatorSettings(rendezvous_port=31234)
    cmd = container(b.training_job(REF, spec, PLAN, settings))["command"]
    assert cmd[:3] == ["python", "-m", "kubetune.trainer.launch"]
    assert arg(cmd, "--nnodes") == str(nodes)
    assert arg(cmd, "--nproc-per-node") == str(max(gpus, 1))
    # Kubernetes expands $(VAR) from the env the Job controller adds to Indexed pods.
    assert arg(cmd, "--node-rank") == "$(JOB_COMPLETION_INDEX)"
    assert arg(cmd, "--master-addr") == master
    assert arg(cmd, "--master-port") == "31234"
    assert cmd[len(cmd) - 1 - cmd[::-1].index("-m") + 1] == "kubetune.trainer"
    assert arg(cmd, "--config-dir") == contract.CONFIG_MOUNT


def test_master_address_is_pod_zero_of_the_headless_service() -> None:
    spec = make_spec(resources={"numNodes": 2})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    svc = b.headless_service(REF, SETTINGS)
    host, subdomain, namespace, suffix = arg(container(job)["command"], "--master-addr").split(".")
    # Pod 0 of an Indexed Job is named <job>-0 and gets hostname <job>-0 under its subdomain.
    assert host == f"{job['metadata']['name']}-0"
    assert subdomain == svc["metadata"]["name"] == pod_spec(job)["subdomain"]
    assert namespace == svc["metadata"]["namespace"]
    assert suffix == "svc"
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert arg(container(job)["command"], "--master-port") == str(ports["rendezvous"])


def test_trainer_command_override() -> None:
    settings = OperatorSettings(trainer_command=("python", "-m", "fake_trainer", "--fast"))
    spec = make_spec(resources={"numNodes": 2, "gpusPerNode": 4})
    cmd = container(b.training_job(REF, spec, PLAN, settings))["command"]
    assert cmd == ["python", "-m", "fake_trainer", "--fast"]
    assert isinstance(cmd, list)


def test_pod_failure_policy() -> None:
    job = b.training_job(REF, make_spec(), PLAN, SETTINGS)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": container(job)["name"],
                "operator": "In",
                "values": [78],
            },
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        # A deleted pod's SIGTERM (exit 143 after its checkpoint) is not counted either.
        {
            "action": "Ignore",
            "onExitCodes": {
                "containerName": container(job)["name"],
                "operator": "In",
                "values": [143],
            },
        },
    ]
    # podFailurePolicy requires restartPolicy Never.
    assert pod_spec(job)["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    "build",
    [
        lambda spec: b.training_job(REF, spec, PLAN, SETTINGS),
        lambda spec: b.prepare_job(REF, spec, SETTINGS, 80.0),
        lambda spec: b.config_map(REF, spec, PLAN, SETTINGS),
        lambda spec: b.control_secret(REF, "s3cr3t"),
        lambda spec: b.headless_service(REF, SETTINGS),
    ],
    ids=["train", "prepare", "config", "control", "service"],
)
def test_every_child_is_owned_and_labelled(build: Any) -> None:
    obj = build(make_spec())
    meta = obj["metadata"]
    assert meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "demo",
            "uid": "0f1e2d3c-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"]["kubetune.dev/job"] == "demo"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert meta["name"].startswith("demo-")


@pytest.mark.parametrize(
    ("build", "name", "component"),
    [
        (lambda: b.training_job(REF, make_spec(), PLAN, SETTINGS), "demo-train", "train"),
        (lambda: b.prepare_job(REF, make_spec(), SETTINGS, 24.0), "demo-prepare", "prepare"),
        (lambda: b.config_map(REF, make_spec(), PLAN, SETTINGS), "demo-config", "config"),
        (lambda: b.control_secret(REF, "t"), "demo-control", "control"),
        (lambda: b.headless_service(REF, SETTINGS), "demo-train", "train"),
    ],
)
def test_child_names_and_components(build: Any, name: str, component: str) -> None:
    meta = build()["metadata"]
    assert meta["name"] == name
    assert meta["labels"]["kubetune.dev/component"] == component


def test_user_labels_reach_the_job_and_the_pods() -> None:
    spec = example_spec("lora-multinode.yaml")
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    # Kueue reads the queue label from the Job; pods carry it too.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
    tmpl = job["spec"]["template"]["metadata"]["labels"]
    assert tmpl["kueue.x-k8s.io/queue-name"] == "gpu-training"
    assert tmpl["kubetune.dev/job"] == "demo"
    assert tmpl["kubetune.dev/component"] == "train"


def test_user_labels_cannot_override_managed_labels() -> None:
    spec = make_spec(labels={"kubetune.dev/job": "other", "kubetune.dev/component": "x", "a": "b"})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    for lbl in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert lbl["kubetune.dev/job"] == "demo"
        assert lbl["kubetune.dev/component"] == "train"
        assert lbl["a"] == "b"


def test_service_selects_exactly_the_training_pods() -> None:
    spec = make_spec(labels={"team": "nlp"})
    train = b.training_job(REF, spec, PLAN, SETTINGS)
    prepare = b.prepare_job(REF, spec, SETTINGS, 80.0)
    selector = b.headless_service(REF, SETTINGS)["spec"]["selector"]
    train_labels = train["spec"]["template"]["metadata"]["labels"]
    prepare_labels = prepare["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= train_labels.items()
    assert not selector.items() <= prepare_labels.items()


def test_annotations() -> None:
    spec = make_spec(annotations={"example.com/owner": "alice"})
    job = b.training_job(REF, spec, plan_document(method="Full"), SETTINGS)
    assert job["metadata"]["annotations"] == {
        "example.com/owner": "alice",
        contract.SUSPEND_ANNOTATION: "false",
    }
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "example.com/owner": "alice",
        "kubetune.dev/plan-method": "Full",
    }
    # (A plan always has a method now: the old case of a plan without one cannot happen.)
    plain = b.training_job(REF, make_spec(suspend=True), PLAN, SETTINGS)
    assert plain["metadata"]["annotations"] == {contract.SUSPEND_ANNOTATION: "true"}


@pytest.mark.parametrize(
    ("extra", "expected", "absent"),
    [
        (
            {},
            {"backoffLimit": 3, "suspend": False},
            ["activeDeadlineSeconds", "ttlSecondsAfterFinished"],
        ),
        (
            {"activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 0},
            {"activeDeadlineSeconds": 86400},
            ["ttlSecondsAfterFinished"],
        ),
        ({"backoffLimit": 0, "suspend": True}, {"backoffLimit": 0, "suspend": True}, []),
        ({"backoffLimit": 100}, {"backoffLimit": 100}, []),
    ],
)
def test_job_spec_passthrough(
    extra: dict[str, Any], expected: dict[str, Any], absent: list[str]
) -> None:
    js = b.training_job(REF, make_spec(**extra), PLAN, SETTINGS)["spec"]
    for key, value in expected.items():
        assert js[key] == value, key
        assert type(js[key]) is type(value), key
    for key in absent:
        assert key not in js


def test_placement_fields() -> None:
    spec = make_spec(
        nodeSelector={"nvidia.com/gpu.product": "H100"},
        tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            },
        ],
        priorityClassName="high",
        serviceAccountName="trainer-sa",
    )
    for job in (
        b.training_job(REF, spec, PLAN, SETTINGS),
        b.prepare_job(REF, spec, SETTINGS, 80.0),
    ):
        ps = pod_spec(job)
        assert ps["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert ps["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            },
        ]
        assert ps["priorityClassName"] == "high"
        assert ps["serviceAccountName"] == "trainer-sa"


def test_no_placement_fields_when_unset() -> None:
    ps = pod_spec(b.training_job(REF, make_spec(), PLAN, SETTINGS))
    for key in ("nodeSelector", "tolerations", "priorityClassName", "serviceAccountName"):
        assert key not in ps


def test_secret_ref_becomes_an_hf_token_file() -> None:
    spec = make_spec(model={"secretRef": {"name": "hf-token"}})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    assert secret_file_source(job, "HF_TOKEN") == ("hf-token", "HF_TOKEN")
    # huggingface_hub's own token-file variable names the same file.
    assert env_value(job, "HF_TOKEN_PATH") == env_value(job, "HF_TOKEN_FILE")
    prepare = b.prepare_job(REF, make_spec(model={"secretRef": {"name": "hf"}}), SETTINGS, 1.0)
    assert secret_file_source(prepare, "HF_TOKEN") == ("hf", "HF_TOKEN")
    plain = env_of(b.training_job(REF, make_spec(), PLAN, SETTINGS))
    assert not {"HF_TOKEN", "HF_TOKEN_FILE", "HF_TOKEN_PATH"} & set(plain)


def test_no_secret_is_an_environment_variable() -> None:
    spec = make_spec(model={"secretRef": {"name": "hf-token"}})
    for job in (b.training_job(REF, spec, PLAN, SETTINGS), b.prepare_job(REF, spec, SETTINGS, 1)):
        assert not [e for e in container(job)["env"] if "secretKeyRef" in e.get("valueFrom", {})]


def test_training_env_paths_follow_the_storage() -> None:
    spec = example_spec("lora-multinode.yaml")
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    assert env_value(job, "KUBETUNE_MODEL_PATH") == "hf://meta-llama/Llama-2-13b-hf"
    assert env_value(job, "KUBETUNE_DATASET_PATH") == (
        "/mnt/data/training-data/contracts/train.jsonl"
    )
    assert env_value(job, "KUBETUNE_VALIDATION_PATH") == (
        "/mnt/validation/training-data/contracts/validation.jsonl"
    )
    assert env_value(job, "KUBETUNE_GENERAL_TEXT_PATH") == (
        "/mnt/general/training-data/general/wikitext-sample.txt"
    )
    assert env_value(job, "KUBETUNE_OUTPUT_PATH") == "/mnt/output/models/llama2-13b-contracts"
    assert env_value(job, "KUBETUNE_JOB_NAME") == "demo"
    assert env_value(job, "KUBETUNE_JOB_NAMESPACE") == "team-a"
    assert env_value(job, "KUBETUNE_CONFIG_DIR") == "/etc/kubetune"
    minimal = b.training_job(REF, make_spec(), PLAN, SETTINGS)
    assert "KUBETUNE_VALIDATION_PATH" not in env_of(minimal)
    assert "KUBETUNE_GENERAL_TEXT_PATH" not in env_of(minimal)


def test_every_mount_has_a_volume_and_every_path_is_mounted() -> None:
    spec = example_spec("lora-multinode.yaml")
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    volumes = pod_spec(job)["volumes"]
    names = [v["name"] for v in volumes]
    assert len(names) == len(set(names))
    mounts = container(job)["volumeMounts"]
    paths = [m["mountPath"] for m in mounts]
    assert len(paths) == len(set(paths))
    assert {m["name"] for m in mounts} == set(names)
    for var in ("KUBETUNE_DATASET_PATH", "KUBETUNE_VALIDATION_PATH", "KUBETUNE_OUTPUT_PATH"):
        value = env_value(job, var)
        assert any(value.startswith(p + "/") for p in paths), var
    output = next(m for m in mounts if m["mountPath"] == "/mnt/output/models")
    assert output["readOnly"] is False
    for m in mounts:
        if m["mountPath"].startswith(("/mnt/data", "/mnt/validation", "/mnt/general")):
            assert m["readOnly"] is True


def test_default_output_is_a_host_path_named_after_the_job() -> None:
    job = b.training_job(REF, make_spec(), PLAN, SETTINGS)
    assert env_value(job, "KUBETUNE_OUTPUT_PATH") == "/tmp/kubetune-output/team-a/demo"
    host = next(v for v in pod_spec(job)["volumes"] if "hostPath" in v)
    assert host["hostPath"] == {
        "path": "/tmp/kubetune-output/team-a/demo",
        "type": "DirectoryOrCreate",
    }
    custom = OperatorSettings(default_output_uri="pvc://outputs/{namespace}/{name}")
    job = b.training_job(REF, make_spec(), PLAN, custom)
    assert env_value(job, "KUBETUNE_OUTPUT_PATH") == "/mnt/output/outputs/team-a/demo"


def test_training_job_reads_config_and_token_from_its_siblings() -> None:
    spec = make_spec()
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    cm = b.config_map(REF, spec, PLAN, SETTINGS)
    secret = b.control_secret(REF, "tok")
    env = env_of(job)
    for var, key in (("KUBETUNE_PLAN_JSON", "plan.json"), ("KUBETUNE_SPEC_JSON", "spec.json")):
        ref = env[var]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": cm["metadata"]["name"], "key": key}
        assert key in cm["data"]
    name, key = secret_file_source(job, "KUBETUNE_CONTROL_TOKEN")
    assert name == secret["metadata"]["name"]
    assert key in secret["stringData"]
    assert "KUBETUNE_CONTROL_TOKEN_FILE" in env
    cfg = next(v for v in pod_spec(job)["volumes"] if v["name"] == "kubetune-config")
    assert cfg["configMap"]["name"] == cm["metadata"]["name"]
    assert {"name": "kubetune-config", "mountPath": "/etc/kubetune", "readOnly": True} in container(
        job
    )["volumeMounts"]


def test_ports_and_image() -> None:
    settings = OperatorSettings(
        trainer_metrics_port=9999, rendezvous_port=12345, trainer_image="a:1"
    )
    job = b.training_job(REF, make_spec(), PLAN, settings)
    c = container(job)
    assert c["image"] == "a:1"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "metrics": 9999,
        "rendezvous": 12345,
    }
    assert env_value(job, "KUBETUNE_METRICS_PORT") == "9999"
    own = b.training_job(REF, make_spec(image="registry/me:2"), PLAN, settings)
    assert container(own)["image"] == "registry/me:2"


def test_security_contexts() -> None:
    job = b.training_job(REF, make_spec(), PLAN, SETTINGS)
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True


# ---- prepare_job ------------------------------------------------------------------------------


def test_prepare_job() -> None:
    spec = example_spec("lora-multinode.yaml")
    job = b.prepare_job(REF, spec, SETTINGS, 39.5)
    assert job["metadata"]["name"] == "demo-prepare"
    c = container(job)
    assert c["name"] == "prepare"
    assert c["command"] == ["python", "-m", "kubetune.prepare"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    env = env_of(job)
    assert env["KUBETUNE_GPU_MEMORY_GIB"]["value"] == "39.5"
    assert "KUBETUNE_OUTPUT_PATH" not in env
    assert env["KUBETUNE_DATASET_PATH"]["value"] == "/mnt/data/training-data/contracts/train.jsonl"
    assert env["KUBETUNE_VALIDATION_PATH"]["value"] == (
        "/mnt/validation/training-data/contracts/validation.jsonl"
    )
    # The spec travels whole and parses back to the same spec.
    sent = json.loads(env["KUBETUNE_SPEC_JSON"]["value"])
    assert FineTuneJobSpec.model_validate(sent) == spec
    # No output volume and no GPU memory volume: it only reads.
    volumes = pod_spec(job)["volumes"]
    assert not any("output" in v["name"] for v in volumes)
    writable = {path for _, path in b.WRITABLE_DIRS}
    assert all(
        m.get("readOnly") is True for m in c["volumeMounts"] if m["mountPath"] not in writable
    )
    assert {m["name"] for m in c["volumeMounts"]} == {v["name"] for v in volumes}
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["containerName"] == c["name"]
    assert rules[0]["onExitCodes"]["values"] == [78]
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_prepare_job_reads_a_configmap_model_and_dataset() -> None:
    spec = make_spec(
        planOnly=True,
        model={"uri": "configmap://model-cfg/config.json"},
        dataset={"uri": "configmap://support-faq/train.jsonl"},
    )
    job = b.prepare_job(REF, spec, OperatorSettings(trainer_image="img:3"), 80.0)
    env = env_of(job)
    assert env["KUBETUNE_MODEL_PATH"]["value"] == "/mnt/model/configmap-model-cfg/config.json"
    assert env["KUBETUNE_DATASET_PATH"]["value"] == "/mnt/data/configmap-support-faq/train.jsonl"
    cms = sorted(v["configMap"]["name"] for v in pod_spec(job)["volumes"] if "configMap" in v)
    assert cms == ["model-cfg", "support-faq"]
    assert container(job)["image"] == "img:3"


# ---- config_map, control_secret, headless_service -------------------------------------------


@pytest.mark.parametrize(
    ("extra", "settings", "uri"),
    [
        ({}, SETTINGS, "file:///tmp/kubetune-output/team-a/demo"),
        (
            {},
            OperatorSettings(default_output_uri="pvc://out/{namespace}-{name}"),
            "pvc://out/team-a-demo",
        ),
        ({"output": {"uri": "pvc://models/mine"}}, SETTINGS, "pvc://models/mine"),
        ({"output": {}}, SETTINGS, "file:///tmp/kubetune-output/team-a/demo"),
    ],
)
def test_config_map_holds_the_resolved_spec_and_plan(
    extra: dict[str, Any], settings: OperatorSettings, uri: str
) -> None:
    spec = make_spec(**extra)
    plan = plan_document(decisions=[{"key": "why", "sentence": "because"}])
    cm = b.config_map(REF, spec, plan, settings)
    assert cm["kind"] == "ConfigMap"
    resolved = json.loads(cm["data"]["spec.json"])
    assert resolved["output"] == {"uri": uri}
    assert resolved["model"] == {"uri": "hf://Qwen/Qwen2-0.5B"}
    assert resolved["dataset"]["uri"] == "pvc://training-data/support/train.jsonl"
    assert FineTuneJobSpec.model_validate(resolved).output is not None
    assert json.loads(cm["data"]["plan.json"]) == plan.to_json()
    # The caller's spec is not changed.
    assert spec == make_spec(**extra)


def test_control_secret() -> None:
    secret = b.control_secret(REF, "abc123")
    assert secret["kind"] == "Secret"
    assert secret["type"] == "Opaque"
    assert secret["stringData"] == {"token": "abc123"}


def test_headless_service() -> None:
    svc = b.headless_service(REF, OperatorSettings(rendezvous_port=1111, trainer_metrics_port=2222))
    assert svc["kind"] == "Service"
    assert svc["metadata"]["name"] == "demo-train"
    spec = svc["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert spec["selector"] == {"kubetune.dev/job": "demo", "kubetune.dev/component": "train"}
    assert spec["ports"] == [
        {"name": "rendezvous", "port": 1111},
        {"name": "metrics", "port": 2222},
    ]


@pytest.mark.parametrize(
    "example", ["minimal.yaml", "lora-multinode.yaml", "configmap-dataset.yaml"]
)
def test_examples_build(example: str) -> None:
    spec = example_spec(example)
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    prepare = b.prepare_job(REF, spec, SETTINGS, 80.0)
    for manifest in (job, prepare):
        json.dumps(manifest)  # JSON-ready
        names = [v["name"] for v in pod_spec(manifest)["volumes"]]
        assert all(DNS_LABEL.fullmatch(n) and len(n) <= 63 for n in names), names


@pytest.mark.parametrize(
    ("previous", "path", "volume"),
    [
        (
            "pvc://runs/team/v1",
            "/mnt/previous/runs/team/v1",
            {
                "name": "previous-runs",
                "persistentVolumeClaim": {"claimName": "runs", "readOnly": True},
            },
        ),
        (
            "file:///var/kubetune/outputs/team/v1",
            "/var/kubetune/outputs/team/v1",
            {
                "name": "previous-host",
                "hostPath": {"path": "/var/kubetune/outputs/team/v1", "type": "Directory"},
            },
        ),
    ],
)
def test_model_from_is_mounted_read_only_for_the_trainer(
    previous: str, path: str, volume: dict[str, Any]
) -> None:
    """An incremental update reads the previous job's output: a claim or the hostPath the
    default file:// output wrote, mounted read-only, its path in KUBETUNE_PREVIOUS_PATH."""
    spec = make_spec(model={"uri": "hf://org/base", "from": previous})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    assert env_value(job, "KUBETUNE_PREVIOUS_PATH") == path
    assert volume in pod_spec(job)["volumes"]
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True


def test_augmentation_model_is_mounted_for_the_trainer() -> None:
    spec = make_spec(augmentation={"modelUri": "pvc://models/paraphraser", "paraphrases": 2})
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    assert (
        env_value(job, "KUBETUNE_AUGMENTATION_MODEL_PATH") == "/mnt/augmentation/models/paraphraser"
    )
    assert any(v["name"] == "augmentation-models" for v in pod_spec(job)["volumes"])


# ---- what a cluster admin's scanner asks of the pods (issue 16) ------------------------------


def test_gpu_pods_request_cpu_and_memory_from_the_plan() -> None:
    spec = make_spec(resources={"numNodes": 2, "gpusPerNode": 8})
    res = container(b.training_job(REF, spec, PLAN, SETTINGS))["resources"]
    # 4 cores per GPU process; 0.01 GiB offloaded + 1.5 GiB per process = 12.01 GiB; limit
    # 1.5 times that plus the 64 GiB /dev/shm (8 GiB per GPU); no CPU limit.
    assert res == {
        "requests": {"cpu": "32", "memory": "12299Mi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "83984Mi", "nvidia.com/gpu": "8"},
    }


def test_offloaded_states_raise_the_memory_request() -> None:
    offload = plan_document(zeroStage=3, memory={"cpuPerNodeGiB": 40.0})
    spec = make_spec(resources={"gpusPerNode": 1})
    res = container(b.training_job(REF, spec, offload, SETTINGS))["resources"]
    assert res["requests"]["memory"] == f"{int(41.5 * 1024)}Mi"


def test_a_user_memory_limit_keeps_the_plan_away_from_memory() -> None:
    spec = make_spec(
        resources={"gpusPerNode": 1, "resourcesPerNode": {"limits": {"memory": "9Gi"}}}
    )
    res = container(b.training_job(REF, spec, PLAN, SETTINGS))["resources"]
    assert res["limits"]["memory"] == "9Gi"
    assert "memory" not in res["requests"]  # the API server defaults it to the limit
    assert res["requests"]["cpu"] == "4"


@pytest.mark.parametrize("build", ["train", "prepare"])
def test_pods_have_a_read_only_root_and_writable_scratch(build: str) -> None:
    spec = make_spec()
    job = (
        b.training_job(REF, spec, PLAN, SETTINGS)
        if build == "train"
        else b.prepare_job(REF, spec, SETTINGS, 1.0)
    )
    c = container(job)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for name, path in b.WRITABLE_DIRS:
        assert mounts[path] == name
        assert volumes[name] == {"name": name, "emptyDir": {}}
    assert {"/tmp", b.TRAINER_HOME} == {path for _, path in b.WRITABLE_DIRS}


def test_the_default_trainer_image_is_the_operators_own_version() -> None:
    from kubetune import __version__

    image = container(b.training_job(REF, make_spec(), PLAN, OperatorSettings()))["image"]
    assert image == f"ghcr.io/kubetune/trainer:{__version__}"
    assert not image.endswith(":latest")


def test_a_cpu_gang_runs_processes_per_node_ranks_in_each_pod() -> None:
    """numNodes x processesPerNode ranks on CPU: torchrun starts that many workers a pod,
    and the pod asks for CPU and memory for each."""
    spec = make_spec(resources={"numNodes": 2, "gpusPerNode": 0, "processesPerNode": 2})
    assert spec.resources.processes == 2
    job = b.training_job(REF, spec, PLAN, SETTINGS)
    cmd = container(job)["command"]
    assert "--nproc-per-node=2" in cmd
    assert "--nnodes=2" in cmd
    one = b.training_job(
        REF, make_spec(resources={"numNodes": 2, "gpusPerNode": 0}), PLAN, SETTINGS
    )
    assert "--nproc-per-node=1" in container(one)["command"]
    requests = container(job)["resources"]["requests"]
    assert requests["cpu"] == "1000m"
    assert container(one)["resources"]["requests"]["cpu"] == "500m"
    # With GPUs, one process per GPU whatever else.
    gpus = b.training_job(REF, make_spec(resources={"gpusPerNode": 4}), PLAN, SETTINGS)
    assert "--nproc-per-node=4" in container(gpus)["command"]
