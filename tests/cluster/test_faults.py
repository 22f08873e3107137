"""Faults against the real local control plane, with the operator as a real subprocess
(`python -m kubetune.operator`) that can be SIGKILLed: random kills while jobs run, an API
server outage, a node deleted under a running job, and two replicas started at once."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.cluster.test_operator import (
    GROUP,
    PLURAL,
    STANDIN_TRAINER,
    VERSION,
    _cond,
    _create,
    _ftj,
    _get,
    _real_trainer_job,
    _rows,
    _wait_cond,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

TERMINAL = ("Succeeded", "Failed")
STATE_RANK = {
    "Pending": 0,
    "Planning": 1,
    "Planned": 2,
    "Blocked": 1,
    "Running": 3,
    "Suspended": 3,
    "Stopping": 3,
    "Succeeded": 4,
    "Failed": 4,
}
CHILD_KINDS = ("jobs", "services", "configmaps", "secrets")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class OperatorSubprocess:
    """`python -m kubetune.operator` in its own process: killable at any instant."""

    def __init__(self, kubeconfig: str, log: Path, identity: str, lease_ns: str) -> None:
        from kubetune.devcluster.cluster import free_port

        self.log = log
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "KUBETUNE_SYNC_INTERVAL_SECONDS": "2",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", "-c", STANDIN_TRAINER]),
            "KUBETUNE_LEASE_NAMESPACE": lease_ns,
            "KUBETUNE_LEASE_DURATION_SECONDS": "3",
            "POD_NAME": identity,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune.operator", "--all-namespaces"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def reconciles(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kubetune_operator_reconciles_total{")
        )


@pytest.fixture
def operators(
    dev_cluster: Any, crd_installed: str, namespace: str, tmp_path: Path
) -> Iterator[list[OperatorSubprocess]]:
    """Two operator processes (not started) sharing one Lease in the test's namespace."""
    procs = [
        OperatorSubprocess(
            str(dev_cluster.layout.kubeconfig), tmp_path / f"operator-{i}.log", f"op-{i}", namespace
        )
        for i in range(2)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


class Recorder:
    """Watches the namespace's FineTuneJobs and their children from the side: every status
    a job ever had, and every UID each child name ever had."""

    def __init__(self, api_client: Any, ns: str) -> None:
        self.api_client = api_client
        self.ns = ns
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.child_uids: dict[str, set[str]] = {}
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def _stream(self, kind: str) -> None:
        core, batch = client.CoreV1Api(self.api_client), client.BatchV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                if kind == "ftj":
                    stream = w.stream(
                        custom.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self.ns,
                        PLURAL,
                        timeout_seconds=5,
                    )
                else:
                    fn = {
                        "jobs": batch.list_namespaced_job,
                        "services": core.list_namespaced_service,
                        "configmaps": core.list_namespaced_config_map,
                        "secrets": core.list_namespaced_secret,
                    }[kind]
                    stream = w.stream(
                        fn, self.ns, label_selector="kubetune.dev/job", timeout_seconds=5
                    )
                for event in stream:
                    obj = event["object"]
                    if kind == "ftj":
                        name = obj["metadata"]["name"]
                        status = obj.get("status") or {}
                        seen = self.statuses.setdefault(name, [])
                        if not seen or seen[-1] != status:
                            seen.append(json.loads(json.dumps(status)))
                    else:
                        key = f"{kind}/{obj.metadata.name}"
                        self.child_uids.setdefault(key, set()).add(obj.metadata.uid)
                    if self.stop.is_set():
                        break
            except Exception as exc:  # the API server may be down on purpose
                self.errors.append(f"{kind}: {exc}")
                time.sleep(0.5)

    def start(self) -> None:
        for kind in ("ftj", *CHILD_KINDS):
            t = threading.Thread(target=self._stream, args=(kind,), daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)

    def assert_monotonic(self) -> None:
        """No status ever went backwards: the state only moves forward, a plan never
        changes once set, a finished job never changes its outcome, and a True Planned
        condition stays True."""
        for name, history in self.statuses.items():
            rank, plan, outcome, planned = -1, None, None, False
            for status in history:
                state = status.get("state")
                if state is None:
                    assert rank <= 0 or not status, f"{name}: status lost: {history}"
                    continue
                assert STATE_RANK[state] >= rank, f"{name}: {state} after rank {rank}"
                rank = STATE_RANK[state]
                if status.get("plan") is not None:
                    assert plan in (None, status["plan"]), f"{name}: plan changed"
                    plan = status["plan"]
                else:
                    assert plan is None, f"{name}: plan lost"
                conds = {c["type"]: c for c in status.get("conditions") or []}
                now_planned = conds.get("Planned", {}).get("status") == "True"
                assert now_planned or not planned, f"{name}: Planned went back"
                planned = now_planned
                done = [
                    (t, conds[t]["reason"])
                    for t in TERMINAL
                    if conds.get(t, {}).get("status") == "True"
                ]
                if outcome is not None:
                    assert done == outcome, f"{name}: outcome changed {outcome} -> {done}"
                if done:
                    outcome = done

    def assert_no_child_recreated(self) -> None:
        twice = {k: v for k, v in self.child_uids.items() if len(v) > 1}
        assert not twice, f"children created more than once: {twice}"


def _terminal(obj: dict[str, Any]) -> tuple[str, str] | None:
    for t in TERMINAL:
        c = _cond(obj, t)
        if c and c["status"] == "True":
            return t, str(c["reason"])
    return None


def _wait_all_terminal(api: dict[str, Any], ns: str, names: list[str], timeout: float) -> None:
    def done() -> bool:
        return all(_terminal(_get(api, ns, n)) for n in names)

    try:
        wait_for(done, timeout, f"{names} to finish", interval=1)
    except AssertionError:
        left = {n: (_get(api, ns, n).get("status") or {}).get("state") for n in names}
        raise AssertionError(f"not finished: {left}") from None


def _assert_nothing_left(api: dict[str, Any], ns: str) -> None:
    for name in [
        o["metadata"]["name"]
        for o in api["custom"].list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    ]:
        api["custom"].delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def empty() -> list[str]:
        sel = "kubetune.dev/job"
        left = [
            *(f"job/{j.metadata.name}" for j in api["batch"].list_namespaced_job(ns).items),
            *(
                f"svc/{s.metadata.name}"
                for s in api["core"].list_namespaced_service(ns, label_selector=sel).items
            ),
            *(
                f"cm/{c.metadata.name}"
                for c in api["core"].list_namespaced_config_map(ns, label_selector=sel).items
            ),
            *(
                f"secret/{s.metadata.name}"
                for s in api["core"].list_namespaced_secret(ns, label_selector=sel).items
            ),
            *(f"pod/{p.metadata.name}" for p in api["core"].list_namespaced_pod(ns).items),
        ]
        return left

    wait_for(lambda: not empty(), 90, "every child and pod to be garbage-collected", 1)


# The jobs of the kill test: (name, spec overrides, data rows or text, expected end state).
BAD_DATA = _rows(3) + '\n{"prompt": "x"}\n'


def _kill_test_jobs() -> list[tuple[str, dict[str, Any], str | None, tuple[str, str]]]:
    jobs: list[tuple[str, dict[str, Any], str | None, tuple[str, str]]] = []
    for i, ms in enumerate([1500, 4000, 8000, 12000, 18000, 25000]):
        jobs.append(
            (
                f"train-{i}",
                {"annotations": {"kubetune.dev/sim-run-ms": str(ms)}},
                None,
                ("Succeeded", "Completed"),
            )
        )
    jobs.append(("plan-only", {"planOnly": True}, None, ("Succeeded", "PlanOnly")))
    jobs.append(("bad-data", {}, BAD_DATA, ("Failed", "DataError")))
    jobs.append(
        (
            "exit-78",
            {
                "labels": {"kubetune.dev/sim-exit-code": "78"},
                "annotations": {"kubetune.dev/sim-run-ms": "3000"},
            },
            None,
            ("Failed", "ConfigError"),
        )
    )
    jobs.append(
        (
            "too-big",
            {
                "model": {"uri": "hf://meta-llama/Llama-2-70b-hf"},
                "method": {"type": "Full"},
                "resources": {"numNodes": 1, "gpusPerNode": 1, "gpuMemoryGiB": 8},
                "deepspeed": {"zeroStage": 0, "offload": "None"},
            },
            None,
            ("Failed", "DoesNotFit"),
        )
    )
    return jobs


def test_operator_killed_20_times_while_10_jobs_run_loses_and_duplicates_nothing(
    api_client: Any,
    api: dict[str, Any],
    namespace: str,
    operators: list[OperatorSubprocess],
) -> None:
    rng = random.Random(8)
    recorder = Recorder(api_client, namespace)
    recorder.start()
    jobs = _kill_test_jobs()
    pending = list(jobs)
    op = operators[0]
    op.start()
    kills = 0
    started = time.monotonic()
    try:
        while kills < 20:
            # New jobs arrive while the operator is up or down, so they are caught at
            # every stage: before planning, planned, running, finishing.
            for _ in range(min(len(pending), rng.choice([0, 1, 2]))):
                name, spec, data, _end = pending.pop(0)
                _create(api, namespace, _ftj(name, **spec), data=data)
            time.sleep(rng.uniform(0.3, 4.0))
            op.kill()
            kills += 1
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.5, 3.0))  # sometimes nobody is running
            op.start()
        for name, spec, data, _end in pending:
            _create(api, namespace, _ftj(name, **spec), data=data)
        names = [j[0] for j in jobs]
        _wait_all_terminal(api, namespace, names, timeout=180)
        elapsed = time.monotonic() - started
        for name, _spec, _data, end in jobs:
            assert _terminal(_get(api, namespace, name)) == end, name
        # Never two "Created" events for one training Job, whatever the kills (an event
        # can be lost: a kill between creating the Job and writing the status).
        events = api["core"].list_namespaced_event(namespace).items
        created = [
            e.involved_object.name
            for e in events
            if e.reason == "Created" and e.involved_object.kind == "FineTuneJob"
        ]
        assert len(created) == len(set(created)), created
        assert set(created) <= {
            n for n, _s, _d, end in jobs if end[1] in ("Completed", "ConfigError")
        }
        # The training Jobs never failed a pod they should not have.
        for name, _spec, _data, end in jobs:
            if end == ("Succeeded", "Completed"):
                job = api["batch"].read_namespaced_job(f"{name}-train", namespace)
                assert not job.status.failed, name
    finally:
        op.kill()
        recorder.finish()
    recorder.assert_monotonic()
    recorder.assert_no_child_recreated()
    assert set(recorder.statuses) == {j[0] for j in jobs}
    print(f"20 kills, {len(jobs)} jobs, {elapsed:.0f} s")
    _assert_nothing_left(api, namespace)


def test_api_server_outage_of_30s_is_survived_without_failing_a_job(
    dev_cluster: Any,
    api_client: Any,
    api: dict[str, Any],
    namespace: str,
    operators: list[OperatorSubprocess],
) -> None:
    op = operators[0]
    op.start()
    names = [f"long-{i}" for i in range(3)]
    for i, name in enumerate(names):
        spec = {"annotations": {"kubetune.dev/sim-run-ms": str(15000 + 5000 * i)}}
        _create(api, namespace, _ftj(name, **spec))

    def all_running() -> bool:
        return all(
            (_get(api, namespace, n).get("status") or {}).get("state") == "Running" for n in names
        )

    wait_for(all_running, 60, "the jobs to run")
    dev_cluster.stop_component("kube-apiserver")
    try:
        time.sleep(30)
    finally:
        dev_cluster.start_component("kube-apiserver")
    # Created right after the outage: the operator must have reconnected its watches.
    _create(api, namespace, _ftj("after", annotations={"kubetune.dev/sim-run-ms": "1000"}))
    _wait_all_terminal(api, namespace, [*names, "after"], timeout=180)
    for name in [*names, "after"]:
        assert _terminal(_get(api, namespace, name)) == ("Succeeded", "Completed"), name
    assert op.proc is not None
    assert op.proc.poll() is None  # the operator did not crash either


def test_a_node_deleted_under_a_running_job_is_not_counted_as_a_failure(
    dev_cluster: Any,
    api: dict[str, Any],
    namespace: str,
    operators: list[OperatorSubprocess],
) -> None:
    """backoffLimit 0: any counted pod failure fails the job. Deleting the node makes the
    pod garbage collector fail the pod with DisruptionTarget (DeletionByPodGC), which the
    podFailurePolicy ignores: a new pod runs elsewhere and the job succeeds."""
    from kubetune.devcluster.components import GpuNodePool, gpu_node_manifests

    op = operators[0]
    op.start()
    _create(
        api,
        namespace,
        _ftj(
            "evicted",
            backoffLimit=0,
            resources={"numNodes": 1, "gpusPerNode": 8},
            annotations={"kubetune.dev/sim-run-ms": "150000"},
        ),
    )

    def running_pod() -> Any:
        pods = api["core"].list_namespaced_pod(namespace, label_selector="job-name=evicted-train")
        return next((p for p in pods.items if p.status.phase == "Running"), None)

    pod = wait_for(running_pod, 60, "the training pod to run")
    node = pod.spec.node_name
    first_uid = pod.metadata.uid
    manifest = next(m for m in gpu_node_manifests(GpuNodePool()) if m["metadata"]["name"] == node)
    api["core"].delete_node(node)
    try:
        seen: list[tuple[str, list[tuple[str, str, str]]]] = []

        def replaced() -> Any:
            pods = api["core"].list_namespaced_pod(namespace).items
            for p in pods:
                if p.metadata.uid == first_uid:  # how the old pod ends
                    conds = [(c.type, c.status, c.reason) for c in p.status.conditions or []]
                    if not seen or seen[-1] != (p.status.phase, conds):
                        seen.append((p.status.phase, conds))
            new = running_pod()
            return new if new is not None and new.metadata.uid != first_uid else None

        # The pod GC waits 40 s for a missing node before it acts, and runs every 20 s.
        try:
            new = wait_for(replaced, 150, "a replacement pod on another node", interval=0.2)
        except AssertionError as exc:
            pods = api["core"].list_namespaced_pod(namespace).items
            detail = [
                (
                    p.metadata.name,
                    p.spec.node_name,
                    p.status.phase,
                    p.metadata.deletion_timestamp,
                    p.metadata.finalizers,
                    [(c.type, c.status, c.reason) for c in p.status.conditions or []],
                )
                for p in pods
            ]
            job = api["batch"].read_namespaced_job("evicted-train", namespace).status
            raise AssertionError(f"{exc}\npods: {detail}\njob: {job}") from None
        assert new.spec.node_name != node
        job = api["batch"].read_namespaced_job("evicted-train", namespace)
        assert not job.status.failed  # ignored by podFailurePolicy, not counted
        obj = _get(api, namespace, "evicted")
        assert _cond(obj, "Failed") is None
        assert obj["status"]["state"] == "Running"
        # What the old pod went through (the pod GC marks it Failed with DisruptionTarget
        # DeletionByPodGC before deleting it, when we catch it in time).
        print("old pod:", seen)
        failed = [conds for phase, conds in seen if phase == "Failed"]
        for conds in failed:
            assert ("DisruptionTarget", "True", "DeletionByPodGC") in conds
    finally:
        with contextlib.suppress(ApiException):
            api["core"].create_node(manifest)
        wait_for(
            lambda: any(
                c.type == "Ready" and c.status == "True"
                for c in (api["core"].read_node(node).status.conditions or [])
            ),
            60,
            f"{node} back and Ready",
        )


def test_two_replicas_never_both_handle_a_job(
    api: dict[str, Any], namespace: str, operators: list[OperatorSubprocess]
) -> None:
    a, b = operators
    a.start()
    b.start()

    def holder() -> str:
        lease = client.CoordinationV1Api(api["core"].api_client).read_namespaced_lease(
            "kubetune-operator", namespace
        )
        return str(lease.spec.holder_identity or "")

    def both_up() -> bool:
        try:
            a.reconciles()
            b.reconciles()
            return bool(holder())
        except (OSError, ApiException):
            return False

    wait_for(both_up, 60, "both operators up, one holding the Lease", interval=0.5)
    leader, standby = (a, b) if holder() == "op-0" else (b, a)
    names = [f"pair-{i}" for i in range(5)]
    for name in names:
        _create(api, namespace, _ftj(name, annotations={"kubetune.dev/sim-run-ms": "1000"}))
    _wait_all_terminal(api, namespace, names, timeout=120)
    assert leader.reconciles() > 0
    assert standby.reconciles() == 0  # it never touched a job
    events = [
        e
        for e in api["core"].list_namespaced_event(namespace).items
        if e.involved_object.kind == "FineTuneJob"
    ]
    for reason in ("PlanReady", "Created", "Completed"):
        assert sorted(e.involved_object.name for e in events if e.reason == reason) == names

    # The leader dies without releasing the Lease: the standby takes over after it expires.
    leader.kill()
    _create(api, namespace, _ftj("after-failover", annotations={"kubetune.dev/sim-run-ms": "1"}))
    _wait_all_terminal(api, namespace, ["after-failover"], timeout=60)
    assert standby.reconciles() > 0
    assert holder() == standby.env["POD_NAME"]


def _trainer_pgids(namespace: str, name: str) -> set[int]:
    """Process groups of the local processes that run this job's training pod."""
    want = {f"KUBETUNE_JOB_NAME={name}".encode(), f"KUBETUNE_JOB_NAMESPACE={namespace}".encode()}
    found: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            if want <= env:
                found.add(os.getpgid(int(proc.name)))
        except (OSError, ProcessLookupError):
            continue
    return found


def test_a_training_pod_killed_after_a_checkpoint_is_retried_and_resumes(
    dev_cluster: Any,
    api: dict[str, Any],
    namespace: str,
    operators: list[OperatorSubprocess],
    tmp_path: Path,
) -> None:
    """The real trainer on the local pod runner is SIGKILLed once a checkpoint exists: the
    Job counts one failure (within backoffLimit), a new pod resumes from the checkpoint, the
    steps before it are not trained again, and the job succeeds with its result."""
    op = operators[0]
    op.start()
    out = tmp_path / "out"
    job = _real_trainer_job(
        dev_cluster,
        tmp_path,
        "resumed",
        out,
        method={"type": "LoRA"},
        hyperparameters={"epochs": 6, "evalSteps": 4},
    )
    _create(api, namespace, job, rows=None)
    ckpts = out / "checkpoints"

    def checkpointed() -> list[int]:
        return sorted(
            int(d.name.split("-")[1])
            for d in ckpts.glob("checkpoint-*")
            if (d / "trainer_state.json").exists()
        )

    wait_for(checkpointed, 300, "the first checkpoint", interval=0.5)
    groups = _trainer_pgids(namespace, "resumed")
    assert groups
    last = checkpointed()[-1]
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    done = _wait_cond(api, namespace, "resumed", "Succeeded", timeout=420)
    assert done["reason"] in ("Completed", "EarlyStopped")
    train = api["batch"].read_namespaced_job("resumed-train", namespace)
    assert train.status.failed == 1  # the kill, counted within backoffLimit
    assert _cond(_get(api, namespace, "resumed"), "Failed") is None
    steps = [
        r["step"]
        for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        if r.get("train_loss") is not None
    ]
    for step in range(1, last + 1):
        assert steps.count(step) == 1, (step, last, steps)  # not trained again
    assert (out / "final" / "adapter_config.json").exists()
