"""The real node's files and rules, as pure data (node.py)."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from kubetune.devcluster import node as n

pytestmark = pytest.mark.unit

NET = n.NodeNetwork()
PORTS = n.NodePorts(10250, 10248, 18080, 18181, 10256, 10249)


def test_the_node_address_is_the_bridge_gateway_and_not_loopback() -> None:
    assert NET.node_ip == "10.250.0.1"
    assert NET.dns_ip == NET.node_ip
    assert not ipaddress.ip_address(NET.node_ip).is_loopback
    assert ipaddress.ip_address(NET.node_ip) in ipaddress.ip_network(NET.pod_cidr)
    # No overlap with kwok's simulated pod range or the Service range.
    pods = ipaddress.ip_network(NET.pod_cidr)
    assert not pods.overlaps(ipaddress.ip_network("10.244.0.0/16"))
    assert not pods.overlaps(ipaddress.ip_network(NET.service_cidr))


def test_containerd_config_is_valid_toml_owned_by_the_node(tmp_path: Path) -> None:
    lay = n.NodeLayout(tmp_path)
    cfg = tomllib.loads(n.containerd_config(lay, "localhost/kubetune/pause:abc"))
    assert cfg["version"] == 2
    assert cfg["grpc"]["address"] == str(lay.containerd_socket)
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "localhost/kubetune/pause:abc"
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["options"] == {"SystemdCgroup": False, "Root": str(lay.runc_root)}
    assert cri["cni"]["conf_dir"] == str(lay.cni_conf_dir)


def test_cni_bridge_never_masquerades(tmp_path: Path) -> None:
    conf = n.cni_config(NET, n.NodeLayout(tmp_path))
    bridge = conf["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": NET.pod_cidr, "gateway": NET.node_ip}]]
    assert {p["type"] for p in conf["plugins"]} == {"bridge", "portmap"}


def test_pods_get_the_cluster_dns_and_nothing_else(tmp_path: Path) -> None:
    lay = n.NodeLayout(tmp_path)
    assert n.resolv_conf(NET) == "nameserver 10.250.0.1\n"
    cfg = n.kubelet_config(
        NET, lay, PORTS, client_ca=tmp_path / "ca", tls_cert=tmp_path / "c", tls_key=tmp_path / "k"
    )
    assert cfg["clusterDNS"] == [NET.dns_ip]
    assert cfg["resolvConf"] == str(lay.resolv_conf)
    corefile = n.corefile(NET, PORTS, tmp_path / "kubeconfig")
    assert f"bind {NET.dns_ip}" in corefile
    assert "kubernetes cluster.local" in corefile
    assert "forward" not in corefile  # outside names never resolve


def test_kubelet_config_fits_a_cgroup_v1_vm_without_cap_sys_resource(tmp_path: Path) -> None:
    cfg = n.kubelet_config(
        NET,
        n.NodeLayout(tmp_path),
        PORTS,
        client_ca=tmp_path / "ca",
        tls_cert=tmp_path / "c",
        tls_key=tmp_path / "k",
    )
    assert cfg["failCgroupV1"] is False
    assert cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["cgroupsPerQOS"] is False
    assert cfg["enforceNodeAllocatable"] == []
    assert cfg["address"] == NET.node_ip
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authorization"]["mode"] == "Webhook"
    assert cfg["readOnlyPort"] == 0
    args = n.kubelet_args(Path("/bin/kubelet"), NET, n.NodeLayout(tmp_path), "node-0")
    assert f"--node-ip={NET.node_ip}" in args
    assert "--node-labels=kubetune.dev/node-kind=real" in args


def test_fence_passes_pod_to_pod_and_drops_the_rest_of_the_pod_range() -> None:
    rules = n.fence_rules(NET, 6443)
    fence = rules[n.FENCE_CHAIN]
    assert fence[0] == ["-s", NET.pod_cidr, "-d", NET.pod_cidr, "-j", "RETURN"]
    assert ["-s", NET.pod_cidr, "-j", "DROP"] in fence
    assert ["-d", NET.pod_cidr, "-j", "DROP"] in fence
    # The API server listens on every address in node mode: only lo and the bridge reach it.
    assert rules[n.INPUT_CHAIN] == [
        ["-i", "lo", "-j", "RETURN"],
        ["-i", NET.bridge, "-j", "RETURN"],
        ["-p", "tcp", "--dport", "6443", "-j", "DROP"],
    ]
    assert n.FENCE_JUMPS == {n.FENCE_CHAIN: "FORWARD", n.INPUT_CHAIN: "INPUT"}


def test_kube_proxy_translates_service_ips_only_on_this_machine(tmp_path: Path) -> None:
    cfg = n.kube_proxy_config(NET, n.NodeLayout(tmp_path), PORTS, tmp_path / "kubeconfig", "node-0")
    assert cfg["mode"] == "iptables"
    assert cfg["clusterCIDR"] == NET.pod_cidr
    assert cfg["iptables"]["localhostNodePorts"] is False
    assert cfg["healthzBindAddress"].startswith("127.0.0.1:")
    assert cfg["nodePortAddresses"] == [f"{NET.node_ip}/32"]


def test_older_builds_of_the_loaded_images_are_pruned_and_others_kept() -> None:
    from kubetune.devcluster.realnode import normalise_ref, stale_refs

    present = {
        "localhost/kubetune/trainer:old",
        "localhost/kubetune/trainer:new",
        "localhost/kubetune/pause:p1",
        "docker.io/library/busybox:1",
    }
    wanted = {"localhost/kubetune/trainer:new", "localhost/kubetune/pause:p1"}
    assert stale_refs(present, wanted) == ["localhost/kubetune/trainer:old"]
    assert normalise_ref("busybox:1") == "docker.io/library/busybox:1"
    assert normalise_ref("localhost/kubetune/pause:p1") == "localhost/kubetune/pause:p1"


def test_archive_refs_read_the_manifest_without_unpacking(tmp_path: Path) -> None:
    import io
    import json
    import tarfile

    from kubetune.devcluster.realnode import NodeError, archive_refs

    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        data = json.dumps([{"RepoTags": ["localhost/kubetune/pause:abc"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert archive_refs(archive) == ["localhost/kubetune/pause:abc"]
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with pytest.raises(NodeError, match="not a docker-archive"):
        archive_refs(tmp_path / "bad.tar")
