"""The chart's operator as a real pod: `helm install` with the built operator image into a
namespace that enforces Pod Security `restricted`; the operator runs under the chart's own
ServiceAccount, takes its Lease, passes its probes, and drives a FineTuneJob whose prepare
and training pods run the built trainer image on the real node to `Succeeded`."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_for

# The first test pays for the session fixture: images built if missing, imported once.
pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def _split_ref(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


def _kubectl(cluster: Any, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        [str(cluster.bins.kubectl), f"--kubeconfig={cluster.layout.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def installed(
    node_cluster: Any, node_api: Any, image_refs: dict[str, str]
) -> Iterator[dict[str, str]]:
    """The chart installed with the built images; the operator watches `jobs_ns`."""
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    suffix = uuid.uuid4().hex[:6]
    system_ns, jobs_ns = f"kubetune-system-{suffix}", f"ml-{suffix}"
    for ns in (system_ns, jobs_ns):
        core.create_namespace({"metadata": {"name": ns, "labels": RESTRICTED}})
    op_repo, op_tag = _split_ref(image_refs["operator"])
    tr_repo, tr_tag = _split_ref(image_refs["trainer"])
    helm = [str(node_cluster.bins.helm), f"--kubeconfig={node_cluster.layout.kubeconfig}"]
    result = subprocess.run(
        [
            *helm,
            "install",
            "kubetune",
            str(CHART),
            "--namespace",
            system_ns,
            "--set",
            f"image.repository={op_repo}",
            "--set",
            f"image.tag={op_tag}",
            "--set",
            f"trainer.image.repository={tr_repo}",
            "--set",
            f"trainer.image.tag={tr_tag}",
            "--set",
            f"rbac.jobNamespaces={{{jobs_ns}}}",
            "--set",
            "operator.syncIntervalSeconds=5",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    yield {"system": system_ns, "jobs": jobs_ns}
    subprocess.run([*helm, "uninstall", "kubetune", "--namespace", system_ns], timeout=120)
    for ns in (system_ns, jobs_ns):
        core.delete_namespace(ns)


def _operator_pod(core: Any, ns: str) -> Any:
    pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/name=kubetune").items
    ready = [
        p
        for p in pods
        if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    ]
    return ready[0] if ready else None


def test_the_operator_pod_runs_restricted_takes_its_lease_and_passes_its_probes(
    node_cluster: Any, node_api: Any, installed: dict[str, str]
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    ns = installed["system"]
    pod: Any = wait_for(lambda: _operator_pod(core, ns), 240, "the operator pod to be Ready")
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
    wait_for(lambda: _operator_pod(core, installed["system"]), 240, "the operator pod")
    # The output volume: a PersistentVolume on the node's disk, bound to the job's claim
    # (the pods themselves only name the claim, as `restricted` requires).
    out_dir = tmp_path_factory.mktemp("pv")
    os.chmod(out_dir, 0o777)
    pv = f"out-{ns}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "5Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(out_dir), "type": "Directory"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": "outputs"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "5Gi"}},
            },
        },
    )
    core.create_namespaced_config_map(
        ns,
        {
            "metadata": {"name": "sums"},
            "data": {"train.jsonl": "\n".join(json.dumps(r) for r in ROWS) + "\n"},
        },
    )
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
    custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", ns, "finetunejobs", job)

    def finished() -> Any:
        obj = custom.get_namespaced_custom_object(
            "kubetune.dev", "v1alpha1", ns, "finetunejobs", "sums"
        )
        conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        done = [t for t in ("Succeeded", "Failed") if conds.get(t, {}).get("status") == "True"]
        return obj if done else None

    obj = wait_for(finished, 900, "the FineTuneJob to finish", interval=2)
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds.get("Succeeded", {}).get("status") == "True", json.dumps(obj["status"])[:3000]
    pods = core.list_namespaced_pod(ns).items
    assert pods, "no pods"
    assert all(p.spec.node_name == node_cluster.node.name for p in pods)
    # The report and the weights are on the volume.
    assert (out_dir / "sums" / "report.md").is_file()
    assert (out_dir / "sums" / "final" / "model.safetensors").is_file()
    # `kubectl get ftj` shows the columns filled.
    table = _kubectl(node_cluster, "-n", ns, "get", "ftj", "sums")
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "STATUS", "METHOD", "PROGRESS"], header
    assert row.split()[1] == "Succeeded", row
    assert row.split()[3] == "100", row  # the Progress column is a percentage number
    # The training pod's log is the trainer's console lines (kubectl logs via the kubelet).
    train = [p for p in pods if "train" in p.metadata.name]
    logs = _kubectl(node_cluster, "-n", ns, "logs", train[0].metadata.name)
    assert "eval @ step" in logs, logs[-2000:]
