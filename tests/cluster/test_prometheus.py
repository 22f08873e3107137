"""Prometheus, for real: the prometheus binary built in tools/ scrapes a real local training
run and the operator's metrics endpoint with the relabelling the chart's PodMonitor and
ServiceMonitor imply, then every query of the Grafana dashboard runs through its HTTP API
and must parse and return data. `promtool check metrics` lints both endpoints' output.

With KUBETUNE_DASHBOARD_PREVIEW=<path.json> set, the test also saves every panel's range-query
results there: `charts/render_preview.py` draws docs/dashboard-preview.png from that file."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.devcluster.binaries import find_binaries, require
from kubetune.devcluster.cluster import free_port
from kubetune.devcluster.components import local_runner_pod_placement
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings
from tests.cluster.test_helm import by_kind, template
from tests.cluster.test_operator import OperatorProcess, running_operator
from tests.plans import plan_document
from tests.trainer.conftest import MakeRun, make_run, tiny_model  # noqa: F401
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"
NAMESPACE, JOB = "ml-team", "glossary"
SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _relabelings(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prometheus-operator's RelabelConfig (camelCase) -> Prometheus' relabel_config."""
    keys = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "regex": "regex",
        "action": "action",
        "replacement": "replacement",
        "separator": "separator",
        "modulus": "modulus",
    }
    return [{keys[k]: v for k, v in item.items()} for item in items]


def pod_monitor_scrape_config(monitor: dict[str, Any], targets: Path) -> dict[str, Any]:
    """The scrape config prometheus-operator generates for a PodMonitor (role: pod), with the
    Kubernetes service discovery replaced by a file whose targets carry the same __meta_
    labels kubernetes_sd would give the pods."""
    meta = monitor["metadata"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    relabel: list[dict[str, Any]] = [
        {
            "action": "keep",
            "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(k)}"],
            "regex": v,
        }
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    ]
    relabel += [
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        *_relabelings(endpoint.get("relabelings") or []),
    ]
    return {
        "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/0",
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        "metrics_path": endpoint.get("path", "/metrics"),
        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        "relabel_configs": relabel,
    }


def service_monitor_scrape_config(monitor: dict[str, Any], targets: Path) -> dict[str, Any]:
    """The same for the operator's ServiceMonitor (role: endpoints)."""
    meta = monitor["metadata"]
    [endpoint] = monitor["spec"]["endpoints"]
    relabel: list[dict[str, Any]] = [
        {
            "action": "keep",
            "source_labels": [f"__meta_kubernetes_service_label_{_sanitize(k)}"],
            "regex": v,
        }
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    ]
    relabel += [
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "regex": endpoint["port"],
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    return {
        "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/0",
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        "metrics_path": endpoint.get("path", "/metrics"),
        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        "relabel_configs": relabel,
    }


def trainer_pod_targets(trainer_port: int, decoy_port: int) -> list[dict[str, Any]]:
    """What kubernetes_sd would list for one 2-node run and its prepare pod: the real
    trainer is rank 0; rank 1 and the prepare pod must be dropped by the relabelling."""
    from kubetune.api import parse_job

    ref = builders.JobRef(name=JOB, namespace=NAMESPACE, uid="uid-1")
    spec = parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": JOB},
            "spec": {
                "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                "dataset": {"uri": f"configmap://{JOB}-data/train.jsonl"},
                "resources": {"numNodes": 2},
            },
        }
    ).spec
    job = builders.training_job(ref, spec, plan_document(), OperatorSettings())
    pod = job["spec"]["template"]
    [container] = pod["spec"]["containers"]
    out = []
    for index, address, labels in (
        ("0", f"127.0.0.1:{trainer_port}", pod["metadata"]["labels"]),
        ("1", f"127.0.0.1:{decoy_port}", pod["metadata"]["labels"]),
        (None, f"127.0.0.1:{decoy_port}", builders.labels(ref, "prepare")),
    ):
        for port in container["ports"]:
            meta = {
                "__meta_kubernetes_namespace": NAMESPACE,
                "__meta_kubernetes_pod_name": f"{JOB}-train-{index}-abcde",
                "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_port_name": port["name"],
                **{f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in labels.items()},
            }
            if index is not None:
                key = "batch.kubernetes.io/job-completion-index"
                meta[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = index
            host = address if port["name"] == "metrics" else f"127.0.0.1:{decoy_port}"
            out.append({"targets": [host], "labels": meta})
    return out


def operator_targets(service: dict[str, Any], port: int) -> list[dict[str, Any]]:
    labels = {
        f"__meta_kubernetes_service_label_{_sanitize(k)}": v
        for k, v in service["metadata"]["labels"].items()
    }
    return [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "__meta_kubernetes_namespace": service["metadata"]["namespace"],
                "__meta_kubernetes_service_name": service["metadata"]["name"],
                "__meta_kubernetes_pod_name": "kubetune-operator-0",
                "__meta_kubernetes_endpoint_port_name": p["name"],
                **labels,
            },
        }
        for p in service["spec"]["ports"]
    ]


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


class Prometheus:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        binaries = find_binaries()
        require([binaries.prometheus, binaries.promtool])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(
            [str(binaries.promtool), "check", "config", str(root / "prometheus.yml")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = (root / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(binaries.prometheus),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 60, "Prometheus to be ready", interval=0.5)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        try:
            return _get_json(f"{self.url}/api/v1/{path}?{query}")
        except urllib.error.HTTPError as exc:  # 400 and 422 carry the error as JSON
            data: dict[str, Any] = json.loads(exc.read())
            return data

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = [(p["title"], tg["expr"]) for p in board["panels"] for tg in p.get("targets", [])]
    out += [
        (f"annotation {a['name']}", a["expr"]) for a in board["annotations"]["list"] if "expr" in a
    ]
    return out


def _substitute(expr: str) -> str:
    return (
        expr.replace("$namespace", NAMESPACE)
        .replace("$job", JOB)
        .replace("$__rate_interval", RATE_INTERVAL)
    )


# Labels no legend uses: dropped from the preview snapshot to keep it small.
_SNAPSHOT_DROP_LABELS = {"__name__", "instance", "job", "endpoint", "container", "pod", "service"}
_SNAPSHOT_MAX_POINTS = 150


def _snapshot_series(result: list[dict[str, Any]], start: float) -> list[dict[str, Any]]:
    """Prometheus matrix -> [{metric, values: [[seconds since start, value or null]]}],
    thinned to at most _SNAPSHOT_MAX_POINTS points a series, values to 6 digits."""
    out = []
    for series in result:
        values = [v for v in series["values"] if float(v[0]) >= start]
        stride = max(1, math.ceil(len(values) / _SNAPSHOT_MAX_POINTS))
        kept = values[::stride]
        if kept and kept[-1] is not values[-1]:
            kept.append(values[-1])
        points: list[list[float | None]] = []
        for ts, raw in kept:
            value = float(raw)
            points.append(
                [
                    round(float(ts) - start, 1),
                    float(f"{value:.6g}") if math.isfinite(value) else None,
                ]
            )
        metric = {k: v for k, v in series["metric"].items() if k not in _SNAPSHOT_DROP_LABELS}
        out.append({"metric": metric, "values": points})
    return out


def write_preview_snapshot(
    path: Path,
    answers: dict[tuple[str, str], dict[str, Any]],
    start: float,
    end: float,
    run: dict[str, Any],
) -> None:
    """Every dashboard panel's (and annotation's) range-query results, in dashboard order."""
    board = json.loads(DASHBOARD.read_text())
    # The window starts just before the trainer's first scrape: the seconds before it (the
    # trainer loading its model) hold no trainer series.
    first = [
        float(series["values"][0][0])
        for (_title, expr), answer in answers.items()
        if expr.startswith("kubetune_step{")
        for series in answer["data"]["result"]
        if series["values"]
    ]
    start = max(start, min(first, default=start) - 3)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    panels = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        targets = []
        for tg in panel.get("targets", []):
            answer = answers[(panel["title"], tg["expr"])]
            targets.append(
                {
                    "refId": tg["refId"],
                    "expr": _substitute(tg["expr"]),
                    "series": _snapshot_series(answer["data"]["result"], start),
                }
            )
        panels.append({"id": panel["id"], "title": panel["title"], "targets": targets})
    annotations = [
        {
            "name": a["name"],
            "expr": _substitute(a["expr"]),
            "series": _snapshot_series(
                answers[(f"annotation {a['name']}", a["expr"])]["data"]["result"], start
            ),
        }
        for a in board["annotations"]["list"]
        if "expr" in a
    ]
    snapshot = {
        "about": "Range-query results of every kubetune dashboard panel, from the real "
        "Prometheus of tests/cluster/test_prometheus.py that scraped a real CPU training run "
        "and the operator. Times are seconds from the window's start, 3 s before the "
        "trainer's first scrape. Rendered by "
        "charts/render_preview.py into docs/dashboard-preview.png.",
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)),
        "commit": commit,
        "run": run,
        "namespace": NAMESPACE,
        "finetunejob": JOB,
        "durationSeconds": round(end - start, 1),
        "stepSeconds": 1,
        "rateInterval": RATE_INTERVAL,
        "panels": panels,
        "annotations": annotations,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_snapshot(snapshot))


def dump_snapshot(snapshot: dict[str, Any]) -> str:
    """JSON with one line per panel and annotation: small, and diffs stay readable."""
    lines = []
    for key, value in snapshot.items():
        if isinstance(value, list):
            items = ",\n".join(f"  {json.dumps(item, separators=(',', ':'))}" for item in value)
            lines.append(f"{json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


class Poller:
    """Keeps the last successful /metrics body of an endpoint while something runs."""

    def __init__(self, url: str, must_contain: str) -> None:
        self.url, self.must_contain = url, must_contain
        self.last: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            if self.must_contain in text:
                self.last = text

    def close(self) -> str | None:
        self.stop.set()
        self.thread.join(timeout=5)
        return self.last


@pytest.fixture(scope="module")
def operator_process(dev_cluster: Any, crd_installed: str) -> Iterator[OperatorProcess]:
    yield from running_operator(str(dev_cluster.layout.kubeconfig))


def _early_stopped_job(dev_cluster: Any, api_client: Any, namespace: str) -> None:
    """A job the (stand-in) trainer stops early: the operator counts it in
    kubetune_operator_early_stops_total."""
    from kubernetes import client

    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    rows = "\n".join(
        json.dumps({"prompt": f"Define term {i}: ", "completion": f"Term {i} means item {i}."})
        for i in range(120)
    )
    client.CoreV1Api(api_client).create_namespaced_config_map(
        namespace, {"metadata": {"name": "early-data"}, "data": {"train.jsonl": rows}}
    )
    custom = client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(
        "kubetune.dev",
        "v1alpha1",
        namespace,
        "finetunejobs",
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "early"},
            "spec": {
                "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
                "dataset": {"uri": "configmap://early-data/train.jsonl"},
                "resources": {"numNodes": 1, "gpusPerNode": 0},
                "nodeSelector": placement["nodeSelector"],
                "tolerations": placement["tolerations"],
                "annotations": {"standin": "early-stop"},
            },
        },
    )

    def stopped() -> bool:
        obj = custom.get_namespaced_custom_object(
            "kubetune.dev", "v1alpha1", namespace, "finetunejobs", "early"
        )
        conds = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "EarlyStopped" and c["status"] == "True" for c in conds)

    wait_for(stopped, 120, "the stand-in job to be EarlyStopped")


def test_every_dashboard_query_returns_data_from_a_real_run_and_the_operator(
    dev_cluster: Any,
    api_client: Any,
    namespace: str,
    operator_process: OperatorProcess,
    make_run: MakeRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    from kubetune.operator import main as operator_main

    # The monitors as the chart renders them.
    docs = template(
        "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"
    )
    [pod_monitor] = by_kind(docs, "PodMonitor")
    [service_monitor] = by_kind(docs, "ServiceMonitor")
    [service] = by_kind(docs, "Service")

    wait_for(lambda: "metrics_port" in operator_main._state, 60, "the operator's /metrics")
    operator_port = int(operator_main._state["metrics_port"])

    trainer_port, decoy_port = free_port(), free_port()
    trainer_sd, operator_sd = tmp_path / "trainer.json", tmp_path / "operator.json"
    trainer_sd.write_text(json.dumps(trainer_pod_targets(trainer_port, decoy_port)))
    operator_sd.write_text(json.dumps(operator_targets(service, operator_port)))
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            pod_monitor_scrape_config(pod_monitor, trainer_sd),
            service_monitor_scrape_config(service_monitor, operator_sd),
        ],
    }
    prom = Prometheus(tmp_path, config)
    try:
        # A real training run that stops early: patience 2 and a minimum improvement no
        # run makes, so it stops at its third evaluation with NoImprovement. For the
        # preview, a run of about a minute (16 evaluations) so that the panels show curves
        # over many 1 s scrapes.
        preview = os.environ.get("KUBETUNE_DASHBOARD_PREVIEW")
        # The CI run stops at its third evaluation: rate() panels need at least two
        # scrapes of a counter after it moved, which a run of two evaluations (about 6 s)
        # did not always give. Evaluations 200 steps apart: 15 apart, the tiny model (over
        # 100 steps/s on this machine) reached its third evaluation 0.6 s after the
        # trainer's start, within one 1 s scrape interval, and Prometheus scraped the
        # trainer once or not at all; 600 steps take a few seconds.
        epochs, eval_steps, patience = (100, 60, 15) if preview else (100, 200, 2)
        run = make_run(
            method="LoRA",
            hp={
                "epochs": epochs,
                "learningRate": 0.02,
                "evalSteps": eval_steps,
                "warmupSteps": 0,
                "microBatchSize": 8,
                "gradientAccumulationSteps": 1,
            },
            spec_extra={
                # The probe rules off: with every evaluation probed, the tiny model's
                # general-text ratio passes 2 at the second and ForgettingExceeded would
                # stop the run before the NoImprovement this test reads (the reason panel
                # shows whichever reason it is).
                "earlyStopping": {
                    "enabled": True,
                    "patience": patience,
                    "minDelta": 100,
                    "forgetting": {"enabled": False},
                    "memorization": {"enabled": False},
                },
                # Two evaluations in a few seconds: under the default 5 % probe budget the
                # probes may skip both (only a final evaluation always probes), and the
                # memorisation panel would have no data. The preview's longer run keeps it.
                **({} if preview else {"diagnostics": {"maxOverhead": 1.0}}),
            },
        )
        run.env["KUBETUNE_METRICS_PORT"] = str(trainer_port)
        started = time.time()
        poller = Poller(f"http://127.0.0.1:{trainer_port}/metrics", "kubetune_eval_loss ")
        log = tmp_path / "trainer.log"
        with log.open("w") as out:
            trainer = subprocess.Popen(run.command, env=run.env, stdout=out, stderr=out)
        try:
            # While the trainer runs, the operator reconciles a job that stops early, so that
            # its panels (reconciles, latency, early stops) have data in the same window.
            wait_for(
                lambda: poller.last is not None or trainer.poll() is not None,
                300,
                "the trainer's /metrics",
            )
            _early_stopped_job(dev_cluster, api_client, namespace)
            returncode = trainer.wait(timeout=420)
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
        trainer_text = poller.close()
        assert returncode == 0, log.read_text()[-4000:]
        assert run.termination()["earlyStop"]["reason"] == "NoImprovement"
        assert trainer_text is not None, "never scraped the trainer's /metrics"
        time.sleep(3)  # the operator's counters: a few more scrapes
        ended = time.time()

        # The relabelling kept rank 0's metrics port and the operator, dropped the rest.
        targets = prom.api("targets")["data"]
        active = {(t["labels"]["job"], t["labels"].get("pod")) for t in targets["activeTargets"]}
        meta_ns = pod_monitor["metadata"]["namespace"]
        assert active == {
            (f"{meta_ns}/{pod_monitor['metadata']['name']}", f"{JOB}-train-0-abcde"),
            (service["metadata"]["name"], "kubetune-operator-0"),
        }
        assert len(targets["droppedTargets"]) >= 4
        series = prom.api("series", **{"match[]": "kubetune_step"})["data"]
        assert {(s["namespace"], s["finetunejob"]) for s in series} == {(NAMESPACE, JOB)}

        # Every panel's query parses and returns data.
        empty: list[str] = []
        answers: dict[tuple[str, str], dict[str, Any]] = {}
        for title, expr in _panel_queries():
            query = _substitute(expr)
            answer = prom.api(
                "query_range",
                query=query,
                start=f"{started:.3f}",
                end=f"{ended:.3f}",
                step="1",
            )
            assert answer.get("status") == "success", f"{title}: {query}: {answer}"
            answers[(title, expr)] = answer
            if not any(r["values"] for r in answer["data"]["result"]):
                empty.append(f"{title}: {query}")
        assert empty == [], "queries without data:\n" + "\n".join(empty)
        if preview:
            history = run.history()
            write_preview_snapshot(
                Path(preview),
                answers,
                started,
                ended,
                {
                    "what": "tests/cluster/test_prometheus.py: LoRA on the test tier's tiny "
                    "random Llama (tests/tinymodel.py), 96 glossary rows, one CPU process, "
                    f"{epochs} epochs planned, {eval_steps} steps between evaluations, "
                    f"early stopping with patience {patience}",
                    "plan": {k: run.plan.get(k) for k in ("method", "zeroStage")},
                    "earlyStop": run.termination()["earlyStop"]["reason"],
                    "evaluations": sum(1 for h in history if h.get("eval_loss") is not None),
                    "steps": max((int(h.get("step", 0)) for h in history), default=0),
                },
            )
    finally:
        prom.stop()

    # promtool lints both endpoints' exposition.
    with urllib.request.urlopen(f"http://127.0.0.1:{operator_port}/metrics", timeout=5) as resp:
        operator_text = resp.read().decode()
    assert "kubetune_operator_early_stops_total{reason=" in operator_text
    promtool = find_binaries().promtool
    for name, text in (("trainer", trainer_text), ("operator", operator_text)):
        lint = subprocess.run(
            [str(promtool), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert lint.returncode == 0, f"{name}: {lint.stdout}{lint.stderr}"
