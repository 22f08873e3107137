"""The local control plane is a real Kubernetes: version, auth, scheduling onto simulated
GPU nodes, Job completion and failure, garbage collection, namespace deletion."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.binaries import read_versions
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def _job(name: str, **pod_extra: Any) -> dict[str, Any]:
    labels = pod_extra.pop("labels", {})
    annotations = pod_extra.pop("annotations", {})
    container = {"name": "main", "image": "busybox", "command": ["true"]}
    container.update(pod_extra.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": pod_extra.pop("backoffLimit", 0),
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"restartPolicy": "Never", "containers": [container], **pod_extra},
            },
        },
    }


def _job_condition(batch: Any, ns: str, name: str) -> str | None:
    job = batch.read_namespaced_job(name, ns)
    for cond in job.status.conditions or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return str(cond.type)
    return None


def _pods(core: Any, ns: str, selector: str) -> list[Any]:
    return list(core.list_namespaced_pod(ns, label_selector=selector).items)


def test_api_server_reports_the_version_it_was_built_from(api_client: Any) -> None:
    info = client.VersionApi(api_client).get_code()
    assert info.git_version == read_versions()["K8S_VERSION"]


def test_rbac_is_enforced_for_service_accounts(api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    token = core.create_namespaced_service_account_token(
        "default", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = api_client.configuration.host
    cfg.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    as_sa = client.CoreV1Api(client.ApiClient(cfg))
    with pytest.raises(ApiException) as err:
        as_sa.list_namespaced_secret(namespace)
    assert err.value.status == 403  # authenticated (a token it signed), but not authorized


def test_gpu_nodes_are_ready_with_gpu_capacity_and_labels(
    dev_cluster: Any, api_client: Any
) -> None:
    nodes = {n.metadata.name: n for n in client.CoreV1Api(api_client).list_node().items}
    assert len(dev_cluster.state.gpu_nodes) == 4
    for name in dev_cluster.state.gpu_nodes:
        node = nodes[name]
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready
        assert ready[0].status == "True"
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node.metadata.labels["nvidia.com/gpu.memory"] == "81559"


def test_kubectl_get_nodes_shows_the_gpu_nodes(dev_cluster: Any) -> None:
    out = subprocess.run(
        [
            str(dev_cluster.bins.kubectl),
            f"--kubeconfig={dev_cluster.layout.kubeconfig}",
            "get",
            "nodes",
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    names = {n["metadata"]["name"]: n for n in json.loads(out)["items"]}
    assert set(dev_cluster.state.gpu_nodes) <= set(names)
    assert names["gpu-node-0"]["status"]["capacity"]["nvidia.com/gpu"] == "8"


def test_gpu_job_is_scheduled_on_a_gpu_node_and_succeeds(api_client: Any, namespace: str) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    job = _job(
        "gpu", labels={"app": "gpu"}, container={"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    )
    batch.create_namespaced_job(namespace, job)
    assert wait_for(lambda: _job_condition(batch, namespace, "gpu"), 60, "job gpu") == "Complete"
    (pod,) = _pods(core, namespace, "app=gpu")
    assert pod.spec.node_name.startswith("gpu-node-")
    assert pod.status.phase == "Succeeded"


def test_gpu_request_beyond_any_node_stays_unschedulable(api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "too-big"},
            "spec": {
                "containers": [
                    {"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "9"}}}
                ]
            },
        },
    )

    def unschedulable() -> bool:
        pod = core.read_namespaced_pod("too-big", namespace)
        return any(
            c.type == "PodScheduled" and c.reason == "Unschedulable"
            for c in pod.status.conditions or []
        )

    wait_for(unschedulable, 30, "the scheduler to mark the 9-GPU pod Unschedulable")


def test_pod_labelled_to_fail_ends_failed_with_its_exit_code(
    api_client: Any, namespace: str
) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    job = _job(
        "fails",
        labels={"app": "fails", "kubetune.dev/sim-exit-code": "3"},
        annotations={"kubetune.dev/sim-message": "simulated crash"},
    )
    batch.create_namespaced_job(namespace, job)
    assert wait_for(lambda: _job_condition(batch, namespace, "fails"), 60, "job") == "Failed"
    (pod,) = _pods(core, namespace, "app=fails")
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 3
    assert term.message == "simulated crash"


def test_deleting_an_owner_garbage_collects_its_children(api_client: Any, namespace: str) -> None:
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                },
            },
        },
    )
    wait_for(
        lambda: (
            [p for p in _pods(core, namespace, "app=web") if p.status.phase == "Running"]
            if len(_pods(core, namespace, "app=web")) == 2
            else None
        ),
        60,
        "2 running pods of the deployment",
    )
    assert len(apps.list_namespaced_replica_set(namespace).items) == 1
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not _pods(core, namespace, "app=web")
        ),
        60,
        "garbage collection",
    )


def test_namespace_deletion_completes(api_client: Any) -> None:
    core = client.CoreV1Api(api_client)
    ns = "doomed"
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}, "data": {"a": "b"}})
    core.delete_namespace(ns)

    def gone() -> bool:
        try:
            core.read_namespace(ns)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(gone, 90, "namespace deletion to finish")
