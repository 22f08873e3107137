"""Start, check and stop the local control plane: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok (simulated GPU nodes) and the local pod
runner, all on free 127.0.0.1 ports with their state in one directory.

Used by `kubetune dev-cluster up|down|status` and by the test suite's session fixture.

Why one module of ~500 lines: the lifecycle of one process group (start in order, health,
state file, stop newest-first) reads best in one place; components.py holds the pure parts.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kubetune.devcluster import components as c
from kubetune.devcluster import node as n
from kubetune.devcluster.binaries import Binaries, find_binaries, require
from kubetune.devcluster.pki import ClusterPKI, generate_node_pki, generate_pki
from kubetune.devcluster.realnode import NodeCerts, NodeError, RealNode, unsupported_reason

LOCAL_RUNNER_NODE = "local-runner-0"
# Which cluster's real node holds the bridge (one per machine); `up` takes over a dead one's.
NODE_OWNER_FILE = Path("/run/kubetune-node-owner")
# Seconds the real node's components get to start once its images are loaded.
NODE_START_SECONDS = 180.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class NodeImages:
    """What a real node starts with: image archives for containerd's store (built by
    `make images`) and the reference of the sandbox (pause) image among them."""

    archives: tuple[Path, ...]
    sandbox_image: str


class ClusterError(RuntimeError):
    """The dev cluster could not start or is not healthy; the message names the component."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range: a port picked there can
    be taken by any outgoing connection (etcd clients, say) before the component binds it."""
    import random

    low, high = _ephemeral_range()
    candidates = [(1024, low - 1), (high + 1, 65535)]
    for _ in range(200):
        lo, hi = random.choice([c for c in candidates if c[1] - c[0] > 1000] or [(1024, 65535)])
        port = random.randint(max(lo, 10000), hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        fallback: int = s.getsockname()[1]
        return fallback


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask the kernel to SIGTERM this child when the process that started it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ProcessRecord:
    name: str
    pid: int
    args: list[str]
    log: str


@dataclass
class ClusterState:
    """What `up` writes to state.json so that `status` and `down` find the processes."""

    root: str
    ports: dict[str, int]
    kubeconfig: str
    processes: list[ProcessRecord] = field(default_factory=list)
    gpu_nodes: list[str] = field(default_factory=list)
    local_runner_node: str | None = None
    # The real node's name and bridge (`down` takes them down), when it has one.
    real_node: str | None = None
    real_node_bridge: str | None = None

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        data = json.loads(path.read_text())
        data["processes"] = [ProcessRecord(**p) for p in data["processes"]]
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class DevCluster:
    """One local cluster rooted at `root`.

    `tie_to_parent=True` (tests) makes every component die with the starting process so
    nothing is orphaned even if the test run is killed; the CLI's `up` leaves them running.
    """

    def __init__(
        self,
        root: Path,
        *,
        gpu_pool: c.GpuNodePool | None = None,
        local_runner: bool = True,
        tie_to_parent: bool = False,
        binaries: Binaries | None = None,
        real_node: NodeImages | None = None,
        kueue: bool = False,
    ) -> None:
        self.layout = c.Layout(root.resolve())
        self.node_images = real_node
        self.gpu_pool = gpu_pool if gpu_pool is not None else c.GpuNodePool()
        self.local_runner = local_runner
        self.tie_to_parent = tie_to_parent
        self.kueue = kueue
        self.bins = binaries or find_binaries()
        self.state: ClusterState | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node = RealNode(
            n.NodeLayout(self.layout.root / "node", image_store=image_store()),
            n.NodeNetwork(),
            self.bins,
        )

    # ---------------------------------------------------------------- start
    def start(self, timeout: float = 120.0, progress: Callable[[str], None] | None = None) -> None:
        """Start every component and wait until the cluster is ready. A port taken by
        another process between picking and binding it is retried with new ports."""
        for attempt in range(3):
            try:
                self._start_once(timeout, progress)
                return
            except ClusterError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                if progress:
                    progress("a port was taken meanwhile; starting again on other ports")
                self.state = None
                self._procs = {}

    def _start_once(self, timeout: float, progress: Callable[[str], None] | None) -> None:
        say = progress or (lambda _m: None)
        require(
            [
                self.bins.etcd,
                self.bins.kube_apiserver,
                self.bins.kube_controller_manager,
                self.bins.kube_scheduler,
                self.bins.kwok,
            ]
        )
        if self.layout.state_file.exists():
            old = ClusterState.load(self.layout.state_file)
            if any(_pid_alive(p.pid) for p in old.processes):
                raise ClusterError(
                    f"a dev cluster is already running in {self.layout.root}; "
                    "run `kubetune dev-cluster down` first"
                )
        if self.node_images is not None:
            reason = unsupported_reason(self.bins)
            if reason:
                raise ClusterError(f"cannot start the real node: {reason}")
        for sub in ("etcd", "pki", "serving", "logs", "pods", "node"):
            shutil.rmtree(self.layout.root / sub, ignore_errors=True)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.logs.mkdir()
        deadline = time.monotonic() + timeout
        picked: list[int] = []
        while len(picked) < 6:
            port = free_port()
            if port not in picked:
                picked.append(port)
        ports = c.Ports(*picked)
        self.state = ClusterState(
            root=str(self.layout.root),
            ports=asdict(ports),
            kubeconfig=str(self.layout.kubeconfig),
        )
        node_ip = self.node.net.node_ip if self.node_images is not None else None
        try:
            if node_ip is not None:
                say(f"creating the pods' bridge {self.node.net.bridge} ({node_ip})")
                self._take_over_stale_node(say)
                self.node.create_bridge()
                self.state.real_node_bridge = self.node.net.bridge
                NODE_OWNER_FILE.write_text(str(self.layout.root))
                self.state.save(self.layout.state_file)
            say("generating certificates")
            pki = generate_pki(
                self.layout.pki, extra_server_names=(node_ip,) if node_ip is not None else ()
            )
            self._write_kubeconfigs(ports, pki)
            self.layout.kwok_config.write_text(
                resources.files("kubetune.devcluster").joinpath("kwok-stages.yaml").read_text()
            )
            say(f"starting etcd on 127.0.0.1:{ports.etcd_client}")
            self._spawn("etcd", c.etcd_args(self.bins, ports, self.layout))
            self._wait_http("etcd", f"http://127.0.0.1:{ports.etcd_client}/health", deadline)
            say(f"starting kube-apiserver on 127.0.0.1:{ports.apiserver}")
            self._spawn(
                "kube-apiserver", c.apiserver_args(self.bins, ports, self.layout, pki, node_ip)
            )
            self._wait_http(
                "kube-apiserver",
                f"https://127.0.0.1:{ports.apiserver}/readyz",
                deadline,
                ssl_context=self._admin_ssl(pki),
            )
            say("starting kube-controller-manager, kube-scheduler and kwok")
            self._spawn(
                "kube-controller-manager",
                c.controller_manager_args(self.bins, ports, self.layout, pki),
            )
            self._spawn("kube-scheduler", c.scheduler_args(self.bins, ports, self.layout))
            self._spawn("kwok", c.kwok_args(self.bins, ports, self.layout))
            insecure = ssl.create_default_context()
            insecure.check_hostname = False
            insecure.verify_mode = ssl.CERT_NONE
            self._wait_http(
                "kube-controller-manager",
                f"https://127.0.0.1:{ports.controller_manager}/healthz",
                deadline,
                ssl_context=insecure,
            )
            self._wait_http(
                "kube-scheduler",
                f"https://127.0.0.1:{ports.scheduler}/healthz",
                deadline,
                ssl_context=insecure,
            )
            self._wait_http("kwok", f"http://127.0.0.1:{ports.kwok}/healthz", deadline)
            if self.local_runner:
                say(f"starting the local pod runner (node {LOCAL_RUNNER_NODE})")
                self._spawn(
                    "pod-runner",
                    [
                        sys.executable,
                        "-m",
                        "kubetune.devcluster.podrunner",
                        f"--kubeconfig={self.layout.kubeconfig}",
                        f"--node={LOCAL_RUNNER_NODE}",
                        f"--work-dir={self.layout.pods}",
                    ],
                )
                self.state.local_runner_node = LOCAL_RUNNER_NODE
            say(f"registering {self.gpu_pool.count} simulated GPU nodes")
            self._register_nodes()
            if self.node_images is not None:
                deadline = self._start_real_node(ports, pki, say, deadline)
            self._wait_ready(deadline)
            if self.kueue:
                self.start_kueue(max(30.0, deadline - time.monotonic()), say)
            self.state.save(self.layout.state_file)
            say(f"ready: export KUBECONFIG={self.layout.kubeconfig}")
        except BaseException:
            self.stop()
            raise

    def _take_over_stale_node(self, say: Callable[[str], None]) -> None:
        """A real node whose cluster died without `down` (its test run was killed, say)
        leaves its bridge, rules and mounts: take them down if no process of that cluster
        is alive; a live one is left alone (create_bridge then refuses)."""
        if not Path(f"/sys/class/net/{self.node.net.bridge}").exists():
            return
        try:
            owner = Path(NODE_OWNER_FILE.read_text().strip())
        except OSError:
            return
        state_file = c.Layout(owner).state_file
        if state_file.exists():
            old = ClusterState.load(state_file)
            if any(_pid_alive(p.pid) for p in old.processes):
                return
        say(f"taking down the real node that {owner} left behind")
        DevCluster(owner, binaries=self.bins).stop()
        self.node.remove_kubernetes_chains()
        self.node.remove_fence()
        self.node.delete_bridge()

    def _start_real_node(
        self, ports: c.Ports, pki: ClusterPKI, say: Callable[[str], None], deadline: float
    ) -> float:
        """The fence, containerd with the images, the kubelet, kube-proxy and CoreDNS."""
        assert self.state is not None
        assert self.node_images is not None
        node = self.node
        say("installing the network fence (iptables)")
        node.install_fence(ports.apiserver)
        picked: list[int] = []
        while len(picked) < 6:
            port = free_port()
            if port not in picked:
                picked.append(port)
        node_ports = n.NodePorts(*picked)
        self.state.ports.update({f"node_{k}": v for k, v in asdict(node_ports).items()})
        node_pki = generate_node_pki(self.layout.pki, pki.ca, node.name, node.net.node_ip)
        node_kubeconfig = c.kubeconfig(
            f"https://127.0.0.1:{ports.apiserver}",
            pki.ca.cert,
            node_pki.client,
            n.node_kubeconfig_user(node.name),
        )
        node.write_files(
            admin_kubeconfig=self.layout.kubeconfig,
            node_kubeconfig=yaml.safe_dump(node_kubeconfig),
            ports=node_ports,
            pki=NodeCerts(
                ca=pki.ca.cert,
                serving_cert=node_pki.serving.cert,
                serving_key=node_pki.serving.key,
                sandbox_image=self.node_images.sandbox_image,
            ),
        )
        say("starting containerd")
        self._spawn("containerd", ["containerd", f"--config={node.layout.containerd_config}"])
        try:
            node.wait_containerd(deadline)
            say(f"loading {len(self.node_images.archives)} images into containerd")
            started = time.monotonic()
            imported = node.load_images(list(self.node_images.archives))
            say(
                f"imported {len(imported)} image archives in {time.monotonic() - started:.0f}s "
                f"(the others were in {node.layout.containerd_root} already)"
            )
            # Importing a multi-GiB image is not start-up time: the components get theirs.
            deadline = max(deadline, time.monotonic() + NODE_START_SECONDS)
        except NodeError as exc:
            log = self.layout.logs / "containerd.log"
            raise ClusterError(f"{exc}; containerd's log: {log}") from exc
        say(f"starting the kubelet (node {node.name}, {node.net.node_ip})")
        self.state.real_node = node.name
        self._spawn("kubelet", n.kubelet_args(self.bins.kubelet, node.net, node.layout, node.name))
        self._spawn("kube-proxy", n.kube_proxy_args(self.bins.kube_proxy, node.layout))
        self._spawn("coredns", n.coredns_args(self.bins.coredns, node.layout))
        self._wait_http(
            "kubelet", f"http://127.0.0.1:{node_ports.kubelet_healthz}/healthz", deadline
        )
        self._wait_http(
            "kube-proxy", f"http://127.0.0.1:{node_ports.proxy_healthz}/healthz", deadline
        )
        self._wait_http("coredns", f"http://127.0.0.1:{node_ports.coredns_ready}/ready", deadline)
        try:
            node.keep_fence_first(deadline)
        except NodeError as exc:
            raise ClusterError(
                f"{exc}; kube-proxy's log: {self.layout.logs / 'kube-proxy.log'}"
            ) from exc
        return deadline

    def _write_kubeconfigs(self, ports: c.Ports, pki: ClusterPKI) -> None:
        server = f"https://127.0.0.1:{ports.apiserver}"
        users = {
            self.layout.kubeconfig: (pki.admin, "kubetune-admin"),
            self.layout.component_kubeconfig("controller-manager"): (
                pki.controller_manager,
                "system:kube-controller-manager",
            ),
            self.layout.component_kubeconfig("scheduler"): (pki.scheduler, "system:kube-scheduler"),
        }
        for path, (pair, user) in users.items():
            path.write_text(yaml.safe_dump(c.kubeconfig(server, pki.ca.cert, pair, user)))
            path.chmod(0o600)

    @staticmethod
    def _admin_ssl(pki: ClusterPKI) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        return ctx

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        assert self.state is not None
        log_path = self.layout.logs / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.layout.root,
                preexec_fn=_die_with_parent if self.tie_to_parent else None,
            )
        self._procs[name] = proc
        self.state.processes.append(
            ProcessRecord(name=name, pid=proc.pid, args=list(args), log=str(log_path))
        )
        # Record the pid at once so `down` can clean up even if start fails half-way.
        self.state.save(self.layout.state_file)

    def _check_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            log = self.layout.logs / f"{name}.log"
            raise ClusterError(
                f"{name} exited with code {proc.returncode} during start-up; "
                f"last lines of {log}:\n{_tail(log)}"
            )

    def _wait_http(
        self, name: str, url: str, deadline: float, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with urllib.request.urlopen(url, timeout=5, context=ssl_context) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        log = self.layout.logs / f"{name}.log"
        raise ClusterError(
            f"{name} not healthy at {url} in time ({last}); last lines of {log}:\n{_tail(log)}"
        )

    # ---------------------------------------------------------------- API
    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` authenticated as the cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.layout.kubeconfig))

    def _register_nodes(self) -> None:
        from kubernetes import client

        assert self.state is not None
        core = client.CoreV1Api(self.api_client())
        for manifest in c.gpu_node_manifests(self.gpu_pool):
            core.create_node(manifest)
            self.state.gpu_nodes.append(manifest["metadata"]["name"])

    def _wait_ready(self, deadline: float) -> None:
        """Wait until the default service account exists and every node is Ready."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        assert self.state is not None
        core = client.CoreV1Api(self.api_client())
        expected = set(self.state.gpu_nodes)
        if self.state.local_runner_node:
            expected.add(self.state.local_runner_node)
        if self.state.real_node:
            expected.add(self.state.real_node)
        waiting = "the default service account"
        while time.monotonic() < deadline:
            for name in self._procs:
                self._check_alive(name)
            try:
                core.read_namespaced_service_account("default", "default")
                ready = {
                    n.metadata.name
                    for n in core.list_node().items
                    if any(
                        cd.type == "Ready" and cd.status == "True"
                        for cd in (n.status.conditions or [])
                    )
                }
                missing = expected - ready
                if not missing:
                    return
                waiting = f"nodes to be Ready: {sorted(missing)}"
            except ApiException as exc:
                waiting = f"the default service account ({exc.status})"
            time.sleep(0.3)
        raise ClusterError(f"cluster not ready in time: still waiting for {waiting}")

    # ---------------------------------------------------------------- Kueue
    def start_kueue(
        self, timeout: float = 120.0, progress: Callable[[str], None] | None = None
    ) -> None:
        """Start Kueue on the running cluster: install (or replace) its CRDs, run its
        controller-manager with its webhooks on a free 127.0.0.1 port (a certificate from
        the cluster's CA), and register the webhooks by URL. `stop_kueue` undoes it."""
        from kubetune.devcluster import kueue as kq
        from kubetune.devcluster.pki import issue_serving_cert

        say = progress or (lambda _m: None)
        if self.state is None:
            raise ClusterError("start the cluster before Kueue")
        dist = kq.find_kueue()
        if dist.missing():
            raise ClusterError(
                f"Kueue is not built: missing {', '.join(map(str, dist.missing()))}. Run "
                "`make tools` (or tools/build.sh kueue); it builds Kueue from its Go module."
            )
        deadline = time.monotonic() + timeout
        ports = kq.KueuePorts(webhook=free_port(), health=free_port(), visibility=free_port())
        pki = generate_pki_paths(self.layout.pki)
        ca = pki.ca.cert.read_bytes()
        base = f"https://127.0.0.1:{ports.webhook}"
        cert_dir = self.layout.cert_dir("kueue")
        issue_serving_cert(pki.ca, cert_dir, "kueue-webhook")
        if not (kq.METRICS_CERT_DIR / "tls.crt").exists():
            # Only read at start-up (the metrics server itself is off); any valid pair does.
            try:
                issue_serving_cert(pki.ca, kq.METRICS_CERT_DIR, "kueue-metrics")
            except OSError as exc:
                raise ClusterError(
                    f"Kueue needs a certificate at {kq.METRICS_CERT_DIR} (a fixed path in "
                    f"Kueue), which cannot be written: {exc}; create tls.crt/tls.key there"
                ) from exc
        if not (kq.VISIBILITY_CERT_DIR / "tls.crt").exists():
            try:
                issue_serving_cert(
                    pki.ca, kq.VISIBILITY_CERT_DIR, "kueue-visibility", ("127.0.0.1", "localhost")
                )
            except OSError as exc:
                raise ClusterError(
                    f"Kueue's visibility server needs a certificate at {kq.VISIBILITY_CERT_DIR} "
                    f"(a fixed path in Kueue), which cannot be written: {exc}; create "
                    "tls.crt/tls.key there"
                ) from exc
        config_file = self.layout.root / "kueue-config.yaml"
        config_file.write_text(yaml.safe_dump(kq.configuration(ports, cert_dir)))
        api = self.api_client()
        say("installing Kueue's CRDs")
        _ensure_namespace(api, kq.KUEUE_NAMESPACE)
        for crd in kq.crd_manifests(dist, base, ca):
            install_crd(api, crd, deadline)
        say(f"starting Kueue (webhooks on 127.0.0.1:{ports.webhook})")
        self._spawn("kueue", kq.kueue_args(dist.binary, config_file, self.layout.kubeconfig))
        self.state.ports["kueue_webhook"] = ports.webhook
        self.state.ports["kueue_health"] = ports.health
        self._wait_http("kueue", f"http://127.0.0.1:{ports.health}/readyz", deadline)
        for hook in kq.webhook_manifests(dist, base, ca):
            _apply_webhook_configuration(api, hook)
        self.state.ports["kueue_visibility"] = ports.visibility
        self.state.save(self.layout.state_file)
        say(f"registering Kueue's visibility API (127.0.0.1:{ports.visibility})")
        _apply_visibility_api(api, kq.visibility_manifests(ports.visibility), deadline)

    def stop_kueue(self, grace: float = 10.0, remove_crds: bool = True) -> None:
        """Unregister Kueue's webhooks (Jobs are admitted without them again), stop it, and
        (`remove_crds`) delete its CRDs with every object of theirs, the finalizers Kueue
        would have removed taken off: the cluster is as without Kueue again."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from kubetune.devcluster import kueue as kq

        api = self.api_client()
        dist = kq.find_kueue()
        # First the APIService: an unavailable aggregated API makes discovery partial, which
        # holds up namespace deletion and the garbage collector cluster-wide.
        _delete_visibility_api(api, kq.visibility_manifests(0))
        reg = client.AdmissionregistrationV1Api(api)
        for hook in kq.webhook_manifests(dist, "https://127.0.0.1", b""):
            delete = (
                reg.delete_mutating_webhook_configuration
                if hook["kind"] == "MutatingWebhookConfiguration"
                else reg.delete_validating_webhook_configuration
            )
            with contextlib.suppress(ApiException):
                delete(hook["metadata"]["name"])
        if self.state is not None and any(p.name == "kueue" for p in self.state.processes):
            self.stop_component("kueue", grace)
            self.state.processes = [p for p in self.state.processes if p.name != "kueue"]
            self.state.save(self.layout.state_file)
        if not remove_crds:
            return
        custom = client.CustomObjectsApi(api)
        ext = client.ApiextensionsV1Api(api)
        for crd in kq.crd_manifests(dist, "https://127.0.0.1", b""):
            spec = crd["spec"]
            version = next(v["name"] for v in spec["versions"] if v.get("storage"))
            plural = spec["names"]["plural"]
            with contextlib.suppress(ApiException):
                items = custom.list_cluster_custom_object(spec["group"], version, plural)
                for obj in items.get("items") or []:
                    meta = obj["metadata"]
                    if not meta.get("finalizers"):
                        continue
                    patch = {"metadata": {"finalizers": None}}
                    if meta.get("namespace"):
                        custom.patch_namespaced_custom_object(
                            spec["group"], version, meta["namespace"], plural, meta["name"], patch
                        )
                    else:
                        custom.patch_cluster_custom_object(
                            spec["group"], version, plural, meta["name"], patch
                        )
            with contextlib.suppress(ApiException):
                ext.delete_custom_resource_definition(crd["metadata"]["name"])

    # ---------------------------------------------------------------- stop / status
    def stop(self, grace: float = 10.0) -> None:
        """Stop every component (newest first): SIGTERM, then SIGKILL after `grace`."""
        state = self.state
        if state is None and self.layout.state_file.exists():
            state = ClusterState.load(self.layout.state_file)
        if state is None:
            return
        by_name = {r.name: r for r in state.processes}
        if state.real_node is not None or state.real_node_bridge is not None:
            # The kubelet first (it would restart what goes), then every pod through the
            # CRI while containerd still runs, so that CNI frees addresses and namespaces.
            if "kubelet" in by_name:
                _terminate(by_name["kubelet"].pid, grace)
            if "containerd" in by_name and _pid_alive(by_name["containerd"].pid):
                self.node.remove_pods()
        for record in reversed(state.processes):
            _terminate(record.pid, grace)
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        if state.real_node is not None or state.real_node_bridge is not None:
            self.node.kill_leftovers()
            self.node.cleanup_proxy_rules()
            self.node.remove_kubernetes_chains()
            self.node.remove_fence()
            self.node.unmount_all()
            self.node.delete_bridge()
            state.real_node = None
            state.real_node_bridge = None
        state.processes = []
        state.save(self.layout.state_file)

    def stop_component(self, name: str, grace: float = 10.0) -> None:
        """Stop one running component (fault-injection tests: an API server outage, say);
        `start_component` starts it again with the same arguments and ports."""
        record = self._record(name)
        _terminate(record.pid, grace)
        proc = self._procs.get(name)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        """Start a component `stop_component` stopped; for the API server, wait until ready."""
        assert self.state is not None
        record = self._record(name)
        self.state.processes.remove(record)
        self._spawn(name, record.args)
        if name == "kube-apiserver":
            self._wait_http(
                name,
                f"https://127.0.0.1:{self.state.ports['apiserver']}/readyz",
                time.monotonic() + timeout,
                ssl_context=self._admin_ssl(generate_pki_paths(self.layout.pki)),
            )

    def _record(self, name: str) -> ProcessRecord:
        if self.state is None:
            raise ClusterError("the cluster was not started by this process")
        for record in self.state.processes:
            if record.name == name:
                return record
        raise ClusterError(f"no component named {name!r}")

    def status(self) -> dict[str, Any]:
        """Which recorded processes are alive, and whether the API server answers."""
        if not self.layout.state_file.exists():
            return {"running": False, "root": str(self.layout.root), "components": {}}
        state = ClusterState.load(self.layout.state_file)
        comps = {p.name: ("running" if _pid_alive(p.pid) else "stopped") for p in state.processes}
        api_ok = False
        if comps.get("kube-apiserver") == "running":
            try:
                ctx = self._admin_ssl(generate_pki_paths(self.layout.pki))
                url = f"https://127.0.0.1:{state.ports['apiserver']}/readyz"
                with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                    api_ok = resp.status == 200
            except (urllib.error.URLError, OSError):
                api_ok = False
        return {
            "running": bool(comps) and all(v == "running" for v in comps.values()) and api_ok,
            "root": state.root,
            "kubeconfig": state.kubeconfig,
            "apiserverReady": api_ok,
            "components": comps,
            "ports": state.ports,
            "gpuNodes": state.gpu_nodes,
            "localRunnerNode": state.local_runner_node,
            "realNode": state.real_node,
        }


def _ensure_namespace(api_client: Any, name: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api_client).create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def _create_or_replace(
    create: Callable[[Any], Any],
    read: Callable[[str], Any],
    replace: Callable[[str, Any], Any],
    body: dict[str, Any],
) -> None:
    """Create a cluster-scoped object, or replace the one of that name (at its current
    resourceVersion)."""
    from kubernetes.client.exceptions import ApiException

    name = str(body["metadata"]["name"])
    try:
        create(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        version = read(name).metadata.resource_version
        replace(name, {**body, "metadata": {**body["metadata"], "resourceVersion": version}})


def install_crd(api_client: Any, body: dict[str, Any], deadline: float) -> None:
    """Create a CRD, or replace the one of that name; wait until it is Established."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    name = str(body["metadata"]["name"])
    _create_or_replace(
        ext.create_custom_resource_definition,
        ext.read_custom_resource_definition,
        ext.replace_custom_resource_definition,
        body,
    )
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.2)
    raise ClusterError(f"CRD {name} not Established in time")


def _apply_visibility_api(api_client: Any, docs: list[dict[str, Any]], deadline: float) -> None:
    """Create or replace the visibility API's Service and APIService; wait until the API
    server says the APIService is Available (its discovery answered through the proxy)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    service, api_service = docs
    core = client.CoreV1Api(api_client)
    reg = client.ApiregistrationV1Api(api_client)
    meta = service["metadata"]
    with contextlib.suppress(ApiException):
        core.delete_namespaced_service(meta["name"], meta["namespace"])
    core.create_namespaced_service(meta["namespace"], service)
    name = api_service["metadata"]["name"]
    _create_or_replace(
        reg.create_api_service, reg.read_api_service, reg.replace_api_service, api_service
    )
    said = "no condition yet"
    while time.monotonic() < deadline:
        conditions = reg.read_api_service(name).status.conditions or []
        available = next((c for c in conditions if c.type == "Available"), None)
        if available is not None and available.status == "True":
            return
        if available is not None:
            said = f"{available.reason}: {available.message}"
        time.sleep(0.5)
    raise ClusterError(f"Kueue's visibility APIService {name} not Available in time ({said})")


def _delete_visibility_api(api_client: Any, docs: list[dict[str, Any]]) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    service, api_service = docs
    with contextlib.suppress(ApiException):
        client.ApiregistrationV1Api(api_client).delete_api_service(api_service["metadata"]["name"])
    meta = service["metadata"]
    with contextlib.suppress(ApiException):
        client.CoreV1Api(api_client).delete_namespaced_service(meta["name"], meta["namespace"])


def _apply_webhook_configuration(api_client: Any, body: dict[str, Any]) -> None:
    from kubernetes import client

    reg = client.AdmissionregistrationV1Api(api_client)
    if body["kind"] == "MutatingWebhookConfiguration":
        _create_or_replace(
            reg.create_mutating_webhook_configuration,
            reg.read_mutating_webhook_configuration,
            reg.replace_mutating_webhook_configuration,
            body,
        )
    else:
        _create_or_replace(
            reg.create_validating_webhook_configuration,
            reg.read_validating_webhook_configuration,
            reg.replace_validating_webhook_configuration,
            body,
        )


def generate_pki_paths(directory: Path) -> ClusterPKI:
    """The paths `generate_pki` wrote in `directory` (without generating anything)."""
    from kubetune.devcluster.pki import CertPair

    def pair(stem: str) -> CertPair:
        return CertPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")

    return ClusterPKI(
        ca=pair("ca"),
        apiserver=pair("apiserver"),
        admin=pair("admin"),
        controller_manager=pair("controller-manager"),
        scheduler=pair("scheduler"),
        sa_private_key=directory / "sa.key",
        sa_public_key=directory / "sa.pub",
        front_proxy_ca=pair("front-proxy-ca"),
        front_proxy_client=pair("front-proxy-client"),
    )


def _terminate(pid: int, grace: float) -> None:
    """Stop a component's whole process group (it was started in its own session)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    # Reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def image_store() -> Path:
    """containerd's store of the real node, kept across clusters (KUBETUNE_IMAGE_STORE)."""
    env = os.environ.get("KUBETUNE_IMAGE_STORE")
    return Path(env) if env else Path.home() / ".cache" / "kubetune" / "containerd"


def default_root() -> Path:
    """Where `kubetune dev-cluster up` keeps its state unless told otherwise."""
    env = os.environ.get("KUBETUNE_DEV_CLUSTER_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kubetune" / "dev-cluster"
