"""Operator at scale (issue 7, item 1).

On the local control plane (kubetune.devcluster.DevCluster) with kwok simulating 100 nodes
of 8 GPUs, N FineTuneJobs (ConfigMap datasets, planned in-process by the operator) are
applied at once, with the operator as its own process (``python -m kubetune.operator``).
Measured: time until every job has its training Job; reconcile latency p50/p99 from the
operator's ``kubetune_operator_reconcile_duration_seconds`` histogram; operator CPU seconds
and peak RSS (/proc VmHWM); operator API requests per job. The floor is a fresh cluster of
the same size where a bare Python client creates the same objects directly: the dataset
ConfigMaps and each job's plan ConfigMap, control Secret, headless Service and Job (copied
from the ones the operator made). Both sides create with the same 8 client threads, and the
same poll decides when all Jobs exist. Then the scrape phase: the training pods stay
Running (``kubetune.dev/sim-run-ms``), and the operator's resync visits each running job
(rank 0 lookup and a metrics request); operator CPU per round and the API server's CPU.

    .venv/bin/python bench/operator_scale.py            # 1,000 jobs (several minutes)
    .venv/bin/python bench/operator_scale.py --smoke    # 20 jobs, 10 nodes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, header, record
from kubetune.devcluster import components as c
from kubetune.devcluster.cluster import DevCluster, free_port

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
CRD_FILE = ROOT / "crds" / "kubetune.dev_finetunejobs.yaml"
NAMESPACE = "scale"
THREADS = 8
SIM_RUN_MS = "900000"  # training pods stay Running for the scrape phase
GOALS = {"time_ratio": 1.5, "p99_s": 2.0, "rss_mb": 300.0}


def job_name(i: int) -> str:
    return f"ftj-{i:05d}"


def dataset_rows(n: int) -> str:
    return "\n".join(
        json.dumps({"prompt": f"Define term {i}: ", "completion": f"Term {i} means item {i}."})
        for i in range(n)
    )


def data_config_map(i: int, data: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{job_name(i)}-data"}, "data": {"train.jsonl": data}}


def finetunejob(i: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": job_name(i)},
        "spec": {
            "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "dataset": {"uri": f"configmap://{job_name(i)}-data/train.jsonl"},
            "resources": {"numNodes": 1, "gpusPerNode": 1},
            "annotations": {"kubetune.dev/sim-run-ms": SIM_RUN_MS},
        },
    }


# ---- cluster -----------------------------------------------------------------------------


def start_cluster(root: Path, nodes: int) -> DevCluster:
    cluster = DevCluster(
        root, gpu_pool=c.GpuNodePool(count=nodes), local_runner=False, tie_to_parent=True
    )
    cluster.start(timeout=600)
    return cluster


def install_crd(api_client: Any) -> None:
    import yaml
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    body = yaml.safe_load(CRD_FILE.read_text())
    ext.create_custom_resource_definition(body)
    name = body["metadata"]["name"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conds = (crd.status.conditions if crd.status else None) or []
        if any(x.type == "Established" and x.status == "True" for x in conds):
            return
        time.sleep(0.5)
    raise RuntimeError("the CRD did not become Established")


def make_apis(cluster: DevCluster) -> dict[str, Any]:
    from kubernetes import client

    api_client = cluster.api_client()
    api_client.configuration.connection_pool_maxsize = THREADS * 2
    api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] = THREADS * 2
    return {
        "client": api_client,
        "core": client.CoreV1Api(api_client),
        "batch": client.BatchV1Api(api_client),
        "custom": client.CustomObjectsApi(api_client),
    }


def ensure_namespace(apis: dict[str, Any]) -> None:
    apis["core"].create_namespace({"metadata": {"name": NAMESPACE}})


def count_jobs(apis: dict[str, Any]) -> int:
    resp = apis["batch"].list_namespaced_job(NAMESPACE, _preload_content=False)
    return len(json.loads(resp.data)["items"])


def count_running_pods(apis: dict[str, Any]) -> int:
    resp = apis["core"].list_namespaced_pod(
        NAMESPACE, field_selector="status.phase=Running", _preload_content=False
    )
    return len(json.loads(resp.data)["items"])


def pod_phases(apis: dict[str, Any]) -> str:
    """Pods by phase, and the first pending pod's scheduling message (why none run)."""
    resp = apis["core"].list_namespaced_pod(NAMESPACE, _preload_content=False)
    pods = json.loads(resp.data)["items"]
    phases: dict[str, int] = {}
    why = ""
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase", "?")
        phases[phase] = phases.get(phase, 0) + 1
        if phase == "Pending" and not why:
            conds = (pod.get("status") or {}).get("conditions") or []
            why = "; ".join(str(x.get("message", "")) for x in conds if x.get("message"))
    text = ", ".join(f"{k} {v}" for k, v in sorted(phases.items())) or "no pods"
    return text + (f" (a pending pod: {why[:200]})" if why else "")


def parallel(fn: Callable[[int], Any], items: Iterable[int]) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(fn, items):
            pass


def wait_jobs(apis: dict[str, Any], n: int, start: float, timeout: float) -> float:
    """Seconds from ``start`` until the namespace holds ``n`` Jobs (polled every second)."""
    while True:
        if count_jobs(apis) >= n:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"fewer than {n} Jobs after {timeout:.0f} s")
        time.sleep(1.0)


# ---- the operator as a process --------------------------------------------------------------


class Operator:
    def __init__(self, kubeconfig: Path, log: Path, sync_interval: float) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_METRICS_PORT": str(self.port),
            "KUBETUNE_LEADER_ELECTION": "false",
            "KUBETUNE_SYNC_INTERVAL_SECONDS": str(sync_interval),
            "PYTHONPATH": str(ROOT),
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune.operator", "--all-namespaces"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                self.metrics()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start; see {log}") from None
                time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return parse_metrics(text)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Profiler:
    """py-spy sampling the operator process (all threads, idle ones left out) while the jobs
    are created; `top` reads its collapsed stacks. py-spy is a bench-only tool (`pip install
    py-spy`); without it `--profile` says so and the run goes on unprofiled."""

    def __init__(self, pid: int, out: Path, rate: int = 50) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        binary = Path(sys.executable).parent / "py-spy"
        if not binary.exists():
            print(f"--profile: {binary} not found (pip install py-spy); not profiling")
            return
        self.proc = subprocess.Popen(
            [
                str(binary),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                str(rate),
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> list[tuple[str, float, float]]:
        """(function, share of samples in it or below, share with it on top), the 15
        largest by the first."""
        if self.proc is None:
            return []
        self.proc.send_signal(2)  # py-spy writes its file on SIGINT
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return top_frames(self.out.read_text() if self.out.exists() else "")


def _frame(frame: str) -> str:
    """'name (path/to/file.py:12)' -> 'name file.py' (all lines of a function as one)."""
    name, _, where = frame.partition(" (")
    return f"{name} {where.rsplit('/', 1)[-1].split(':')[0]}" if where else name


def top_frames(collapsed: str, n: int = 15) -> list[tuple[str, float, float]]:
    """The heaviest functions of py-spy's collapsed stacks ("a;b;c COUNT" lines)."""
    total: dict[str, float] = {}
    own: dict[str, float] = {}
    samples = 0.0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = float(count)
        samples += k
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            total[frame] = total.get(frame, 0.0) + k
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0.0) + k
    if not samples:
        return []
    ranked = sorted(total, key=lambda f: -total[f])[:n]
    return [(f, total[f] / samples, own.get(f, 0.0) / samples) for f in ranked]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of the Prometheus text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


HIST = "kubetune_operator_reconcile_duration_seconds"


def histogram(m: dict[str, float]) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of the reconcile histogram."""
    pairs = []
    for key, value in m.items():
        if key.startswith(HIST + "_bucket"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            pairs.append((float("inf") if le == "+Inf" else float(le), value))
    return sorted(pairs)


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket holding the quantile."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / width if width else 1
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    prior = dict(before)
    return [(b, v - prior.get(b, 0.0)) for b, v in after]


# ---- the two phases ------------------------------------------------------------------------


def operator_run(
    n: int, nodes: int, scrape_s: float, sync: float, work: Path, profile: bool = False
) -> dict[str, Any]:
    cluster = start_cluster(work / "op", nodes)
    op: Operator | None = None
    try:
        apis = make_apis(cluster)
        install_crd(apis["client"])
        ensure_namespace(apis)
        op = Operator(
            cluster.layout.kubeconfig,
            Path(os.environ.get("KUBETUNE_OPERATOR_LOG") or work / "operator.log"),
            sync,
        )
        time.sleep(2)
        cpu0, m0 = op.cpu_seconds(), op.metrics()
        data = dataset_rows(200)

        def apply(i: int) -> None:
            apis["core"].create_namespaced_config_map(NAMESPACE, data_config_map(i, data))
            apis["custom"].create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(i)
            )

        out = Path(os.environ.get("KUBETUNE_PROFILE_OUT") or work / "profile.txt")
        profiler = Profiler(op.proc.pid, out) if profile else None
        start = time.monotonic()
        parallel(apply, range(n))
        applied = time.monotonic() - start
        seconds = wait_jobs(apis, n, start, timeout=max(600.0, n * 2.0))
        cpu1, m1 = op.cpu_seconds(), op.metrics()
        top = profiler.stop() if profiler is not None else []
        templates = children_of(apis, job_name(0))
        result: dict[str, Any] = {
            "seconds": seconds,
            "applied_s": applied,
            "cpu_s": cpu1 - cpu0,
            "peak_rss_mb": op.peak_rss_mb(),
            "rss_mb": op.rss_mb(),
            "reconciles": m1.get(HIST + "_count", 0) - m0.get(HIST + "_count", 0),
            "api_requests": m1.get("kubetune_operator_api_requests_total", 0)
            - m0.get("kubetune_operator_api_requests_total", 0),
            "p50": quantile(delta(histogram(m1), histogram(m0)), 0.50),
            "p99": quantile(delta(histogram(m1), histogram(m0)), 0.99),
            "templates": templates,
            "profile": top,
        }
        # Scrape phase: let the pods start, then watch whole resync rounds.
        deadline = time.monotonic() + 120
        running = count_running_pods(apis)
        while time.monotonic() < deadline:
            time.sleep(5)
            now = count_running_pods(apis)
            if now == running and now > 0:
                break
            running = now
        result["pod_phases"] = pod_phases(apis)
        api_pid = next(p.pid for p in cluster.state.processes if p.name == "kube-apiserver")  # type: ignore[union-attr]
        cpu2, m2, api2 = op.cpu_seconds(), op.metrics(), proc_cpu_seconds(api_pid)
        time.sleep(scrape_s)
        cpu3, m3, api3 = op.cpu_seconds(), op.metrics(), proc_cpu_seconds(api_pid)
        rounds = scrape_s / sync
        result.update(
            {
                "running_pods": running,
                "scrape_s": scrape_s,
                "sync_s": sync,
                "scrape_cpu_per_round": (cpu3 - cpu2) / rounds,
                "scrape_reconciles": m3.get(HIST + "_count", 0) - m2.get(HIST + "_count", 0),
                "scrape_api_requests": m3.get("kubetune_operator_api_requests_total", 0)
                - m2.get("kubetune_operator_api_requests_total", 0),
                "scrape_p50": quantile(delta(histogram(m3), histogram(m2)), 0.50),
                "scrape_p99": quantile(delta(histogram(m3), histogram(m2)), 0.99),
                "apiserver_cpu_per_s": (api3 - api2) / scrape_s,
                "peak_rss_mb": op.peak_rss_mb(),
            }
        )
        return result
    finally:
        if op is not None:
            op.stop()
        cluster.stop()


def children_of(apis: dict[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    """The plan ConfigMap, control Secret, headless Service and training Job of one job, as
    creatable bodies (server fields, owner references and generated selectors removed)."""
    client = apis["client"]
    found: list[tuple[str, dict[str, Any]]] = []
    kinds = [
        ("configmap", apis["core"].read_namespaced_config_map, f"{name}-config"),
        ("secret", apis["core"].read_namespaced_secret, f"{name}-control"),
        ("service", apis["core"].read_namespaced_service, None),
        ("job", apis["batch"].read_namespaced_job, f"{name}-train"),
    ]
    services = apis["core"].list_namespaced_service(NAMESPACE).items
    for kind, read, child in kinds:
        if kind == "service":
            matches = [s.metadata.name for s in services if s.metadata.name.startswith(name)]
            child = matches[0]
        obj = client.sanitize_for_serialization(read(child, NAMESPACE))
        meta = obj["metadata"]
        for key in (
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
            "ownerReferences",
            "generation",
        ):
            meta.pop(key, None)
        obj.pop("status", None)
        if kind == "service":
            for key in ("clusterIP", "clusterIPs"):
                obj["spec"].pop(key, None)
        if kind == "job":
            obj["spec"].pop("selector", None)
            for labels in (
                meta.get("labels") or {},
                obj["spec"]["template"]["metadata"].get("labels") or {},
            ):
                for key in list(labels):
                    if "controller-uid" in key or key in (
                        "job-name",
                        "batch.kubernetes.io/job-name",
                    ):
                        labels.pop(key)
        found.append((kind, obj))
    return found


def floor_run(
    n: int, nodes: int, templates: list[tuple[str, dict[str, Any]]], work: Path
) -> dict[str, Any]:
    cluster = start_cluster(work / "floor", nodes)
    try:
        apis = make_apis(cluster)
        ensure_namespace(apis)
        data = dataset_rows(200)
        creators = {
            "configmap": apis["core"].create_namespaced_config_map,
            "secret": apis["core"].create_namespaced_secret,
            "service": apis["core"].create_namespaced_service,
            "job": apis["batch"].create_namespaced_job,
        }
        text = {kind: json.dumps(body) for kind, body in templates}

        def create(i: int) -> None:
            apis["core"].create_namespaced_config_map(NAMESPACE, data_config_map(i, data))
            for kind, _ in templates:
                body = json.loads(text[kind].replace(job_name(0), job_name(i)))
                creators[kind](NAMESPACE, body)

        start = time.monotonic()
        parallel(create, range(n))
        seconds = wait_jobs(apis, n, start, timeout=max(600.0, n * 2.0))
        return {"seconds": seconds, "requests_per_job": 1 + len(templates)}
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="20 jobs on 10 nodes")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--sync-s", type=float, default=15.0, help="the operator's resync period")
    ap.add_argument("--scrape-s", type=float, default=None, help="scrape phase length")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the operator while it creates (top 15)"
    )
    ap.add_argument("--no-floor", action="store_true", help="the operator side only (profiling)")
    args = ap.parse_args(argv)
    n = args.jobs or (20 if args.smoke else 1000)
    nodes = args.nodes or (10 if args.smoke else 100)
    scrape_s = args.scrape_s or (2 * args.sync_s if args.smoke else 4 * args.sync_s)
    with tempfile.TemporaryDirectory(prefix="kubetune-scale-") as tmp:
        work = Path(tmp)
        op = operator_run(n, nodes, scrape_s, args.sync_s, work, args.profile)
        floor = (
            {"seconds": float("nan"), "requests_per_job": 0}
            if args.no_floor
            else floor_run(n, nodes, op["templates"], work)
        )
    ratio = op["seconds"] / floor["seconds"]
    goals = [
        ("all jobs reconciled within 1.5x the floor", ratio <= GOALS["time_ratio"]),
        ("p99 reconcile under 2 s", op["p99"] < GOALS["p99_s"]),
        ("peak RSS under 300 MB", op["peak_rss_mb"] < GOALS["rss_mb"]),
    ]
    lines = [
        f"{n:,} FineTuneJobs (ConfigMap datasets of 200 rows, Llama-2-7B, 1 GPU each, planned "
        f"in-process) on {nodes} kwok nodes x 8 GPUs; {THREADS} client threads; the operator "
        f"as its own process, resync every {args.sync_s:g} s.",
        "",
        "| what | operator | floor (bare client) |",
        "|---|---:|---:|",
        f"| time until every job has its training Job | {op['seconds']:.1f} s "
        f"| {floor['seconds']:.1f} s |",
        f"| ratio to the floor | {ratio:.2f} | 1.00 |",
        f"| client's own creates (time they took) | 2 per job ({op['applied_s']:.1f} s) "
        f"| {floor['requests_per_job']} per job |",
        f"| operator API requests per job | {op['api_requests'] / n:.1f} | - |",
        f"| reconciles (per job) | {op['reconciles']:.0f} ({op['reconciles'] / n:.1f}) | - |",
        f"| reconcile p50 / p99 | {op['p50'] * 1000:.0f} ms / {op['p99'] * 1000:.0f} ms | - |",
        f"| operator CPU | {op['cpu_s']:.1f} s ({op['cpu_s'] / n * 1000:.1f} ms per job) | - |",
        f"| operator peak RSS (VmHWM, whole run) | {op['peak_rss_mb']:.0f} MB | - |",
        "",
        f"Scrape phase: {op['running_pods']} training pods Running ({nodes * 8} GPUs for "
        f"{n:,} 1-GPU jobs; pods: {op['pod_phases']}), watched for {op['scrape_s']:.0f} s = "
        f"{op['scrape_s'] / op['sync_s']:.0f} resync rounds: operator CPU "
        f"**{op['scrape_cpu_per_round']:.2f} s per round**, "
        f"{op['scrape_reconciles']:.0f} reconciles, {op['scrape_api_requests']:.0f} API "
        f"requests, reconcile p50 / p99 {op['scrape_p50'] * 1000:.0f} / "
        f"{op['scrape_p99'] * 1000:.0f} ms; kube-apiserver CPU "
        f"{op['apiserver_cpu_per_s']:.2f} cores meanwhile. kwok pods have no real metrics "
        "endpoint: each rank-0 metrics request fails (2 s timeout at most).",
        "",
        "Goals: "
        + "; ".join(f"{name}: {'**met**' if ok else '**missed**'}" for name, ok in goals)
        + ". Quantiles are Prometheus-style interpolations inside the histogram's buckets "
        "(0.005 ... 10 s).",
    ]
    if op["profile"]:
        lines += [
            "",
            "Profile of the operator while it creates (py-spy, every thread; share of samples):",
            "",
            "| function | in it or below | on top |",
            "|---|---:|---:|",
            *(f"| `{f}` | {t:.1%} | {o:.1%} |" for f, t, o in op["profile"]),
        ]
    title = "Operator at scale (bench/operator_scale.py)" + (" (smoke)" if args.smoke else "")
    record(
        header(title) + "\n" + "\n".join(lines),
        enabled=not (args.smoke or args.no_record or args.no_floor),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
