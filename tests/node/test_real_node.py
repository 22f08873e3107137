"""The real node: Ready with a bridge address, runs pods from the locally built images to
Completed, serves `kubectl logs`, gives pods the cluster DNS only, and is fenced."""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any

import pytest

from tests.waiting import wait_for

# The first test pays for the session fixture: images built if missing, imported once.
pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]


def _pod(name: str, image: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", script],
                }
            ],
            **spec,
        },
    }


def _finished(core: Any, ns: str, name: str) -> Any:
    pod = core.read_namespaced_pod(name, ns)
    return pod if pod.status.phase in ("Succeeded", "Failed") else None


def _run_to_end(core: Any, ns: str, body: dict[str, Any], timeout: float = 120) -> Any:
    core.create_namespaced_pod(ns, body)
    name = body["metadata"]["name"]
    return wait_for(lambda: _finished(core, ns, name), timeout, f"pod {name} to finish")


def test_node_is_ready_with_its_bridge_address(node_cluster: Any, node_api: Any) -> None:
    from kubernetes import client

    node = client.CoreV1Api(node_api).read_node(node_cluster.node.name)
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert ready[0].status == "True", ready
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == node_cluster.node.net.node_ip
    assert not ipaddress.ip_address(addresses["InternalIP"]).is_loopback
    assert node.metadata.labels["kubetune.dev/node-kind"] == "real"
    assert node.status.node_info.container_runtime_version.startswith("containerd://")


def test_pod_runs_to_completed_with_a_pod_ip_and_logs(
    node_cluster: Any, node_api: Any, node_namespace: str, image_refs: dict[str, str]
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    script = "import os, socket; print('hello from', socket.gethostname(), 'uid', os.getuid())"
    pod = _run_to_end(core, node_namespace, _pod("hello", image_refs["operator"], script))
    assert pod.status.phase == "Succeeded", pod.status
    assert pod.status.container_statuses[0].state.terminated.reason == "Completed"
    pod_ip = ipaddress.ip_address(pod.status.pod_ip)
    assert pod_ip in ipaddress.ip_network(node_cluster.node.net.pod_cidr)
    # `kubectl logs` goes API server -> kubelet on the node's address.
    kubectl = [str(node_cluster.bins.kubectl), f"--kubeconfig={node_cluster.layout.kubeconfig}"]
    logs = subprocess.run(
        [*kubectl, "-n", node_namespace, "logs", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert logs.strip() == "hello from hello uid 10001"  # the image's own non-root user


DNS_SCRIPT = """
import socket, sys
print(open('/etc/resolv.conf').read().replace('\\n', ' | '))
for name in sys.argv[1:]:
    try:
        print(name, '->', socket.gethostbyname(name))
    except OSError as exc:
        print(name, '-> error', type(exc).__name__)
"""


def test_pods_resolve_services_and_headless_pod_names_and_nothing_outside(
    node_cluster: Any, node_api: Any, node_namespace: str, image_refs: dict[str, str]
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    ns = node_namespace
    # A headless Service and a pod that names it as its subdomain (as the training Job's
    # pods do): `<hostname>.<service>.<ns>.svc.cluster.local` must resolve to its IP.
    core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "peers"},
            "spec": {"clusterIP": "None", "selector": {"app": "server"}, "ports": [{"port": 1}]},
        },
    )
    server = _pod("server", image_refs["operator"], "import time; time.sleep(600)")
    server["spec"].update({"hostname": "server-0", "subdomain": "peers"})
    core.create_namespaced_pod(ns, server)
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("server", ns)).status.pod_ip and p,
        120,
        "the server pod's IP",
    )
    names = [
        f"server-0.peers.{ns}.svc.cluster.local",
        "kubernetes.default.svc.cluster.local",
        "kubernetes.default",
        "example.com",
    ]
    client_pod = _pod("client", image_refs["operator"], DNS_SCRIPT)
    client_pod["spec"]["containers"][0]["command"] += names
    # The headless name appears once the endpoints controller has published the pod.
    out = ""
    for attempt in range(20):
        client_pod["metadata"]["name"] = f"client-{attempt}"
        pod = _run_to_end(core, ns, client_pod)
        assert pod.status.phase == "Succeeded"
        out = core.read_namespaced_pod_log(pod.metadata.name, ns)
        if f"{names[0]} -> {running.status.pod_ip}" in out:
            break
    lines = out.splitlines()
    assert f"nameserver {node_cluster.node.net.dns_ip}" in lines[0]
    assert lines[0].count("nameserver") == 1, lines[0]  # the cluster DNS and nothing else
    assert f"{names[0]} -> {running.status.pod_ip}" in out
    assert "kubernetes.default.svc.cluster.local -> 10.96.0.1" in out
    assert "kubernetes.default -> 10.96.0.1" in out
    # No forward plugin: outside names do not resolve (and no query leaves the machine).
    assert "example.com -> error" in out


def test_the_network_is_fenced(node_cluster: Any) -> None:
    """Read the rules (never send traffic out): FORWARD jumps to the fence first, the
    fence passes pod-to-pod and drops the rest of the pod range's forwarded traffic, and
    no NAT rule translates the pod range's traffic to leave the machine."""
    from kubetune.devcluster import node as n

    def rules(*args: str) -> list[str]:
        out = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
        return out.stdout.splitlines()

    pods = node_cluster.node.net.pod_cidr
    forward = [r for r in rules("-S", "FORWARD") if r.startswith("-A")]
    assert forward[0] == f"-A FORWARD -j {n.FENCE_CHAIN}", forward
    assert rules("-S", n.FENCE_CHAIN)[1:] == [
        f"-A {n.FENCE_CHAIN} -s {pods} -d {pods} -j RETURN",
        f"-A {n.FENCE_CHAIN} -s {pods} -j DROP",
        f"-A {n.FENCE_CHAIN} -d {pods} -j DROP",
    ]
    nat = rules("-t", "nat", "-S")
    translating = [r for r in nat if "-j MASQUERADE" in r or "-j SNAT" in r]
    # kube-proxy's one rule masquerades only the Service traffic its chains mark (and
    # DNAT to endpoints on this machine); the CNI bridge adds none (ipMasq off).
    assert translating, nat
    assert all(r.startswith("-A KUBE-POSTROUTING ") for r in translating), translating
    assert not [r for r in nat if r.startswith("-A POSTROUTING") and pods in r]
    inputs = [r for r in rules("-S", "INPUT") if r.startswith("-A")]
    assert inputs[0] == f"-A INPUT -j {n.INPUT_CHAIN}"
