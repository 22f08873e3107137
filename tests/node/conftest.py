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

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.node import oci

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def split_ref(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


def kubectl(cluster: Any, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        [str(cluster.bins.kubectl), f"--kubeconfig={cluster.layout.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="session")
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
    op_repo, op_tag = split_ref(image_refs["operator"])
    tr_repo, tr_tag = split_ref(image_refs["trainer"])
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


def operator_pod(core: Any, ns: str) -> Any:
    pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/name=kubetune").items
    ready = [
        p
        for p in pods
        if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    ]
    return ready[0] if ready else None


class PodMemory:
    """The largest resident memory (cgroup v1 `memory.stat` total_rss, page cache left out)
    of the containers of pods whose name starts with `prefix`, polled every half second
    from this machine (the pods are its processes) until `stop()`."""

    def __init__(self, prefix: str) -> None:
        import threading

        self.prefix = prefix.encode()
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _cgroups(self) -> set[Path]:
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                lines = Path(f"/proc/{entry}/cgroup").read_text().splitlines()
            except OSError:
                continue
            if not any(v.startswith(b"HOSTNAME=" + self.prefix) for v in environ):
                continue
            for line in lines:
                _, controllers, path = line.split(":", 2)
                if "memory" in controllers.split(","):
                    found.add(Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
        return found

    def _poll(self) -> None:
        while not self._done.wait(0.5):
            for cgroup in self._cgroups():
                try:
                    stat = (cgroup / "memory.stat").read_text().splitlines()
                except OSError:
                    continue
                rss = sum(
                    int(line.split()[1])
                    for line in stat
                    if line.split()[0] in ("total_rss", "total_mapped_file")
                )
                self.peak = max(self.peak, rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join(timeout=10)
        return self.peak


def finished_ftj(custom: Any, ns: str, name: str) -> Any:
    """The FineTuneJob (a dict) once its Succeeded or Failed condition is True, else None
    (for `wait_for`, whose result is then the object)."""
    obj: dict[str, Any] = custom.get_namespaced_custom_object(
        "kubetune.dev", "v1alpha1", ns, "finetunejobs", name
    )
    conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    done = any(conds.get(t, {}).get("status") == "True" for t in ("Succeeded", "Failed"))
    return obj if done else None


def jsonl_config_map(core: Any, ns: str, name: str, rows: list[dict[str, Any]]) -> None:
    """A ConfigMap `name` whose key train.jsonl holds `rows` (a configmap:// dataset)."""
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": name}, "data": {"train.jsonl": body}}
    )


def output_claim(core: Any, ns: str, claim: str, directory: Path) -> Path:
    """A PersistentVolume on the node's disk at `directory`, bound to claim `claim` in `ns`
    (ReadWriteOnce: every pod of a job runs on the one real node)."""
    os.chmod(directory, 0o777)
    pv = f"{claim}-{ns}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "5Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(directory), "type": "Directory"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "5Gi"}},
            },
        },
    )
    return directory


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
