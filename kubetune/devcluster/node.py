"""Pure builders for the dev cluster's real node: a kubelet with containerd, runc, the CNI
bridge, cluster DNS (CoreDNS) and kube-proxy, all on one machine.

Nothing here starts a process or changes the host; `realnode.py` does that. The network
rule (docs/testing.md) is built here: pods live on a bridge the dev cluster creates, with
no masquerading, a fence that drops anything forwarded from or to the pod range unless
both ends are in it, and a DNS server that knows the cluster's names only.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.devcluster.components import NODE_KIND_LABEL, SERVICE_CIDR

REAL_NODE_KIND = "real"
CLUSTER_DOMAIN = "cluster.local"
# The iptables chains the dev cluster owns (filter table); `down` deletes them.
FENCE_CHAIN = "KUBETUNE-FENCE"
INPUT_CHAIN = "KUBETUNE-INPUT"


@dataclass(frozen=True)
class NodeNetwork:
    """The real node's addresses: a /24 on a bridge; the bridge's own address is the
    node's IP (the kubelet refuses loopback), the pods' gateway and the DNS server."""

    bridge: str = "kubetune0"
    pod_cidr: str = "10.250.0.0/24"
    service_cidr: str = SERVICE_CIDR

    @property
    def node_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def prefix_length(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen

    @property
    def dns_ip(self) -> str:
        return self.node_ip


@dataclass(frozen=True)
class NodeLayout:
    """Files of the real node, all under the cluster's `root/node`."""

    root: Path
    # containerd's content store and snapshots: kept across clusters (by default under
    # ~/.cache/kubetune/containerd) so that an image already imported is not imported again
    # (the trainer's is several GiB); None keeps it under `root`.
    image_store: Path | None = None

    @property
    def containerd_root(self) -> Path:
        return self.image_store or self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_state(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.root / "kubelet.kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def corefile(self) -> Path:
        return self.root / "Corefile"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"


@dataclass(frozen=True)
class NodePorts:
    """Ports of the node's components (the kubelet's on the node IP, the rest loopback)."""

    kubelet: int
    kubelet_healthz: int
    coredns_health: int
    coredns_ready: int
    proxy_healthz: int
    proxy_metrics: int


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def containerd_config(layout: NodeLayout, sandbox_image: str) -> str:
    """containerd 1.6's config (version 2) for a CRI runtime owned by the dev cluster.

    `restrict_oom_score_adj`: without it every sandbox fails with "can't get final child's
    PID from pipe: EOF" on machines without CAP_SYS_RESOURCE (lowering oom_score_adj needs
    it). The sandbox image is built locally; no registry is ever asked for an image.
    """
    s = _toml_string
    return "\n".join(
        [
            "version = 2",
            f"root = {s(str(layout.containerd_root))}",
            f"state = {s(str(layout.containerd_state))}",
            "",
            "[grpc]",
            f"  address = {s(str(layout.containerd_socket))}",
            "",
            "[debug]",
            '  level = "warn"',
            "",
            '[plugins."io.containerd.grpc.v1.cri"]',
            f"  sandbox_image = {s(sandbox_image)}",
            "  restrict_oom_score_adj = true",
            "  disable_apparmor = true",
            "  enable_selinux = false",
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
            '  runtime_type = "io.containerd.runc.v2"',
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
            "  SystemdCgroup = false",
            f"  Root = {s(str(layout.runc_root))}",
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            '  bin_dir = "/usr/lib/cni"',
            f"  conf_dir = {s(str(layout.cni_conf_dir))}",
            "  max_conf_num = 1",
            "",
        ]
    )


def cni_config(net: NodeNetwork, layout: NodeLayout) -> dict[str, Any]:
    """A CNI conflist: the bridge with host-local addresses, loopback and portmap.

    `ipMasq` is off (nothing is ever translated to leave the machine); the bridge is the
    pods' gateway so that they reach the node's address and the Service IPs kube-proxy
    translates, and the fence in `fence_rules` drops what would be forwarded elsewhere.
    """
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.pod_cidr, "gateway": net.node_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.cni_state),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def resolv_conf(net: NodeNetwork) -> str:
    """The kubelet's resolvConf: the cluster DNS and nothing else, so that no pod is ever
    handed the host's resolver (which may name a server outside the machine)."""
    return f"nameserver {net.dns_ip}\n"


def kubelet_config(
    net: NodeNetwork,
    layout: NodeLayout,
    ports: NodePorts,
    *,
    client_ca: Path,
    tls_cert: Path,
    tls_key: Path,
) -> dict[str, Any]:
    """KubeletConfiguration for a cgroup-v1 VM without CAP_SYS_RESOURCE (docs/testing.md):
    cgroupfs, no QoS cgroups and no node-allocatable enforcement; webhook authn/authz
    (the API server's client certificate for logs and exec); image GC off so the locally
    loaded images are never removed."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "address": net.node_ip,
        "port": ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports.kubelet_healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(tls_cert),
        "tlsPrivateKeyFile": str(tls_key),
        "clusterDNS": [net.dns_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(layout.resolv_conf),
        "podLogsDir": str(layout.pod_logs),
        "failSwapOn": False,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "maxPods": 50,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }


def kubelet_args(kubelet: Path, net: NodeNetwork, layout: NodeLayout, node_name: str) -> list[str]:
    return [
        str(kubelet),
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={layout.kubelet_kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--cert-dir={layout.kubelet_root / 'pki'}",
        f"--hostname-override={node_name}",
        f"--node-ip={net.node_ip}",
        f"--node-labels={NODE_KIND_LABEL}={REAL_NODE_KIND}",
        "--v=1",
    ]


def kube_proxy_config(
    net: NodeNetwork, layout: NodeLayout, ports: NodePorts, kubeconfig: Path, node_name: str
) -> dict[str, Any]:
    """kube-proxy in iptables mode: Service IPs (the `kubernetes` Service that in-cluster
    clients such as the operator pod use) translated to endpoints on this machine. No
    conntrack tuning and no localhost node ports (they need route_localnet)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": net.pod_cidr,
        "hostnameOverride": node_name,
        "healthzBindAddress": f"127.0.0.1:{ports.proxy_healthz}",
        "metricsBindAddress": f"127.0.0.1:{ports.proxy_metrics}",
        "conntrack": {"maxPerCore": 0},
        "iptables": {"localhostNodePorts": False},
        "nodePortAddresses": [f"{net.node_ip}/32"],
    }


def kube_proxy_args(kube_proxy: Path, layout: NodeLayout) -> list[str]:
    return [str(kube_proxy), f"--config={layout.kube_proxy_config}", "--v=1"]


def corefile(net: NodeNetwork, ports: NodePorts, kubeconfig: Path) -> str:
    """CoreDNS on the node's address: the cluster's Services and pods, nothing else (the
    dev cluster's CoreDNS has no forward plugin, so outside names never resolve)."""
    return "\n".join(
        [
            ".:53 {",
            f"    bind {net.dns_ip}",
            "    errors",
            f"    health 127.0.0.1:{ports.coredns_health}",
            f"    ready 127.0.0.1:{ports.coredns_ready}",
            f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{",
            f"        kubeconfig {kubeconfig} kubetune-dev",
            "        pods insecure",
            "        fallthrough in-addr.arpa ip6.arpa",
            "        ttl 5",
            "    }",
            "    cache 5",
            "}",
            "",
        ]
    )


def coredns_args(coredns: Path, layout: NodeLayout) -> list[str]:
    return [str(coredns), "-conf", str(layout.corefile)]


def fence_rules(net: NodeNetwork, apiserver_port: int) -> dict[str, list[list[str]]]:
    """iptables rules (filter table) by chain, each rule as `iptables -A CHAIN ...` args.

    FORWARD: traffic between two pods passes; anything else forwarded from or to the pod
    range is dropped, so a pod can reach this machine's own addresses (its gateway, the
    API server behind the `kubernetes` Service) and other pods, and nothing beyond.
    INPUT: the API server listens on every address of the machine in node mode (pods
    reach it on the bridge); only loopback and the bridge may connect to it.
    """
    pods = net.pod_cidr
    return {
        FENCE_CHAIN: [
            ["-s", pods, "-d", pods, "-j", "RETURN"],
            ["-s", pods, "-j", "DROP"],
            ["-d", pods, "-j", "DROP"],
        ],
        INPUT_CHAIN: [
            ["-i", "lo", "-j", "RETURN"],
            ["-i", net.bridge, "-j", "RETURN"],
            ["-p", "tcp", "--dport", str(apiserver_port), "-j", "DROP"],
        ],
    }


# Where each owned chain is jumped to from (the jump is inserted first in the built-in chain).
FENCE_JUMPS = {FENCE_CHAIN: "FORWARD", INPUT_CHAIN: "INPUT"}


def node_kubeconfig_user(node_name: str) -> str:
    """The user name the Node authorizer expects of a kubelet."""
    return f"system:node:{node_name}"
