"""The dev cluster's real node, on this machine: the bridge and the fence, containerd with
the locally built images, the kubelet, kube-proxy and CoreDNS.

`node.py` builds every file and rule; this module applies them (ip, iptables, ctr,
crictl) and takes them down again. `DevCluster` spawns and records the processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune.devcluster import node as n
from kubetune.devcluster.binaries import Binaries

NODE_NAME = "kubetune-node-0"
# Debian's containerd, runc and CNI plugins (docs/testing.md, "The real node").
SYSTEM_TOOLS = ("containerd", "ctr", "runc", "ip", "iptables")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
CNI_DIR = Path("/usr/lib/cni")


class NodeError(RuntimeError):
    """The real node could not be set up or taken down."""


def unsupported_reason(bins: Binaries) -> str | None:
    """Why this machine cannot run the real node, or None if it can (the `node` test tier
    is skipped with this message and `dev-cluster up --node` fails with it)."""
    if os.geteuid() != 0:
        return "the real node needs root (containerd, the bridge and iptables)"
    missing = [t for t in SYSTEM_TOOLS if shutil.which(t) is None]
    missing += [str(CNI_DIR / p) for p in CNI_PLUGINS if not (CNI_DIR / p).exists()]
    if missing:
        return (
            f"missing {', '.join(missing)}: apt-get install containerd runc "
            "containernetworking-plugins iptables iproute2 (Debian's packages)"
        )
    built = [bins.kubelet, bins.kube_proxy, bins.coredns, bins.crictl]
    absent = [str(p) for p in built if not os.access(p, os.X_OK)]
    if absent:
        return f"not built: {', '.join(absent)}; run `make tools`"
    if (
        not Path("/sys/fs/cgroup/memory").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        return "no cgroup memory controller is mounted under /sys/fs/cgroup"
    return None


def run(args: list[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run a host command; a failure names the command and what it printed."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(
            f"`{' '.join(args)}` failed with exit code {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


@dataclass
class RealNode:
    """One real node; its state lives under `layout.root`."""

    layout: n.NodeLayout
    net: n.NodeNetwork
    bins: Binaries
    name: str = NODE_NAME

    # ------------------------------------------------------------ the network
    def create_bridge(self) -> None:
        """The pods' bridge with the node's address; refuses one that already exists (a
        second dev cluster with a real node, or one that was not taken down)."""
        if Path(f"/sys/class/net/{self.net.bridge}").exists():
            raise NodeError(
                f"the network bridge {self.net.bridge} already exists: another dev cluster "
                "with a real node runs on this machine, or one was not taken down; run "
                "`kubetune dev-cluster down` (or `ip link delete "
                f"{self.net.bridge}` if none runs)"
            )
        run(["ip", "link", "add", "name", self.net.bridge, "type", "bridge"])
        run(
            [
                "ip",
                "addr",
                "add",
                f"{self.net.node_ip}/{self.net.prefix_length}",
                "dev",
                self.net.bridge,
            ]
        )
        run(["ip", "link", "set", self.net.bridge, "up"])

    def install_fence(self, apiserver_port: int) -> None:
        """The fence's chains, jumped to first from FORWARD and INPUT (docs/testing.md)."""
        self.remove_fence()
        for chain, rules in n.fence_rules(self.net, apiserver_port).items():
            run(["iptables", "-w", "-N", chain])
            for rule in rules:
                run(["iptables", "-w", "-A", chain, *rule])
            run(["iptables", "-w", "-I", n.FENCE_JUMPS[chain], "1", "-j", chain])

    def keep_fence_first(self, deadline: float) -> None:
        """kube-proxy puts its own jumps at the top of FORWARD and INPUT when it first
        syncs (and leaves them where they are afterwards): once they are there, move the
        fence's jumps back in front of them."""
        while time.monotonic() < deadline:
            if self._has_jump("FORWARD", "KUBE-FORWARD"):
                break
            time.sleep(0.2)
        else:
            raise NodeError("kube-proxy did not install its FORWARD rules in time")
        for chain, parent in n.FENCE_JUMPS.items():
            while self._has_jump(parent, chain):
                run(["iptables", "-w", "-D", parent, "-j", chain])
            run(["iptables", "-w", "-I", parent, "1", "-j", chain])

    def remove_fence(self) -> None:
        for chain, parent in n.FENCE_JUMPS.items():
            while self._has_jump(parent, chain):
                run(["iptables", "-w", "-D", parent, "-j", chain])
            run(["iptables", "-w", "-F", chain], check=False)
            run(["iptables", "-w", "-X", chain], check=False)

    @staticmethod
    def _has_jump(parent: str, chain: str) -> bool:
        rules = run(["iptables", "-w", "-S", parent], check=False)
        return f"-j {chain}" in rules

    @staticmethod
    def remove_kubernetes_chains() -> None:
        """The chains the kubelet (KUBE-FIREWALL, its canaries) and kube-proxy leave in
        iptables and ip6tables after `kube-proxy --cleanup`: every `KUBE-*` chain, and the
        built-in chains' jumps to them. Only a Kubernetes node makes such chains; the dev
        cluster's is the only one on the machines it runs on."""
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                continue
            for table in ("filter", "nat", "mangle", "raw"):
                listing = run([tool, "-w", "-t", table, "-S"], check=False).splitlines()
                ours = [ln.split()[1] for ln in listing if ln.startswith("-N KUBE-")]
                for line in listing:
                    parts = line.split()
                    builtin = parts[:1] == ["-A"] and not parts[1].startswith("KUBE-")
                    if builtin and "-j" in parts and parts[parts.index("-j") + 1] in ours:
                        run([tool, "-w", "-t", table, "-D", *parts[1:]], check=False)
                for chain in ours:
                    run([tool, "-w", "-t", table, "-F", chain], check=False)
                for chain in ours:
                    run([tool, "-w", "-t", table, "-X", chain], check=False)

    def delete_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.net.bridge}").exists():
            run(["ip", "link", "delete", self.net.bridge], check=False)

    # ------------------------------------------------------------ files
    def write_files(
        self, *, admin_kubeconfig: Path, node_kubeconfig: str, ports: n.NodePorts, pki: NodeCerts
    ) -> None:
        lay = self.layout
        for d in (
            lay.containerd_root,
            lay.containerd_state,
            lay.cni_conf_dir,
            lay.cni_state,
            lay.kubelet_root,
            lay.pod_logs,
            lay.runc_root,
        ):
            d.mkdir(parents=True, exist_ok=True)
        lay.containerd_config.write_text(n.containerd_config(lay, pki.sandbox_image))
        (lay.cni_conf_dir / "10-kubetune.conflist").write_text(
            json.dumps(n.cni_config(self.net, lay), indent=2)
        )
        lay.resolv_conf.write_text(n.resolv_conf(self.net))
        lay.kubelet_kubeconfig.write_text(node_kubeconfig)
        lay.kubelet_kubeconfig.chmod(0o600)
        lay.kubelet_config.write_text(
            yaml.safe_dump(
                n.kubelet_config(
                    self.net,
                    lay,
                    ports,
                    client_ca=pki.ca,
                    tls_cert=pki.serving_cert,
                    tls_key=pki.serving_key,
                )
            )
        )
        lay.kube_proxy_config.write_text(
            yaml.safe_dump(n.kube_proxy_config(self.net, lay, ports, admin_kubeconfig, self.name))
        )
        lay.corefile.write_text(n.corefile(self.net, ports, admin_kubeconfig))

    # ------------------------------------------------------------ containerd
    def ctr(self, *args: str, timeout: float = 600) -> str:
        return run(
            ["ctr", "--address", str(self.layout.containerd_socket), "-n", "k8s.io", *args],
            timeout=timeout,
        )

    def wait_containerd(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            if self.layout.containerd_socket.exists():
                try:
                    self.ctr("version", timeout=10)
                    return
                except (NodeError, subprocess.TimeoutExpired) as exc:
                    last = str(exc)
            time.sleep(0.2)
        raise NodeError(f"containerd did not answer on {self.layout.containerd_socket}: {last}")

    def load_images(self, archives: list[Path]) -> list[str]:
        """Import image archives (docker-archive) into the runtime's store, skipping those
        whose every reference is there already; the references are what pods name (no
        registry is ever asked). Returns the archives imported."""
        present = set(self.image_refs())
        wanted: set[str] = set()
        imported = []
        for archive in archives:
            if not archive.is_file():
                raise NodeError(f"image archive {archive} does not exist; run `make images`")
            refs = archive_refs(archive)
            wanted.update(refs)
            if refs and set(refs) <= present:
                continue
            self.ctr("images", "import", str(archive), timeout=1800)
            imported.append(str(archive))
        # Older builds of the same images (another source hash) would pile up several GiB
        # each in the kept store: remove them (containerd then collects their content).
        stale = stale_refs(present, wanted)
        if stale:
            self.ctr("images", "rm", "--sync", *stale, timeout=600)
        return imported

    def image_refs(self) -> list[str]:
        out = self.ctr("images", "list", "-q", timeout=30)
        return sorted(line for line in out.split() if line and not line.startswith("sha256:"))

    # ------------------------------------------------------------ take down
    def remove_pods(self) -> None:
        """Stop and remove every pod sandbox through the CRI (CNI DEL frees the addresses,
        veths and network namespaces), before containerd stops."""
        if not self.layout.containerd_socket.exists():
            return
        endpoint = f"unix://{self.layout.containerd_socket}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            run(
                [str(self.bins.crictl), f"--runtime-endpoint={endpoint}", "rmp", "-fa"],
                check=False,
                timeout=120,
            )

    def kill_leftovers(self) -> None:
        """Containers and shims that outlived containerd (it does not stop them itself)."""
        root = str(self.layout.runc_root)
        for ns_dir in Path(root).glob("*"):
            out = run(["runc", "--root", str(ns_dir), "list", "-q"], check=False)
            for cid in out.split():
                run(["runc", "--root", str(ns_dir), "delete", "--force", cid], check=False)
        socket = str(self.layout.containerd_socket)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            shim = cmdline[0].endswith(b"containerd-shim-runc-v2")
            if shim and socket.encode() in b" ".join(cmdline):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(proc.name), signal.SIGKILL)

    def cleanup_proxy_rules(self) -> None:
        if os.access(self.bins.kube_proxy, os.X_OK):
            run([str(self.bins.kube_proxy), "--cleanup"], check=False, timeout=60)

    def unmount_all(self) -> None:
        """Unmount what the kubelet and containerd left mounted under the node's root
        (volumes, the overlay snapshots, shm), deepest first, so the directory can go."""
        root = str(self.layout.root)
        mounts = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mounts").read_text().splitlines():
                target = line.split()[1].replace("\\040", " ")
                if target == root or target.startswith(root + "/"):
                    mounts.append(target)
        for target in sorted(mounts, key=len, reverse=True):
            run(["umount", "-l", target], check=False)


def archive_refs(archive: Path) -> list[str]:
    """The image references a docker-archive names (its manifest.json's RepoTags), read
    without unpacking it (tarfile skips over the layers)."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                return []
            manifest = json.load(member)
    except (KeyError, OSError, tarfile.TarError, ValueError) as exc:
        raise NodeError(f"{archive}: not a docker-archive with a manifest.json ({exc})") from exc
    return [normalise_ref(tag) for entry in manifest for tag in entry.get("RepoTags") or []]


def stale_refs(present: set[str], wanted: set[str]) -> list[str]:
    """References in the store that are other builds of the images being loaded: the same
    repository (`localhost/kubetune/trainer`) with another tag."""
    repos = {ref.rpartition(":")[0] for ref in wanted}
    return sorted(r for r in present - wanted if r.rpartition(":")[0] in repos)


def normalise_ref(ref: str) -> str:
    """containerd's form of a reference: a name without a registry is docker.io's."""
    first = ref.split("/", 1)[0]
    if "/" not in ref or ("." not in first and ":" not in first and first != "localhost"):
        ref = f"docker.io/{ref if '/' in ref else 'library/' + ref}"
    return ref


@dataclass(frozen=True)
class NodeCerts:
    """What the node's files refer to: the cluster CA, the kubelet's serving pair and the
    sandbox (pause) image's reference."""

    ca: Path
    serving_cert: Path
    serving_key: Path
    sandbox_image: str
