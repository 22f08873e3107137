"""Kueue on the real node, with the chart's operator and the built trainer image: a
higher-priority FineTuneJob preempts a running one; the preempted one's pod saves a
checkpoint on SIGTERM and stops, the job waits Queued (Admitted reason Preempted) with no
failure counted, and when Kueue readmits it the run resumes from that checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.contract import KUEUE_GROUP, KUEUE_VERSION, PRIORITY_LABEL, QUEUE_LABEL
from tests.node.conftest import finished_ftj, jsonl_config_map, operator_pod, output_claim
from tests.node.test_multinode import (
    GROUP,
    PLURAL,
    ROWS,
    VERSION,
    _checkpoints,
    _conditions,
    _ftj,
    _pods,
    _resumed_from,
    _trained_past,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "queues" / "kueue-queues.yaml"


@pytest.fixture(scope="module")
def node_kueue(node_cluster: Any, installed: dict[str, str]) -> Iterator[Any]:
    """Kueue on the real node's cluster for this module; stopped and removed after (the
    other node tests run without it)."""
    node_cluster.start_kueue(timeout=180)
    try:
        yield node_cluster
    finally:
        node_cluster.stop_kueue()


def _create(custom: Any, doc: dict[str, Any], ns: str | None = None) -> None:
    kind = str(doc["kind"])
    plural = kind.lower() + ("es" if kind.endswith("s") else "s")

    def once() -> bool:
        try:
            if ns:
                custom.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, ns, plural, doc)
            else:
                custom.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, doc)
        except ApiException as exc:
            if exc.status == 409:
                return True
            if exc.status == 404 or exc.status >= 500:  # CRD or webhook just registered
                return False
            raise
        return True

    wait_for(once, 60, f"{doc['kind']} {doc['metadata']['name']} created")


def _cpu_queue(custom: Any, ns: str) -> None:
    """Quota for one training pod at a time (each asks for 500m CPU, one process), lower
    priority preempted within it; the example file's two priorities."""
    for doc in yaml.safe_load_all(EXAMPLES.read_text()):
        if doc["kind"] == "WorkloadPriorityClass":
            _create(custom, doc)
    _create(
        custom,
        {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}",
            "kind": "ResourceFlavor",
            "metadata": {"name": f"{ns}-node"},
            "spec": {},
        },
    )
    _create(
        custom,
        {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}",
            "kind": "ClusterQueue",
            "metadata": {"name": f"{ns}-cq"},
            "spec": {
                "namespaceSelector": {},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": f"{ns}-node",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "750m"},
                                    {"name": "memory", "nominalQuota": "64Gi"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    )
    _create(
        custom,
        {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": "cpu", "namespace": ns},
            "spec": {"clusterQueue": f"{ns}-cq"},
        },
        ns,
    )


def _job(name: str, priority: str, epochs: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://kubetune/tiny-llama-en"},
            "dataset": {"uri": "configmap://queued-rows/train.jsonl", "validationSplit": 0.2},
            "output": {"uri": f"pvc://queue-out/{name}"},
            "method": {"type": "Full"},
            "resources": {"numNodes": 1, "gpusPerNode": 0},
            "labels": {QUEUE_LABEL: "cpu", PRIORITY_LABEL: priority},
            "hyperparameters": {"epochs": epochs, "evalSteps": 4, "microBatchSize": 4},
            "earlyStopping": {"enabled": False},
            "diagnostics": {"enabled": False},
        },
    }


def _admitted(custom: Any, ns: str, name: str) -> dict[str, Any]:
    return _conditions(_ftj(custom, ns, name)).get("Admitted") or {}


def _live(core: Any, ns: str, job: str) -> list[Any]:
    return [p for p in _pods(core, ns, job) if p.status.phase in ("Pending", "Running")]


def test_a_preempted_job_checkpoints_waits_queued_and_resumes_from_its_checkpoint(
    node_kueue: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    ns = installed["jobs"]
    wait_for(lambda: operator_pod(core, installed["system"]), 240, "the operator pod")
    volume = output_claim(core, ns, "queue-out", tmp_path_factory.mktemp("queue-pv"))
    jsonl_config_map(core, ns, "queued-rows", ROWS)
    _cpu_queue(custom, ns)

    # The low-priority job is admitted (the queue is empty) and trains past a checkpoint.
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, _job("low", "kubetune-low", 60)
    )
    out = volume / "low"
    wait_for(lambda: _admitted(custom, ns, "low").get("reason") == "Admitted", 300, "low admitted")
    wait_for(lambda: _checkpoints(out), 600, "low's first checkpoint", interval=2)
    first = _checkpoints(out)[-1]
    wait_for(lambda: _trained_past(out, first), 300, "low trains past it", interval=2)
    (low_pod,) = _live(core, ns, "low-train")

    # The high-priority one needs the same CPU: Kueue preempts low, whose pod saves on
    # SIGTERM and stops; low waits Queued, with no failure counted.
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, _job("high", "kubetune-high", 1)
    )
    wait_for(
        lambda: _admitted(custom, ns, "low").get("reason") == "Preempted", 300, "low preempted"
    )
    wait_for(lambda: not _live(core, ns, "low-train"), 300, "low's pod to stop", interval=2)
    preempted_at = _checkpoints(out)[-1]
    assert preempted_at > first, (preempted_at, first)
    low = _ftj(custom, ns, "low")
    assert low["status"]["state"] == "Queued", low["status"]
    assert "Failed" not in _conditions(low), low["status"]
    assert not (low["status"].get("restarts") or {}).get("count"), low["status"]
    assert "evicted by Kueue (Preempted" in _conditions(low)["Admitted"]["message"]

    # high runs and finishes; then Kueue readmits low, which resumes from that checkpoint.
    high = wait_for(lambda: finished_ftj(custom, ns, "high"), 900, "high to finish", interval=2)
    assert _conditions(high)["Succeeded"]["status"] == "True", json.dumps(high["status"])[:3000]
    wait_for(
        lambda: _admitted(custom, ns, "low").get("reason") == "Admitted", 300, "low readmitted"
    )
    new_pods = wait_for(
        lambda: [p for p in _live(core, ns, "low-train") if p.metadata.uid != low_pod.metadata.uid],
        300,
        "low's new pod",
    )
    resumed = wait_for(
        lambda: _resumed_from(core, ns, new_pods[0].metadata.name),
        600,
        "low to resume",
        interval=2,
    )
    assert resumed == preempted_at, (resumed, preempted_at)

    # Ended by the stop request once it trains again: Succeeded, and still no failure.
    wait_for(lambda: _trained_past(out, resumed), 600, "low trains after resuming", interval=2)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "low", {"spec": {"stopRequested": True}}
    )
    low = wait_for(lambda: finished_ftj(custom, ns, "low"), 900, "low to finish", interval=2)
    conds = _conditions(low)
    assert conds["Succeeded"]["status"] == "True", json.dumps(low["status"])[:3000]
    assert not (low["status"].get("restarts") or {}).get("count"), low["status"]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["resumedFrom"].endswith(f"checkpoint-{preempted_at}")
    job = client.BatchV1Api(node_api).read_namespaced_job("low-train", ns)
    assert not job.status.failed, job.status
    events = {
        e.reason
        for e in core.list_namespaced_event(
            ns, field_selector="involvedObject.kind=FineTuneJob,involvedObject.name=low"
        ).items
    }
    assert {"Admitted", "Preempted"} <= events, events
