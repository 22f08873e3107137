"""Node-tier fixtures: one dev cluster per session with a real node (kubelet, containerd,
runc, the CNI bridge, CoreDNS, kube-proxy) running the images `make images` built.

Skipped, with the reason, only where this machine cannot run a kubelet (not root, Debian's
containerd/runc/CNI packages missing, tools not built); on the machines CI runs on it runs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES_SCRIPT = REPO / "tools" / "images.sh"


def _lines(args: list[str], timeout: float) -> dict[str, str]:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({out.returncode}):\n{out.stderr[-3000:]}")
    pairs = (line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="session")
def image_archives() -> dict[str, Path]:
    """The archives of every image (built now if missing; cached by content)."""
    archives = _lines(["bash", str(IMAGES_SCRIPT), "--print-archives"], timeout=3000)
    return {name: Path(path) for name, path in archives.items()}


@pytest.fixture(scope="session")
def image_refs(image_archives: dict[str, Path]) -> dict[str, str]:
    """name -> reference (localhost/kubetune/NAME:HASH) of each image in the node's store."""
    return _lines(["bash", str(IMAGES_SCRIPT), "--print-refs"], timeout=120)


@pytest.fixture(scope="session")
def node_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    image_archives: dict[str, Path],
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
            archives=tuple(image_archives.values()), sandbox_image=image_refs["pause"]
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
