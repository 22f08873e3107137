"""The local pod runner: TEST INFRASTRUCTURE, not part of the operator.

It plays a minimal kubelet for one node of the dev cluster: it registers the node and
keeps its Lease fresh, watches the pods bound to that node, and runs each container's
command as a local process in this project's Python environment, with the pod's
environment variables (literal values, the downward API fields our pods use, ConfigMap
and Secret keys, `$(VAR)` expansion) and a loopback pod IP. It reports Running, the exit
code and the termination message back through the pod's status, and kills the process
when the pod is deleted. With it, a Job created by the operator really runs our trainer
(on CPU) under a real API server.

What it does not do (production uses a real kubelet): images are ignored, volumes are
not mounted (a hostPath whose path equals its mountPath works because it is the same
directory; a Secret volume's keys are written to files under the pod's directory and the
environment values naming paths under its mountPath are moved there), no probes, no
resource isolation, no `kubectl logs` (logs are files under the work directory). The
container's termination message file is a per-pod file whose path is given to the
process in KUBETUNE_TERMINATION_MESSAGE_PATH.

Why one module of ~700 lines: it is one kubelet loop (node, Lease, pod watch, processes,
status) whose parts share the pod table; it is test infrastructure that a real kubelet node
replaces (the real-node issue), so it is not split further.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.contract import Env

log = logging.getLogger("kubetune.podrunner")

TERMINATION_ENV = Env.TERMINATION_MESSAGE_PATH
MAX_TERMINATION_MESSAGE = 4096
_FIELD_RE = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ pure helpers
def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` escapes `$`,
    unknown references are left as they are."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_RE.sub(sub, value)


def field_value(pod: dict[str, Any], path: str) -> str:
    """The value of a downward-API `fieldRef.fieldPath` for this pod."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.podIPs": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
        "status.hostIPs": status.get("hostIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = _FIELD_RE.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ValueError(f"unsupported fieldRef.fieldPath {path!r}")


def resource_value(container: dict[str, Any], resource: str, divisor: str | None) -> str:
    """A `resourceFieldRef` value; CPU is rounded up to whole cores like the kubelet does."""
    section, _, name = resource.partition(".")
    quantity = ((container.get("resources") or {}).get(section) or {}).get(name)
    if quantity is None:
        return str(os.cpu_count() or 1) if name == "cpu" else "0"
    if name == "cpu":
        cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
        if divisor and divisor.endswith("m"):
            return str(int(cores * 1000 / float(divisor[:-1])))
        return str(max(1, int(-(-cores // 1))))
    return str(quantity)


def remap_paths(env: dict[str, str], mount_path: str, local: str) -> dict[str, str]:
    """`env` with every value that is `mount_path` or a path under it moved to `local`."""
    prefix = mount_path.rstrip("/") + "/"
    return {
        k: local + v[len(prefix) - 1 :]
        if v.startswith(prefix)
        else (local if v == mount_path else v)
        for k, v in env.items()
    }


def termination_state(exit_code: int, started: str, message: str) -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "message": message,
            "startedAt": started,
            "finishedAt": now(),
        }
    }


def read_termination_message(path: Path, log_path: Path, policy: str, exit_code: int) -> str:
    """The container's termination message, as the kubelet reads it."""
    try:
        message = path.read_text(errors="replace")[:MAX_TERMINATION_MESSAGE]
    except OSError:
        message = ""
    if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
        try:
            lines = log_path.read_text(errors="replace").splitlines()[-80:]
        except OSError:
            lines = []
        message = "\n".join(lines)[-2048:]
    return message


# ------------------------------------------------------------------ runner
@dataclass
class Running:
    """One container process of one pod."""

    name: str
    proc: subprocess.Popen[bytes]
    started: str
    log_path: Path
    term_path: Path
    policy: str
    restarts: int = 0


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    pod: dict[str, Any]
    directory: Path
    containers: dict[str, Running] = field(default_factory=dict)
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False


class PodRunner:
    def __init__(self, api: Any, node: str, work_dir: Path, lease_seconds: int = 40) -> None:
        from kubernetes import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.node = node
        self.work_dir = work_dir
        self.lease_seconds = lease_seconds
        self.runs: dict[str, PodRun] = {}
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.stopping = threading.Event()
        self.bin_dir = Path(sys.executable).parent
        host = api.configuration.host.removeprefix("https://")
        self.api_host, _, self.api_port = host.partition(":")

    # ---- node and lease
    def register_node(self) -> None:
        from kubernetes.client.exceptions import ApiException

        from kubetune.devcluster.components import local_runner_node_manifest

        manifest = local_runner_node_manifest(self.node, cpu=str(os.cpu_count() or 2))
        try:
            self.core.create_node(manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.report_node_ready()

    def report_node_ready(self) -> None:
        stamp = now()
        conditions = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubetune local pod runner is ready",
            },
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
        ]
        for cond in conditions:
            cond["lastHeartbeatTime"] = stamp
            cond["lastTransitionTime"] = stamp
        self.core.patch_node_status(
            self.node,
            {
                "status": {
                    "conditions": conditions,
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": self.node},
                    ],
                    "nodeInfo": {
                        "kubeletVersion": "kubetune-podrunner",
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                        "containerRuntimeVersion": "local-process",
                        "kernelVersion": "",
                        "osImage": "",
                        "machineID": "",
                        "systemUUID": "",
                        "bootID": "",
                        "kubeProxyVersion": "",
                    },
                }
            },
        )

    def renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": self.lease_seconds,
                "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(self.node, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    # ---- watching
    def watch_pods(self) -> None:
        from kubernetes import watch

        selector = f"spec.nodeName={self.node}"
        while not self.stopping.is_set():
            try:
                listing = self.api.sanitize_for_serialization(
                    self.core.list_pod_for_all_namespaces(field_selector=selector)
                )
                for pod in listing["items"]:
                    self.events.put(("SYNC", pod))
                rv = listing["metadata"].get("resourceVersion")
                w = watch.Watch()
                for event in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=rv,
                    timeout_seconds=60,
                    _preload_content=True,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    obj = self.api.sanitize_for_serialization(event["object"])
                    self.events.put((event["type"], obj))
            except Exception as exc:  # reconnect on any API hiccup
                if not self.stopping.is_set():
                    log.warning("pod watch interrupted (%s); reconnecting", exc)
                    time.sleep(1)

    # ---- pod lifecycle
    def handle(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if kind == "DELETED":
            if run:
                self.kill(run, grace=0)
                self.runs.pop(uid, None)
            return
        if meta.get("deletionTimestamp"):
            if run:
                grace = min(int(meta.get("deletionGracePeriodSeconds") or 30), 30)
                self.kill(run, grace)
                run.done = True
            self.finalize_delete(meta["namespace"], meta["name"], uid)
            return
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if run is None and phase == "Pending":
            self.start(pod)
        elif run is None and phase == "Running":
            # We have no process for it: the runner was restarted, like a lost container.
            self.patch_status(
                meta["namespace"],
                meta["name"],
                {
                    "phase": "Failed",
                    "reason": "ProcessLost",
                    "message": "the local pod runner restarted and lost this pod's process",
                },
            )

    def env_for(
        self, pod: dict[str, Any], container: dict[str, Any], term_path: Path
    ) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": self.api_port,
            "PYTHONUNBUFFERED": "1",
            TERMINATION_ENV: str(term_path),
        }
        for key in (
            "VIRTUAL_ENV",
            # The sources the tests run (a worktree's, ahead of the venv's install).
            "PYTHONPATH",
            "LANG",
            "TMPDIR",
            "KUBETUNE_TOOLS_DIR",
            "HF_HOME",
            "DS_ACCELERATOR",
            "PIP_CACHE_DIR",
        ):
            if key in os.environ:
                env[key] = os.environ[key]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self._config_map(
                    ns,
                    source["configMapRef"]["name"],
                    source["configMapRef"].get("optional", False),
                )
            else:
                data = self._secret(
                    ns, source["secretRef"]["name"], source["secretRef"].get("optional", False)
                )
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), env)
                continue
            src = item["valueFrom"]
            if "fieldRef" in src:
                env[name] = field_value(pod, src["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in src:
                env[name] = resource_value(
                    container,
                    src["resourceFieldRef"]["resource"],
                    src["resourceFieldRef"].get("divisor"),
                )
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                value = self._config_map(ns, ref["name"], ref.get("optional", False)).get(
                    ref["key"]
                )
                if value is not None:
                    env[name] = value
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = self._secret(ns, ref["name"], ref.get("optional", False)).get(ref["key"])
                if value is not None:
                    env[name] = value
        return self.secret_volumes(pod, container, term_path.parent, env)

    def secret_volumes(
        self, pod: dict[str, Any], container: dict[str, Any], directory: Path, env: dict[str, str]
    ) -> dict[str, str]:
        """Secret volumes as files: each mounted Secret's keys (or its `items`) are written
        under the pod's directory, and an environment value that names a path under the
        volume's mountPath names that file instead (the pods read secrets from files)."""
        ns = pod["metadata"]["namespace"]
        secrets = {
            v["name"]: v["secret"] for v in pod["spec"].get("volumes") or [] if "secret" in v
        }
        for mount in container.get("volumeMounts") or []:
            source = secrets.get(mount["name"])
            if source is None:
                continue
            data = self._secret(ns, source["secretName"], source.get("optional", False))
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            local = directory / "secrets" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for item in items:
                if item["key"] in data:
                    target = local / item["path"]
                    target.write_text(data[item["key"]])
                    target.chmod(0o400)
            env = remap_paths(env, mount["mountPath"], str(local))
        return env

    def _config_map(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            return dict(self.core.read_namespaced_config_map(name, ns).data or {})
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise

    def _secret(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            data = self.core.read_namespaced_secret(name, ns).data or {}
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def resolve_command(self, argv: list[str]) -> list[str]:
        exe = argv[0]
        if exe in ("python", "python3") or exe == sys.executable:
            return [sys.executable, *argv[1:]]
        local = self.bin_dir / exe
        if "/" not in exe and local.exists():
            return [str(local), *argv[1:]]
        return argv

    def launch(self, run: PodRun, container: dict[str, Any], restarts: int = 0) -> Running:
        name = container["name"]
        term_path = run.directory / f"{name}.termination-log"
        term_path.write_text("")
        log_path = run.directory / f"{name}.log"
        env = self.env_for(run.pod, container, term_path)
        argv = [
            expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        if not argv:
            raise ValueError(
                f"container {name!r} has no command: the local pod runner "
                "cannot run an image's default entrypoint"
            )
        workdir = container.get("workingDir")
        cwd = workdir if workdir and Path(workdir).is_dir() else str(run.directory)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                self.resolve_command(argv),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info(
            "started %s/%s container %s (pid %d): %s",
            run.namespace,
            run.name,
            name,
            proc.pid,
            " ".join(argv),
        )
        return Running(
            name=name,
            proc=proc,
            started=now(),
            log_path=log_path,
            term_path=term_path,
            policy=container.get("terminationMessagePolicy", "File"),
            restarts=restarts,
        )

    def start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        directory = self.work_dir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            pod=pod,
            directory=directory,
        )
        self.runs[run.uid] = run
        # Init containers run one after another, before the main containers.
        for init in pod["spec"].get("initContainers") or []:
            try:
                running = self.launch(run, init)
            except Exception as exc:
                self.fail_start(run, init["name"], exc)
                return
            code = running.proc.wait()
            if code != 0:
                message = read_termination_message(
                    running.term_path, running.log_path, running.policy, code
                )
                run.done = True
                self.patch_status(
                    run.namespace,
                    run.name,
                    {
                        "phase": "Failed",
                        "message": f"init container {init['name']} failed",
                        "initContainerStatuses": [
                            {
                                "name": init["name"],
                                "image": init.get("image", ""),
                                "ready": False,
                                "restartCount": 0,
                                "state": termination_state(code, running.started, message),
                            }
                        ],
                    },
                )
                return
        for container in pod["spec"]["containers"]:
            try:
                run.containers[container["name"]] = self.launch(run, container)
            except Exception as exc:
                self.fail_start(run, container["name"], exc)
                return
        stamp = now()
        self.patch_status(
            run.namespace,
            run.name,
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": stamp,
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": stamp}
                    for t in (
                        "PodReadyToStartContainers",
                        "Initialized",
                        "ContainersReady",
                        "Ready",
                    )
                ],
                "containerStatuses": self.container_statuses(run),
            },
        )

    def fail_start(self, run: PodRun, container: str, exc: Exception) -> None:
        log.error("cannot start %s/%s container %s: %s", run.namespace, run.name, container, exc)
        self.kill(run, grace=0)
        run.done = True
        self.patch_status(
            run.namespace,
            run.name,
            {
                "phase": "Failed",
                "reason": "StartError",
                "message": f"container {container}: {exc}",
            },
        )

    def container_statuses(self, run: PodRun) -> list[dict[str, Any]]:
        statuses = []
        for c in run.pod["spec"]["containers"]:
            name = c["name"]
            if name in run.finished:
                statuses.append(run.finished[name])
            elif name in run.containers:
                r = run.containers[name]
                statuses.append(
                    {
                        "name": name,
                        "image": c.get("image", ""),
                        "ready": True,
                        "started": True,
                        "restartCount": r.restarts,
                        "state": {"running": {"startedAt": r.started}},
                    }
                )
        return statuses

    def poll(self) -> None:
        """Collect exited processes; restart or finish their pods."""
        for run in list(self.runs.values()):
            if run.done:
                continue
            policy = run.pod["spec"].get("restartPolicy", "Always")
            changed = False
            for name, r in list(run.containers.items()):
                code = r.proc.poll()
                if code is None:
                    continue
                changed = True
                message = read_termination_message(r.term_path, r.log_path, r.policy, code)
                log.info("%s/%s container %s exited with %d", run.namespace, run.name, name, code)
                restart = policy == "Always" or (policy == "OnFailure" and code != 0)
                if restart:
                    container = next(c for c in run.pod["spec"]["containers"] if c["name"] == name)
                    time.sleep(1)
                    run.containers[name] = self.launch(run, container, restarts=r.restarts + 1)
                    continue
                del run.containers[name]
                image = next(
                    c.get("image", "") for c in run.pod["spec"]["containers"] if c["name"] == name
                )
                run.finished[name] = {
                    "name": name,
                    "image": image,
                    "ready": False,
                    "started": False,
                    "restartCount": r.restarts,
                    "state": termination_state(code, r.started, message),
                }
            if not changed:
                continue
            patch: dict[str, Any] = {"containerStatuses": self.container_statuses(run)}
            if not run.containers:
                codes = [s["state"]["terminated"]["exitCode"] for s in run.finished.values()]
                patch["phase"] = "Succeeded" if all(code == 0 for code in codes) else "Failed"
                stamp = now()
                patch["conditions"] = [
                    {
                        "type": t,
                        "status": "False",
                        "reason": "PodCompleted",
                        "lastTransitionTime": stamp,
                    }
                    for t in ("ContainersReady", "Ready")
                ]
                run.done = True
            self.patch_status(run.namespace, run.name, patch)

    def kill(self, run: PodRun, grace: float) -> None:
        for r in run.containers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        for r in run.containers.values():
            try:
                r.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()

    def finalize_delete(self, ns: str, name: str, uid: str) -> None:
        """Like the kubelet: once the containers are gone, remove the pod for good."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(
                name,
                ns,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        run = self.runs.pop(uid, None)
        if run and os.environ.get("KUBETUNE_PODRUNNER_KEEP_DIRS") != "1":
            shutil.rmtree(run.directory, ignore_errors=True)

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot update status of %s/%s: %s", ns, name, exc.reason)

    # ---- main loop
    def run_forever(self) -> None:
        self.register_node()
        self.renew_lease()
        watcher = threading.Thread(target=self.watch_pods, daemon=True)
        watcher.start()
        last_lease = time.monotonic()
        last_status = time.monotonic()
        while not self.stopping.is_set():
            try:
                kind, pod = self.events.get(timeout=0.2)
                self.handle(kind, pod)
            except queue.Empty:
                pass
            except Exception:
                log.exception("error handling a pod event")
            try:
                self.poll()
                if time.monotonic() - last_lease > self.lease_seconds / 4:
                    self.renew_lease()
                    last_lease = time.monotonic()
                if time.monotonic() - last_status > 60:
                    self.report_node_ready()
                    last_status = time.monotonic()
            except Exception:
                log.exception("error in the runner loop")
        for run in self.runs.values():
            self.kill(run, grace=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.devcluster.podrunner",
        description="Run pods bound to one dev-cluster node as local processes (tests only).",
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True, help="name of the node this runner serves")
    parser.add_argument("--work-dir", required=True, help="per-pod logs and files go here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from kubernetes import config

    api = config.new_client_from_config(config_file=args.kubeconfig)
    runner = PodRunner(api, args.node, Path(args.work_dir))
    signal.signal(signal.SIGTERM, lambda *_: runner.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: runner.stopping.set())
    runner.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
