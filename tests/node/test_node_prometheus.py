"""Prometheus scrapes the real pods: the prometheus binary built in tools/ discovers the
chart's operator pod (through its Service's endpoints) and a training run's rank 0 (by pod
IP) with Kubernetes service discovery against the node cluster's API server, relabelled as
the chart's ServiceMonitor and PodMonitor say (prometheus-operator is not installed: their
specs are rendered by `helm template` and translated, as in the cluster tier's Prometheus
test). A FineTuneJob on the real node stops early, so that every query of the Grafana
dashboard has data from real pods: the trainer's series and the operator's reconciles,
latencies and early stops."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.test_prometheus import (
    RATE_INTERVAL,
    SCRAPE_INTERVAL,
    Prometheus,
    _panel_queries,
    pod_monitor_scrape_config,
    service_monitor_scrape_config,
)
from tests.node.conftest import CHART, finished_ftj, jsonl_config_map, operator_pod, output_claim
from tests.waiting import wait_for

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]

ROWS = [
    {"prompt": f"Q: what is {a} minus {b}?", "completion": f" A: {a - b}."}
    for a in range(8)
    for b in range(8)
]


def _monitors(helm: list[str], namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The PodMonitor and ServiceMonitor of the installed release, as the chart renders them."""
    result = subprocess.run(
        [
            *helm,
            "template",
            "kubetune",
            str(CHART),
            "--namespace",
            namespace,
            "--set",
            "metrics.podMonitor.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    [pod_monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    [service_monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    return pod_monitor, service_monitor


def _discovered(config: dict[str, Any], role: str, kubeconfig: Path, ns: str) -> dict[str, Any]:
    """A translated scrape config with Kubernetes service discovery instead of its file."""
    out = {k: v for k, v in config.items() if k != "file_sd_configs"}
    out["kubernetes_sd_configs"] = [
        {"role": role, "kubeconfig_file": str(kubeconfig), "namespaces": {"names": [ns]}}
    ]
    return out


def test_prometheus_discovers_and_scrapes_the_real_pods_for_every_dashboard_query(
    node_cluster: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    system, ns = installed["system"], installed["jobs"]
    wait_for(lambda: operator_pod(core, system), 240, "the operator pod")
    helm = [str(node_cluster.bins.helm), f"--kubeconfig={node_cluster.layout.kubeconfig}"]
    pod_monitor, service_monitor = _monitors(helm, system)
    kubeconfig = Path(node_cluster.layout.kubeconfig)
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            _discovered(pod_monitor_scrape_config(pod_monitor, tmp_path), "pod", kubeconfig, ns),
            _discovered(
                service_monitor_scrape_config(service_monitor, tmp_path),
                "endpoints",
                kubeconfig,
                system,
            ),
        ],
    }
    prom = Prometheus(tmp_path, config)
    try:
        out = output_claim(core, ns, "prom-out", tmp_path_factory.mktemp("prom-pv"))
        jsonl_config_map(core, ns, "diffs", ROWS)
        name = "diffs"
        # As the cluster tier's run: patience 2 and a minimum improvement no run makes stop
        # it at its third evaluation (NoImprovement, decided by the operator from rank 0's
        # metrics), evaluations 200 steps apart so that rate() panels see counters move
        # over several scrapes, and a probe budget that lets every evaluation probe.
        job = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": "hf://kubetune/tiny-llama-en"},
                "dataset": {"uri": "configmap://diffs/train.jsonl", "validationSplit": 0.2},
                "output": {"uri": "pvc://prom-out/diffs"},
                "method": {"type": "LoRA"},
                "resources": {"numNodes": 1, "gpusPerNode": 0},
                "hyperparameters": {
                    "epochs": 100,
                    "learningRate": 0.02,
                    "evalSteps": 200,
                    "warmupSteps": 0,
                    "microBatchSize": 8,
                    "gradientAccumulationSteps": 1,
                },
                "earlyStopping": {
                    "enabled": True,
                    "patience": 2,
                    "minDelta": 100,
                    "forgetting": {"enabled": False},
                    "memorization": {"enabled": False},
                },
                "diagnostics": {"maxOverhead": 1.0},
            },
        }
        started = time.time()
        custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", ns, "finetunejobs", job)

        obj = wait_for(
            lambda: finished_ftj(custom, ns, name), 900, "the FineTuneJob to finish", interval=2
        )
        assert (obj["status"].get("earlyStop") or {}).get("reason") == "NoImprovement", json.dumps(
            obj["status"]
        )[:3000]
        time.sleep(3)  # the operator's counters: a few more scrapes
        ended = time.time()

        # Discovery found the real pods: the operator through its Service and rank 0 of
        # the training Job by its pod IP on the node's bridge; the prepare pod is dropped.
        targets = prom.api("targets")["data"]
        seen = {
            (t["scrapePool"], t["labels"].get("pod", ""), t["labels"].get("namespace"))
            for t in targets["activeTargets"]
        }
        pools = {pool for pool, _, _ in seen}
        assert any(p.startswith("podMonitor/") for p in pools), seen
        assert any(p.startswith("serviceMonitor/") for p in pools), seen
        # Of this job's pods only rank 0 of the training Job (the namespace also holds the
        # other node tests' jobs, whose rank-0 pods are discovered too).
        trainer_pods = {
            t["labels"].get("pod", "")
            for t in targets["activeTargets"]
            if t["scrapePool"].startswith("podMonitor/") and t["labels"].get("finetunejob") == name
        }
        assert trainer_pods, seen
        assert all(p.startswith(f"{name}-train-0-") for p in trainer_pods), trainer_pods
        series = prom.api("series", **{"match[]": "kubetune_step"})["data"]
        assert {(s["namespace"], s["finetunejob"]) for s in series} == {(ns, name)}, series
        addresses = {
            t["discoveredLabels"].get("__address__", "").split(":")[0]
            for t in targets["activeTargets"]
        }
        assert not [a for a in addresses if a.startswith("127.")], addresses

        # Every panel's query parses and returns data from those pods.
        empty: list[str] = []
        for title, expr in _panel_queries():
            query = (
                expr.replace("$namespace", ns)
                .replace("$job", name)
                .replace("$__rate_interval", RATE_INTERVAL)
            )
            answer = prom.api(
                "query_range", query=query, start=f"{started:.3f}", end=f"{ended:.3f}", step="1"
            )
            assert answer.get("status") == "success", f"{title}: {query}: {answer}"
            if not any(r["values"] for r in answer["data"]["result"]):
                empty.append(f"{title}: {query}")
        assert empty == [], "queries without data:\n" + "\n".join(empty)
        assert (out / "diffs" / "report.json").is_file()
    finally:
        prom.stop()
