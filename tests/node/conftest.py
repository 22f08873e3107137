"""The node tier: real containers on a real node.

Images come from tools/images.sh (`make images`): built once with buildah and cached by
content, so a session whose inputs did not change only reads the cache. One dev cluster per
session runs a real node (kubelet, containerd, runc, the CNI bridge, CoreDNS, kube-proxy)
with those images loaded. Skipped, saying why, only where this machine cannot build the
images or run a kubelet (not root; buildah, debootstrap, busybox-static, runc, containerd or
the CNI plugins missing: `apt-get install buildah debootstrap busybox-static runc containerd
containernetworking-plugins iptables`; tools not built: `make tools`); on the machines CI
runs on it runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.node import oci


def why_images_cannot_build() -> str | None:
    if os.geteuid() != 0:
        return "the node tier needs root (buildah's overlay storage, debootstrap, runc)"
    missing = [c for c in ("buildah", "debootstrap", "runc") if shutil.which(c) is None]
    if not os.path.exists("/bin/busybox"):
        missing.append("busybox-static")
    if missing:
        return (
            f"the node tier needs {', '.join(missing)}: "
            "apt-get install buildah debootstrap busybox-static runc"
        )
    return None


@pytest.fixture(scope="session")
def image_archives() -> dict[str, str]:
    """NAME=archive of pause, operator and trainer, built if missing (a cold build takes minutes:
    `make images` first)."""
    reason = why_images_cannot_build()
    if reason:
        pytest.skip(reason)
    out = oci.images_sh("--print-archives", timeout=3600)
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture(scope="session")
def image_refs(image_archives: dict[str, str]) -> dict[str, str]:
    """name -> reference (localhost/kubetune/NAME:HASH) of each image in the node's store."""
    out = oci.images_sh("--print-refs", timeout=120)
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture(scope="session")
def node_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    image_archives: dict[str, str],
    image_refs: dict[str, str],
) -> Iterator[Any]:
    from kubetune.devcluster.binaries import find_binaries
    from kubetune.devcluster.cluster import DevCluster, NodeImages
    from kubetune.devcluster.components import GpuNodePool
    from kubetune.devcluster.realnode import unsupported_reason

    reason = unsupported_reason(find_binaries())
    if reason:
        pytest.skip(f"this machine cannot run the real node: {reason}")
    cluster = DevCluster(
        tmp_path_factory.mktemp("node-cluster"),
        gpu_pool=GpuNodePool(count=0),
        local_runner=False,
        tie_to_parent=True,
        real_node=NodeImages(
            archives=tuple(Path(p) for p in image_archives.values()),
            sandbox_image=image_refs["pause"],
        ),
    )
    cluster.start(timeout=300)
    yield cluster
    cluster.stop()
    # `down` must leave nothing of the node behind on the machine.
    left = leftovers(cluster)
    assert not left, f"the real node left these behind: {left}"


def leftovers(cluster: Any) -> list[str]:
    from kubetune.devcluster import node as n

    found = []
    if Path(f"/sys/class/net/{cluster.node.net.bridge}").exists():
        found.append(f"bridge {cluster.node.net.bridge}")
    for table in ("filter", "nat", "mangle"):
        rules = subprocess.run(
            ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        found += [
            f"iptables {table}: {r}"
            for r in rules
            if (r.startswith("-N ") and r.split()[1] in (n.FENCE_CHAIN, n.INPUT_CHAIN))
            or r.startswith("-N KUBE-")
        ]
    mounts = Path("/proc/self/mounts").read_text()
    if str(cluster.layout.root / "node") in mounts:
        found.append("mounts under the node's directory")
    return found


@pytest.fixture(scope="session")
def node_api(node_cluster: Any) -> Any:
    return node_cluster.api_client()


@pytest.fixture
def node_namespace(node_api: Any) -> Iterator[str]:
    import uuid

    from kubernetes import client

    core = client.CoreV1Api(node_api)
    name = f"node-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
