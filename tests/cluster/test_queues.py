"""Queues: a real Kueue (built by `make tools`, its webhooks on 127.0.0.1) admits, holds,
preempts and readmits FineTuneJobs' training Jobs on kwok GPU nodes, with the queues of
examples/queues/kueue-queues.yaml (docs/operator.md, "Queues")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.contract import KUEUE_GROUP, KUEUE_VERSION, PRIORITY_LABEL, QUEUE_LABEL
from tests.cluster.test_operator import (
    EXAMPLES,
    OperatorProcess,
    _cond,
    _create,
    _events,
    _ftj,
    _get,
    _kubectl,
    _wait_cond,
    running_operator,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

QUEUES = EXAMPLES / "queues" / "kueue-queues.yaml"
LONG_RUN = {"kubetune.dev/sim-run-ms": "600000"}


@pytest.fixture(scope="module")
def queue_operator(dev_cluster: Any, crd_installed: str) -> Iterator[OperatorProcess]:
    yield from running_operator(str(dev_cluster.layout.kubeconfig))


@pytest.fixture(scope="module")
def kueue(dev_cluster: Any, queue_operator: OperatorProcess) -> Iterator[Any]:
    """Kueue on the session's cluster for this module only; stopped and removed after."""
    dev_cluster.start_kueue(timeout=180)
    try:
        yield dev_cluster
    finally:
        dev_cluster.stop_kueue()


def _apply_queues(api: dict[str, Any], ns: str, gpus: int = 8) -> str:
    """examples/queues/kueue-queues.yaml with its ClusterQueue made this test's (its own name and
    `gpus` of quota) and its LocalQueue in `ns`; returns the ClusterQueue's name."""
    custom = api["custom"]
    cq_name = f"{ns}-cq"
    for doc in yaml.safe_load_all(QUEUES.read_text()):
        kind = doc["kind"]
        plural = kind.lower() + ("es" if kind.endswith("s") else "s")
        if kind == "ClusterQueue":
            doc["metadata"]["name"] = cq_name
            for res in doc["spec"]["resourceGroups"][0]["flavors"][0]["resources"]:
                if res["name"] == "nvidia.com/gpu":
                    res["nominalQuota"] = gpus
        if kind == "LocalQueue":
            doc["metadata"]["namespace"] = ns
            doc["spec"]["clusterQueue"] = cq_name

        def create(doc: dict[str, Any] = doc, plural: str = plural) -> bool:
            try:
                if doc["metadata"].get("namespace"):
                    custom.create_namespaced_custom_object(
                        KUEUE_GROUP, KUEUE_VERSION, ns, plural, doc
                    )
                else:
                    custom.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, doc)
            except ApiException as exc:
                if exc.status == 409:
                    return True
                # A CRD just Established may still 404 a moment; a webhook just registered
                # may answer 5xx.
                if exc.status == 404 or exc.status >= 500:
                    return False
                raise
            return True

        wait_for(create, 30, f"{kind} {doc['metadata']['name']} created")

    def active() -> bool:
        cq = custom.get_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", cq_name)
        return any(
            c["type"] == "Active" and c["status"] == "True"
            for c in (cq.get("status") or {}).get("conditions") or []
        )

    wait_for(active, 60, f"ClusterQueue {cq_name} Active")
    return cq_name


def _queued_job(name: str, queue: str = "gpu", priority: str | None = None, **spec: Any) -> Any:
    labels = {QUEUE_LABEL: queue}
    if priority:
        labels[PRIORITY_LABEL] = priority
    spec.setdefault("resources", {"numNodes": 1, "gpusPerNode": 8})
    return _ftj(name, labels=labels, **spec)


def _train_pods(api: dict[str, Any], ns: str, name: str) -> list[Any]:
    pods = api["core"].list_namespaced_pod(ns, label_selector=f"job-name={name}-train").items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def _workloads(api: dict[str, Any], ns: str) -> list[dict[str, Any]]:
    found = api["custom"].list_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, ns, "workloads")
    return list(found["items"])


def _admitted(obj: dict[str, Any]) -> dict[str, Any]:
    found = _cond(obj, "Admitted")
    assert found is not None, f"no Admitted condition: {obj.get('status')}"
    return found


def _admitted_reason(api: dict[str, Any], ns: str, name: str) -> str | None:
    c = _cond(_get(api, ns, name), "Admitted")
    return None if c is None else str(c["reason"])


def _wait_admitted_reason(
    api: dict[str, Any], ns: str, name: str, reason: str, timeout: float = 90
) -> dict[str, Any]:
    wait_for(
        lambda: _admitted_reason(api, ns, name) == reason,
        timeout,
        f"{name}: Admitted reason {reason} (status: {(_get(api, ns, name).get('status') or {})})",
    )
    return _get(api, ns, name)


def test_without_kueue_a_queue_label_is_passed_through_and_the_job_runs(
    dev_cluster: Any, queue_operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    ext = __import__("kubernetes").client.ApiextensionsV1Api(dev_cluster.api_client())
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    if "workloads.kueue.x-k8s.io" in names:
        pytest.skip("Kueue's CRDs are installed on this cluster")
    _create(api, namespace, _queued_job("nokueue", annotations={"kubetune.dev/sim-run-ms": "500"}))
    _wait_cond(api, namespace, "nokueue", "Succeeded", timeout=120)
    obj = _get(api, namespace, "nokueue")
    admitted = _cond(obj, "Admitted")
    assert admitted is not None
    assert admitted["reason"] == "KueueNotInstalled"
    assert "started without a queue" in admitted["message"]
    assert "KueueNotInstalled" in _events(api, namespace, "nokueue")


def test_a_queued_job_waits_for_quota_then_is_admitted_and_runs(
    kueue: Any, api: dict[str, Any], namespace: str
) -> None:
    _apply_queues(api, namespace, gpus=8)
    _create(api, namespace, _queued_job("first", annotations={"kubetune.dev/sim-run-ms": "25000"}))
    _wait_cond(api, namespace, "first", "Running", timeout=120)
    train = api["batch"].read_namespaced_job("first-train", namespace)
    assert train.metadata.labels[QUEUE_LABEL] == "gpu"
    # Kueue's flavor put its node selector on the admitted pods.
    (pod,) = _train_pods(api, namespace, "first")
    assert pod.spec.node_selector["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    first = _get(api, namespace, "first")
    assert first["status"]["queue"]["clusterQueue"] == f"{namespace}-cq"
    assert _admitted(first)["reason"] == "Admitted"

    # The second one waits for the first one's GPUs: Queued, no pods, its Job suspended.
    _create(api, namespace, _queued_job("second", annotations={"kubetune.dev/sim-run-ms": "500"}))
    _wait_admitted_reason(api, namespace, "second", "Queued")
    wait_for(  # Kueue's words arrive once its scheduler has tried the Workload
        lambda: "message" in (_get(api, namespace, "second")["status"].get("queue") or {}),
        60,
        "second: Kueue's message in status.queue",
    )
    second = _get(api, namespace, "second")
    assert second["status"]["state"] == "Queued"
    assert second["status"]["queue"]["name"] == "gpu"
    assert "insufficient unused quota for nvidia.com/gpu" in second["status"]["queue"]["message"]
    assert api["batch"].read_namespaced_job("second-train", namespace).spec.suspend is True
    assert _train_pods(api, namespace, "second") == []
    wide = _kubectl(kueue, "get", "ftj", "-n", namespace, "-o", "wide")
    header, *rows = wide.splitlines()
    assert "QUEUE" in header.split()
    assert any(r.split()[:2] == ["second", "Queued"] and "gpu" in r.split() for r in rows)

    # A third one queues behind the second: each says its place, from Kueue's visibility
    # API (through the API server's aggregation layer).
    _create(api, namespace, _queued_job("third", annotations={"kubetune.dev/sim-run-ms": "500"}))
    cq = f"{namespace}-cq"

    def place(name: str) -> tuple[int, int] | None:
        queue = _get(api, namespace, name).get("status", {}).get("queue") or {}
        if "positionInClusterQueue" not in queue:
            return None
        return int(queue["positionInLocalQueue"]), int(queue["positionInClusterQueue"])

    wait_for(lambda: place("third") == (1, 1), 60, "third: 1 ahead of it")
    assert place("second") == (0, 0)
    assert (
        f"(next in line for ClusterQueue {cq})"
        in _admitted(_get(api, namespace, "second"))["message"]
    )
    third_says = _admitted(_get(api, namespace, "third"))["message"]
    assert f"(1 ahead of it in LocalQueue 'gpu', 1 ahead of it in ClusterQueue {cq})" in third_says

    _wait_cond(api, namespace, "first", "Succeeded", timeout=120)
    _wait_cond(api, namespace, "second", "Succeeded", timeout=120)
    _wait_cond(api, namespace, "third", "Succeeded", timeout=120)
    reasons = _events(api, namespace, "second")
    assert {"Queued", "Admitted", "Completed"} <= set(reasons)
    # Only the training Jobs are Kueue's: the prepare step never takes GPU quota.
    owners = {w["metadata"]["ownerReferences"][0]["name"] for w in _workloads(api, namespace)}
    assert owners == {"first-train", "second-train", "third-train"}


def test_the_chart_role_reads_positions_and_a_role_without_it_is_refused(
    kueue: Any, api: dict[str, Any], namespace: str
) -> None:
    """The visibility API authorises through the API server (a SubjectAccessReview for the
    user the aggregation layer names): the chart's rule is what the operator's account needs."""
    from kubernetes import client

    from kubetune.operator.k8s import Kube
    from tests.cluster.test_helm import template

    _apply_queues(api, namespace, gpus=8)
    _create(api, namespace, _queued_job("hold", annotations=LONG_RUN))
    _wait_cond(api, namespace, "hold", "Running", timeout=120)
    _create(api, namespace, _queued_job("wait", annotations=LONG_RUN))
    _wait_admitted_reason(api, namespace, "wait", "Queued")
    (role,) = [
        d
        for d in template()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-jobs")
    ]
    rbac = client.RbacAuthorizationV1Api(kueue.api_client())
    core = api["core"]
    tokens = {}
    for account, rules in (("chart", role["rules"]), ("bare", [])):
        core.create_namespaced_service_account(namespace, {"metadata": {"name": account}})
        rbac.create_namespaced_role(namespace, {"metadata": {"name": account}, "rules": rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": account},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": account,
                },
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            },
        )
        tokens[account] = core.create_namespaced_service_account_token(
            account, namespace, {"spec": {"expirationSeconds": 600}}
        ).status.token

    def kube_as(account: str) -> Kube:
        config = client.Configuration()
        admin = kueue.api_client().configuration
        config.host, config.ssl_ca_cert = admin.host, admin.ssl_ca_cert
        config.api_key = {"authorization": f"Bearer {tokens[account]}"}
        return Kube(client.ApiClient(config))

    def positions() -> list[tuple[str, int]] | None:
        got = kube_as("chart").pending_workloads(namespace, "gpu")
        return (
            None
            if got is None
            else [
                (w["metadata"]["ownerReferences"][0]["name"], w["positionInLocalQueue"])
                for w in got
            ]
        )

    wait_for(lambda: positions() == [("wait-train", 0)], 60, "the chart's role to read it")
    assert kube_as("bare").pending_workloads(namespace, "gpu") is None  # 403: not known


def test_a_multi_node_job_larger_than_the_quota_is_never_half_started(
    kueue: Any, api: dict[str, Any], namespace: str
) -> None:
    _apply_queues(api, namespace, gpus=8)  # one node's GPUs; the job asks for two nodes'
    _create(api, namespace, _queued_job("big", resources={"numNodes": 2, "gpusPerNode": 8}))
    obj = _wait_admitted_reason(api, namespace, "big", "Inadmissible")
    assert obj["status"]["state"] == "Queued"
    message = _admitted(obj)["message"]
    assert "can never be admitted" in message
    assert "> maximum capacity" in message
    time.sleep(5)
    assert _train_pods(api, namespace, "big") == []
    assert api["batch"].read_namespaced_job("big-train", namespace).spec.suspend is True
    assert "Inadmissible" in _events(api, namespace, "big")


def test_a_queue_label_naming_no_local_queue_says_so(
    kueue: Any, api: dict[str, Any], namespace: str
) -> None:
    _apply_queues(api, namespace)
    _create(api, namespace, _queued_job("lost", queue="no-such-queue"))
    obj = _wait_admitted_reason(api, namespace, "lost", "QueueNotFound")
    message = _admitted(obj)["message"]
    assert f"LocalQueue 'no-such-queue' does not exist in namespace {namespace}" in message
    assert obj["status"]["state"] == "Queued"
    assert _train_pods(api, namespace, "lost") == []


def test_a_higher_priority_job_preempts_and_the_preempted_one_resumes_without_a_failure(
    kueue: Any, api: dict[str, Any], namespace: str
) -> None:
    _apply_queues(api, namespace, gpus=8)
    _create(api, namespace, _queued_job("low", priority="kubetune-low", annotations=LONG_RUN))
    _wait_cond(api, namespace, "low", "Running", timeout=120)
    _create(
        api,
        namespace,
        _queued_job(
            "high", priority="kubetune-high", annotations={"kubetune.dev/sim-run-ms": "4000"}
        ),
    )
    low = _wait_admitted_reason(api, namespace, "low", "Preempted", timeout=120)
    assert low["status"]["state"] == "Queued"
    assert _cond(low, "Failed") is None
    wait_for(lambda: _train_pods(api, namespace, "low") == [], 60, "low's pods to stop")
    assert api["batch"].read_namespaced_job("low-train", namespace).spec.suspend is True
    _wait_cond(api, namespace, "high", "Succeeded", timeout=120)

    # Readmitted once the GPUs are free: it runs again, and nothing counts as a failure.
    _wait_cond(api, namespace, "low", "Running", timeout=120)
    low = _get(api, namespace, "low")
    assert low["status"]["state"] == "Running"
    assert _admitted(low)["reason"] == "Admitted"
    assert _cond(low, "Failed") is None
    job = api["batch"].read_namespaced_job("low-train", namespace)
    assert not job.status.failed
    assert {"Preempted", "Admitted"} <= set(_events(api, namespace, "low"))
