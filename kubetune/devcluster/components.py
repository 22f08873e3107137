"""Pure builders for the dev cluster: command lines, kubeconfigs and node manifests.

Nothing here starts a process or talks to the API; `cluster.py` does that.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.devcluster.binaries import Binaries
from kubetune.devcluster.pki import FRONT_PROXY_CLIENT, CertPair, ClusterPKI

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Nodes whose pods kwok simulates carry this label; the local pod runner's node has another.
NODE_KIND_LABEL = "kubetune.dev/node-kind"
KWOK_NODE_KIND = "kwok"
LOCAL_RUNNER_NODE_KIND = "local-runner"
# Pods must tolerate this taint (and select the node) to run as local processes.
LOCAL_RUNNER_TAINT_KEY = "kubetune.dev/local-runner"

# Controllers the dev cluster runs: what Jobs, Deployments, garbage collection, namespaces,
# TTL cleanup, service accounts, PDBs and node lifecycle need.
CONTROLLERS = (
    "job-controller",
    "cronjob-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "disruption-controller",
    # PersistentVolumeClaims bound to the PersistentVolumes tests create (the real node).
    "persistentvolume-binder-controller",
    "resourcequota-controller",
    "node-lifecycle-controller",
    "taint-eviction-controller",
)


@dataclass(frozen=True)
class Ports:
    """Loopback ports of every component."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class Layout:
    """Files and directories of one cluster, all under `root`."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kwok_config(self) -> Path:
        return self.root / "kwok-stages.yaml"

    @property
    def pods(self) -> Path:
        return self.root / "pods"

    def component_kubeconfig(self, name: str) -> Path:
        return self.root / f"{name}.kubeconfig"

    def cert_dir(self, name: str) -> Path:
        return self.root / "serving" / name


@dataclass(frozen=True)
class GpuNodePool:
    """Simulated GPU nodes, labelled the way NVIDIA's GPU feature discovery labels them."""

    count: int = 4
    gpus_per_node: int = 8
    product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559
    family: str = "hopper"
    cpu: str = "96"
    memory: str = "1Ti"
    name_prefix: str = "gpu-node"
    extra_labels: dict[str, str] = field(default_factory=dict)


def etcd_args(bins: Binaries, ports: Ports, layout: Layout) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(bins.etcd),
        "--name=default",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--initial-cluster-state=new",
        # A throwaway test store: skip fsync so tests don't wait on the disk.
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=8589934592",
        "--log-level=warn",
    ]


def apiserver_args(
    bins: Binaries, ports: Ports, layout: Layout, pki: ClusterPKI, node_ip: str | None = None
) -> list[str]:
    """The API server's command line. With a real node (`node_ip`, the node's bridge
    address) it also listens there, so that pods reach it through the `kubernetes` Service
    (kube-proxy), authorises kubelets with the Node authoriser and talks to the kubelet
    with the admin's client certificate (logs, exec)."""
    if node_ip is not None:
        return [
            *_apiserver_common(bins, ports, layout, pki),
            # Every address, fenced: only loopback and the bridge may connect (node.py).
            "--bind-address=0.0.0.0",
            f"--advertise-address={node_ip}",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            f"--kubelet-client-certificate={pki.admin.cert}",
            f"--kubelet-client-key={pki.admin.key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    return [
        *_apiserver_common(bins, ports, layout, pki),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        "--authorization-mode=RBAC",
        # Loopback cannot be an endpoint of the `kubernetes` Service; in-cluster clients of
        # the local pod runner reach the API server through KUBERNETES_SERVICE_HOST instead.
        "--endpoint-reconciler-type=none",
    ]


def _apiserver_common(bins: Binaries, ports: Ports, layout: Layout, pki: ClusterPKI) -> list[str]:
    return [
        str(bins.kube_apiserver),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--secure-port={ports.apiserver}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        # The aggregation layer (Kueue's visibility API): the API server proxies to
        # aggregated servers with the front proxy's client certificate and the user in
        # X-Remote-* headers, which they trust only from that CA and name.
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_public_key}",
        f"--service-account-signing-key-file={pki.sa_private_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        f"--cert-dir={layout.cert_dir('apiserver')}",
        "--v=1",
    ]


def controller_manager_args(
    bins: Binaries, ports: Ports, layout: Layout, pki: ClusterPKI
) -> list[str]:
    kubeconfig = layout.component_kubeconfig("controller-manager")
    return [
        str(bins.kube_controller_manager),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        f"--cert-dir={layout.cert_dir('controller-manager')}",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={pki.sa_private_key}",
        f"--root-ca-file={pki.ca.cert}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Simulated nodes do not run a kubelet: react to missing leases quickly in tests.
        "--node-monitor-grace-period=20s",
        "--v=1",
    ]


def scheduler_args(bins: Binaries, ports: Ports, layout: Layout) -> list[str]:
    kubeconfig = layout.component_kubeconfig("scheduler")
    return [
        str(bins.kube_scheduler),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.scheduler}",
        f"--cert-dir={layout.cert_dir('scheduler')}",
        "--v=1",
    ]


def kwok_args(bins: Binaries, ports: Ports, layout: Layout) -> list[str]:
    return [
        str(bins.kwok),
        f"--kubeconfig={layout.kubeconfig}",
        f"--config={layout.kwok_config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-label-selector={NODE_KIND_LABEL}={KWOK_NODE_KIND}",
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{ports.kwok}",
        "--cidr=10.244.0.0/16",
        "--node-ip=127.0.0.1",
    ]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(server: str, ca: Path, client: CertPair, user: str) -> dict[str, Any]:
    """A kubeconfig with the CA and client certificate embedded, for one user."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-dev",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            },
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(client.cert),
                    "client-key-data": _b64(client.key),
                },
            },
        ],
        "contexts": [
            {"name": "kubetune-dev", "context": {"cluster": "kubetune-dev", "user": user}},
        ],
        "current-context": "kubetune-dev",
    }


def gpu_node_manifests(pool: GpuNodePool) -> list[dict[str, Any]]:
    """Node objects for the simulated GPU nodes (kwok takes over their status)."""
    nodes = []
    for i in range(pool.count):
        name = f"{pool.name_prefix}-{i}"
        capacity = {
            "cpu": pool.cpu,
            "memory": pool.memory,
            "pods": "110",
            "ephemeral-storage": "1Ti",
            "nvidia.com/gpu": str(pool.gpus_per_node),
        }
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        NODE_KIND_LABEL: KWOK_NODE_KIND,
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": pool.product,
                        "nvidia.com/gpu.memory": str(pool.gpu_memory_mib),
                        "nvidia.com/gpu.count": str(pool.gpus_per_node),
                        "nvidia.com/gpu.family": pool.family,
                        **pool.extra_labels,
                    },
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                },
                "spec": {},
                "status": {"capacity": capacity, "allocatable": dict(capacity)},
            }
        )
    return nodes


def local_runner_node_manifest(name: str, cpu: str = "2", memory: str = "16Gi") -> dict[str, Any]:
    """The node the local pod runner serves; tainted so only pods that ask land on it."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "100Gi"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                NODE_KIND_LABEL: LOCAL_RUNNER_NODE_KIND,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {
            "taints": [{"key": LOCAL_RUNNER_TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
        },
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def local_runner_pod_placement(node: str) -> dict[str, Any]:
    """Pod spec fields that send a pod to the local pod runner."""
    return {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [
            {
                "key": LOCAL_RUNNER_TAINT_KEY,
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            },
        ],
    }
