"""The chart's operator as a real pod: `helm install` with the built operator image into a
namespace that enforces Pod Security `restricted`; the operator runs under the chart's own
ServiceAccount, takes its Lease, passes its probes, and drives a FineTuneJob whose prepare
and training pods run the built trainer image on the real node to `Succeeded`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.node.conftest import (
    PodMemory,
    finished_ftj,
    jsonl_config_map,
    kubectl,
    operator_pod,
    output_claim,
)
from tests.waiting import wait_for

# The first test pays for the session fixture: images built if missing, imported once.
pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]


def test_the_operator_pod_runs_restricted_takes_its_lease_and_passes_its_probes(
    node_cluster: Any, node_api: Any, installed: dict[str, str]
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    ns = installed["system"]
    pod: Any = wait_for(lambda: operator_pod(core, ns), 240, "the operator pod to be Ready")
    assert pod.spec.node_name == node_cluster.node.name
    assert pod.spec.service_account_name.startswith("kubetune")
    [status] = pod.status.container_statuses
    assert status.restart_count == 0, status
    assert status.ready
    # Its own ServiceAccount, never an admin kubeconfig: the token is the only credential.
    assert not [e for e in (pod.spec.containers[0].env or []) if e.name == "KUBECONFIG"]
    coord = client.CoordinationV1Api(node_api)
    lease: Any = wait_for(
        lambda: next(
            (
                lease
                for lease in coord.list_namespaced_lease(ns).items
                if lease.spec.holder_identity and pod.metadata.name in lease.spec.holder_identity
            ),
            None,
        ),
        60,
        "the operator's Lease",
    )
    assert lease.spec.holder_identity


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


ROWS = [
    {"prompt": f"Q: what is {a} plus {b}?", "completion": f" A: {a + b}."}
    for a in range(8)
    for b in range(8)
]


def test_a_finetunejob_succeeds_on_the_real_node_with_the_built_trainer_image(
    node_cluster: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    ns = installed["jobs"]
    wait_for(lambda: operator_pod(core, installed["system"]), 240, "the operator pod")
    # The output volume: a PersistentVolume on the node's disk, bound to the job's claim
    # (the pods themselves only name the claim, as `restricted` requires).
    out_dir = output_claim(core, ns, "outputs", tmp_path_factory.mktemp("pv"))
    jsonl_config_map(core, ns, "sums", ROWS)
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "sums"},
        "spec": {
            "model": {"uri": "hf://kubetune/tiny-llama-en"},
            "dataset": {"uri": "configmap://sums/train.jsonl", "validationSplit": 0.2},
            "output": {"uri": "pvc://outputs/sums"},
            "resources": {"numNodes": 1, "gpusPerNode": 0},
            "hyperparameters": {"epochs": 2},
        },
    }
    # The training pod's resident memory over the run, from its cgroup (the pods are this
    # machine's processes), against the plan's host-memory estimate (its memory request).
    memory = PodMemory("sums-train")
    custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", ns, "finetunejobs", job)

    try:
        obj = wait_for(
            lambda: finished_ftj(custom, ns, "sums"), 900, "the FineTuneJob to finish", interval=2
        )
    finally:
        peak = memory.stop()
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds.get("Succeeded", {}).get("status") == "True", json.dumps(obj["status"])[:3000]
    pods = core.list_namespaced_pod(ns).items
    assert pods, "no pods"
    assert all(p.spec.node_name == node_cluster.node.name for p in pods)
    [trainer] = [p for p in pods if p.metadata.name.startswith("sums-train")]
    resources = trainer.spec.containers[0].resources
    request = _bytes(resources.requests["memory"])
    limit = _bytes(resources.limits["memory"])
    ratio = f"peak {peak / 2**30:.2f} GiB, estimate (request) {request / 2**30:.2f} GiB"
    print(f"training pod memory: {ratio}, limit {limit / 2**30:.2f} GiB")
    assert 0 < peak <= limit, ratio
    # The estimate covers what the run used (no OOM kill at the default limit) without
    # asking for several times more than it needs.
    assert peak <= request, ratio
    assert peak >= request / 4, ratio
    # The report and the weights are on the volume.
    assert (out_dir / "sums" / "report.md").is_file()
    assert (out_dir / "sums" / "final" / "model.safetensors").is_file()
    # `kubectl get ftj` shows the columns filled.
    table = kubectl(node_cluster, "-n", ns, "get", "ftj", "sums")
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "STATUS", "METHOD", "PROGRESS"], header
    assert row.split()[1] == "Succeeded", row
    assert row.split()[3] == "100", row  # the Progress column is a percentage number
    # The training pod's log is the trainer's console lines (kubectl logs via the kubelet).
    train = [p for p in pods if "train" in p.metadata.name]
    logs = kubectl(node_cluster, "-n", ns, "logs", train[0].metadata.name)
    assert "eval @ step" in logs, logs[-2000:]


def test_a_training_pod_over_its_memory_limit_is_oom_killed_and_the_job_says_what_to_change(
    node_cluster: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The kernel kills a training pod whose memory limit is below what the run needs (the
    limit set in resourcesPerNode, as a user might): the FineTuneJob ends Failed/OOMKilled,
    naming the limit and what to change, not a generic failure, and is not retried."""
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    ns = installed["jobs"]
    wait_for(lambda: operator_pod(core, installed["system"]), 240, "the operator pod")
    output_claim(core, ns, "oom-out", tmp_path_factory.mktemp("oom-pv"))
    jsonl_config_map(core, ns, "sums-oom", ROWS)
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "oom"},
        "spec": {
            "model": {"uri": "hf://kubetune/tiny-llama-en"},
            "dataset": {"uri": "configmap://sums-oom/train.jsonl", "validationSplit": 0.2},
            "output": {"uri": "pvc://oom-out/oom"},
            "resources": {
                "numNodes": 1,
                "gpusPerNode": 0,
                # torch and the trainer's libraries alone need more than this.
                "resourcesPerNode": {"limits": {"memory": "200Mi"}},
            },
            "backoffLimit": 0,
            "hyperparameters": {"epochs": 1},
        },
    }
    custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", ns, "finetunejobs", job)

    obj = wait_for(
        lambda: finished_ftj(custom, ns, "oom"), 600, "the FineTuneJob to fail", interval=2
    )
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds.get("Failed", {}).get("status") == "True", conds
    assert conds["Failed"]["reason"] == "OOMKilled", conds["Failed"]
    message = conds["Failed"]["message"]
    assert "memory limit 200Mi" in message, message
    assert "microBatchSize" in message, message
    assert "resourcesPerNode" in message, message
    pods = core.list_namespaced_pod(ns, label_selector="job-name=oom-train").items
    terminated = [
        cs.state.terminated
        for p in pods
        for cs in p.status.container_statuses or []
        if cs.state.terminated is not None
    ]
    assert [t.reason for t in terminated] == ["OOMKilled"], terminated
