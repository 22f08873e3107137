"""The operator, run in-process with Kopf against the real local control plane: plans,
children, kwok-simulated and locally-run training, suspend, failures, deletion, restart."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.components import local_runner_pod_placement
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Stands in for the trainer (issue 4) on the local pod runner: it reads what the operator
# gives a training pod and reports it the way the trainer will, in its termination message.
STANDIN_TRAINER = textwrap.dedent("""
    import json, os, sys
    plan = json.loads(os.environ["KUBETUNE_PLAN_JSON"])
    spec = json.loads(os.environ["KUBETUNE_SPEC_JSON"])
    if (spec.get("annotations") or {}).get("standin") == "real-trainer":
        os.execv(sys.executable, [sys.executable, "-m", "kubetune.trainer.launch",
                                  "--standalone", "--nproc-per-node=1",
                                  "-m", "kubetune.trainer"])
    report = {
        "metrics": {"trainLoss": 1.0, "evalLoss": 1.25, "lossGap": 0.25,
                    "evalPerplexity": 3.49, "bestEvalLoss": 1.25, "bestStep": 10},
        "progress": {"step": 10, "totalSteps": 10, "epoch": 1.0, "percentage": 100.0},
        "seen": {"index": os.environ["JOB_COMPLETION_INDEX"], "method": plan["method"],
                 "nodes": os.environ["KUBETUNE_NUM_NODES"], "model": spec["model"]["uri"],
                 "token": bool(open(os.environ["KUBETUNE_CONTROL_TOKEN_FILE"]).read())},
    }
    if (spec.get("annotations") or {}).get("standin") == "early-stop":
        report["earlyStop"] = {"reason": "NoImprovement",
                               "message": "eval loss did not improve for 3 evaluations"}
    with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as f:
        json.dump(report, f)
""")


def _rows(n: int) -> str:
    return "\n".join(
        json.dumps({"prompt": f"Define term {i}: ", "completion": f"Term {i} means item {i}."})
        for i in range(n)
    )


class OperatorProcess:
    """The operator run in-process by Kopf's test runner; stoppable and restartable."""

    def __init__(self, kubeconfig: str) -> None:
        from kubetune.devcluster.cluster import free_port

        self.liveness_port = free_port()
        self.env = {
            "KUBECONFIG": kubeconfig,
            "KUBETUNE_SYNC_INTERVAL_SECONDS": "2",
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", "-c", STANDIN_TRAINER]),
        }
        self.runner: Any = None

    def start(self) -> None:
        from kopf.testing import KopfRunner

        os.environ.update(self.env)
        self.runner = KopfRunner(
            [
                "run",
                "--standalone",
                "--all-namespaces",
                "-m",
                "kubetune.operator.main",
                f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
            ]
        )
        self.runner.__enter__()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.__exit__(None, None, None)
            self.runner = None


def running_operator(kubeconfig: str) -> Iterator[OperatorProcess]:
    """The operator for a test module; the environment it set is restored afterwards."""
    proc = OperatorProcess(kubeconfig)
    saved = {k: os.environ.get(k) for k in proc.env}
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def operator(dev_cluster: Any, crd_installed: str) -> Iterator[OperatorProcess]:
    yield from running_operator(str(dev_cluster.layout.kubeconfig))


def _ftj(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": f"configmap://{name}-data/train.jsonl"},
        "resources": {"numNodes": 2, "gpusPerNode": 8},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def _create(
    api: dict[str, Any],
    ns: str,
    job: dict[str, Any],
    rows: int | None = 300,
    data: str | None = None,
) -> None:
    name = job["metadata"]["name"]
    if rows is not None or data is not None:
        api["core"].create_namespaced_config_map(
            ns,
            {
                "metadata": {"name": f"{name}-data"},
                "data": {"train.jsonl": data if data is not None else _rows(rows or 0)},
            },
        )
    api["custom"].create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)


def _get(api: dict[str, Any], ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = api["custom"].get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name
    )
    return obj


def _cond(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return None


def _wait_cond(
    api: dict[str, Any],
    ns: str,
    name: str,
    ctype: str,
    timeout: float = 60,
    reason: str | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = _cond(_get(api, ns, name), ctype)
        if c and c["status"] == "True" and (reason is None or c["reason"] == reason):
            return c
        return None

    try:
        found = wait_for(check, timeout, f"{name}: condition {ctype}={reason or 'True'}")
        assert found is not None
        return found
    except AssertionError as exc:
        status = _get(api, ns, name).get("status") or {}
        pods = api["core"].list_namespaced_pod(ns).items
        detail = [(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]
        raise AssertionError(
            f"{exc}\nstatus: {json.dumps(status, indent=1)}\npods: {detail}"
        ) from None


def _events(api: dict[str, Any], ns: str, name: str) -> list[str]:
    items = (
        api["core"]
        .list_namespaced_event(
            ns, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        )
        .items
    )
    return [e.reason for e in items]


def test_configmap_job_is_planned_and_trains_on_simulated_gpu_nodes(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    job = _ftj(
        "lora",
        labels={"kueue.x-k8s.io/queue-name": "team-a", "kubetune.dev/sim-run-ms": "1"},
        annotations={"kubetune.dev/sim-run-ms": "1500"},
    )
    _create(api, namespace, job)
    planned = _wait_cond(api, namespace, "lora", "Planned")
    assert planned["reason"] == "PlanReady"
    obj = _get(api, namespace, "lora")
    plan = obj["status"]["plan"]
    assert plan["method"] == "LoRA"  # 300 examples: a small-data method
    assert plan["fits"] is True
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(81559 / 1024, rel=1e-3)
    assert any("nvidia.com/gpu.memory" in r for r in plan["reasons"])
    assert any("1,000" in w or "1000" in w for w in obj["status"]["warnings"])

    train = wait_for(lambda: _job_or_none(api, namespace, "lora-train"), 30, "training Job")
    spec = train.spec
    assert (spec.completion_mode, spec.completions, spec.parallelism) == ("Indexed", 2, 2)
    assert train.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert train.metadata.owner_references[0].kind == "FineTuneJob"
    assert train.metadata.owner_references[0].controller is True
    rules = spec.pod_failure_policy.rules
    assert rules[0].action == "FailJob"
    assert rules[0].on_exit_codes.values == [78]
    # Two nodes are one gang: no per-pod retries, no ignored disruptions; the operator
    # restarts every pod together (tests/unit/test_gang.py, tests/node/test_multinode.py).
    assert len(rules) == 1
    assert spec.backoff_limit == 0
    pod = spec.template.spec
    assert pod.subdomain == "lora-train"
    assert pod.security_context.run_as_non_root is True
    (container,) = pod.containers
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    shm = next(v for v in pod.volumes if v.name == "dshm")
    assert shm.empty_dir.medium == "Memory"
    assert any(m.mount_path == "/dev/shm" for m in container.volume_mounts)
    env = {e.name for e in container.env}
    assert {"KUBETUNE_PLAN_JSON", "KUBETUNE_CONTROL_TOKEN_FILE", "KUBETUNE_DATASET_PATH"} <= env
    svc = api["core"].read_namespaced_service("lora-train", namespace)
    assert svc.spec.cluster_ip == "None"
    assert svc.spec.publish_not_ready_addresses is True
    cm = api["core"].read_namespaced_config_map("lora-config", namespace)
    assert json.loads(cm.data["plan.json"])["method"] == "LoRA"
    api["core"].read_namespaced_secret("lora-control", namespace)

    done = _wait_cond(api, namespace, "lora", "Succeeded", timeout=90)
    assert done["reason"] == "Completed"
    obj = _get(api, namespace, "lora")
    assert obj["status"]["state"] == "Succeeded"
    assert obj["status"]["completionTime"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    pods = api["core"].list_namespaced_pod(namespace, label_selector="job-name=lora-train")
    assert {p.spec.node_name.startswith("gpu-node-") for p in pods.items} == {True}
    assert {"PlanReady", "Created", "Completed"} <= set(_events(api, namespace, "lora"))


def _job_or_none(api: dict[str, Any], ns: str, name: str) -> Any:
    try:
        return api["batch"].read_namespaced_job(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_plan_only_stops_before_any_gpu_pod(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(api, namespace, _ftj("dry", planOnly=True))
    done = _wait_cond(api, namespace, "dry", "Succeeded")
    assert done["reason"] == "PlanOnly"
    obj = _get(api, namespace, "dry")
    assert obj["status"]["plan"]["method"]
    assert obj["status"]["state"] == "Succeeded"
    time.sleep(1)
    assert _job_or_none(api, namespace, "dry-train") is None


def test_suspend_then_resume(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(
        api, namespace, _ftj("pause", suspend=True, annotations={"kubetune.dev/sim-run-ms": "1000"})
    )
    _wait_cond(api, namespace, "pause", "Suspended")
    assert api["batch"].read_namespaced_job("pause-train", namespace).spec.suspend is True
    assert (
        not api["core"].list_namespaced_pod(namespace, label_selector="job-name=pause-train").items
    )
    assert _get(api, namespace, "pause")["status"]["state"] == "Suspended"
    api["custom"].patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pause", {"spec": {"suspend": False}}
    )
    _wait_cond(api, namespace, "pause", "Succeeded", timeout=90)
    resumed = _cond(_get(api, namespace, "pause"), "Suspended")
    assert resumed is not None
    assert resumed["status"] == "False"


def test_config_error_exit_code_fails_the_job_without_retry(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(
        api,
        namespace,
        _ftj(
            "bad",
            backoffLimit=5,
            labels={"kubetune.dev/sim-exit-code": "78"},
            annotations={"kubetune.dev/sim-message": "data error: train.jsonl line 3"},
        ),
    )
    failed = _wait_cond(api, namespace, "bad", "Failed", timeout=90)
    assert failed["reason"] == "ConfigError"
    assert "train.jsonl line 3" in failed["message"]
    job = api["batch"].read_namespaced_job("bad-train", namespace)
    # Both pods (one per node) failed once; the podFailurePolicy stopped any retry.
    assert job.status.failed == 2
    pods = api["core"].list_namespaced_pod(namespace, label_selector="job-name=bad-train")
    assert len(pods.items) == 2
    assert "ConfigError" in _events(api, namespace, "bad")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"prompt": "a", "completion": "b"}\n{broken\n', "line 2: not valid JSON"),
        ("", "the dataset is empty"),
        ('{"prompt": "a"}\n', "line 1: missing field 'completion'"),
    ],
)
def test_bad_data_fails_with_a_message_naming_the_line(
    operator: OperatorProcess, api: dict[str, Any], namespace: str, data: str | None, expected: str
) -> None:
    _create(api, namespace, _ftj("data"), rows=None, data=data)
    failed = _wait_cond(api, namespace, "data", "Failed")
    assert failed["reason"] == "DataError"
    assert expected in failed["message"]
    assert _job_or_none(api, namespace, "data-train") is None


def test_method_that_cannot_fit_fails_before_gpus(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    job = _ftj(
        "huge",
        method={"type": "Full"},
        resources={"numNodes": 1, "gpusPerNode": 1, "gpuMemoryGiB": 16},
    )
    _create(api, namespace, job)
    failed = _wait_cond(api, namespace, "huge", "Failed")
    assert failed["reason"] == "DoesNotFit"
    assert _job_or_none(api, namespace, "huge-train") is None


def test_local_runner_job_really_runs_and_status_follows(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    job = _ftj(
        "local",
        resources={"numNodes": 2, "gpusPerNode": 0},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
        model={"uri": "hf://Qwen/Qwen2-0.5B"},
    )
    _create(api, namespace, job, rows=120)
    _wait_cond(api, namespace, "local", "Succeeded", timeout=120)
    obj = _get(api, namespace, "local")
    assert obj["status"]["metrics"]["evalLoss"] == 1.25
    assert obj["status"]["progress"]["percentage"] == 100.0
    pods = api["core"].list_namespaced_pod(namespace, label_selector="job-name=local-train")
    seen = set()
    for pod in pods.items:
        report = json.loads(pod.status.container_statuses[0].state.terminated.message)
        assert report["seen"]["nodes"] == "2"
        assert report["seen"]["method"] == obj["status"]["plan"]["method"]
        assert report["seen"]["token"] is True
        seen.add(report["seen"]["index"])
    assert seen == {"0", "1"}


def test_early_stop_reported_by_the_trainer_becomes_a_condition(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    job = _ftj(
        "early",
        resources={"numNodes": 1, "gpusPerNode": 0},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
        model={"uri": "hf://Qwen/Qwen2-0.5B"},
        annotations={"standin": "early-stop"},
    )
    _create(api, namespace, job, rows=120)
    done = _wait_cond(api, namespace, "early", "Succeeded", timeout=120)
    assert done["reason"] == "EarlyStopped"
    stopped = _cond(_get(api, namespace, "early"), "EarlyStopped")
    assert stopped is not None
    assert stopped["reason"] == "NoImprovement"
    assert _get(api, namespace, "early")["status"]["earlyStop"]["reason"] == "NoImprovement"


def test_deleting_the_job_removes_every_child(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(api, namespace, _ftj("gone", suspend=True))
    wait_for(lambda: _job_or_none(api, namespace, "gone-train"), 30, "the training Job")
    api["custom"].delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")

    def all_gone() -> bool:
        sel = "kubetune.dev/job=gone"
        return not (
            api["batch"].list_namespaced_job(namespace, label_selector=sel).items
            or api["core"].list_namespaced_service(namespace, label_selector=sel).items
            or api["core"].list_namespaced_config_map(namespace, label_selector=sel).items
            or api["core"].list_namespaced_secret(namespace, label_selector=sel).items
        )

    wait_for(all_gone, 60, "garbage collection of the children")


def test_kubectl_apply_rejects_an_invalid_job_with_the_cel_message(
    dev_cluster: Any, crd_installed: str, namespace: str
) -> None:
    bad = _ftj("cel", method={"type": "Full", "lora": {"rank": 8}})
    result = subprocess.run(
        [
            str(dev_cluster.bins.kubectl),
            f"--kubeconfig={dev_cluster.layout.kubeconfig}",
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
        ],
        input=json.dumps(bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "method.lora can only be set when method.type is LoRA, QLoRA or Auto" in result.stderr


def test_prepare_pod_plans_from_files_on_the_local_runner(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Any
) -> None:
    from kubetune.planning import bundled_architectures

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(bundled_architectures()["pythia-160m"].read_text())
    data = tmp_path / "train.jsonl"
    data.write_text(_rows(500))
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    job = _ftj(
        "files",
        planOnly=True,
        resources={"numNodes": 1, "gpusPerNode": 0},
        model={"uri": f"file://{model_dir}"},
        dataset={"uri": f"file://{data}"},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
    )
    _create(api, namespace, job, rows=None)
    done = _wait_cond(api, namespace, "files", "Succeeded", timeout=120)
    assert done["reason"] == "PlanOnly"
    plan = _get(api, namespace, "files")["status"]["plan"]
    assert plan["exampleCount"] == 450  # 500 rows less the 10% validation split
    assert plan["totalParameters"] > 100_000_000
    assert "Preparing" in _events(api, namespace, "files")


def test_prepare_pod_reports_a_bad_file_with_its_line(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Any
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_rows(3) + "\n[1, 2]\n")
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    job = _ftj(
        "badfile",
        resources={"numNodes": 1, "gpusPerNode": 0},
        dataset={"uri": f"file://{data}"},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
    )
    _create(api, namespace, job, rows=None)
    failed = _wait_cond(api, namespace, "badfile", "Failed", timeout=120)
    assert failed["reason"] == "DataError"
    assert f"{data} line 4: each line must be a JSON object" in failed["message"]


def _children(api: dict[str, Any], ns: str, name: str) -> dict[str, str]:
    sel = f"kubetune.dev/job={name}"
    found: dict[str, str] = {}
    for kind, items in (
        ("Job", api["batch"].list_namespaced_job(ns, label_selector=sel).items),
        ("Service", api["core"].list_namespaced_service(ns, label_selector=sel).items),
        ("ConfigMap", api["core"].list_namespaced_config_map(ns, label_selector=sel).items),
        ("Secret", api["core"].list_namespaced_secret(ns, label_selector=sel).items),
    ):
        for item in items:
            found[f"{kind}/{item.metadata.name}"] = item.metadata.uid
    return found


def test_operator_restart_mid_run_duplicates_nothing_and_loses_nothing(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(api, namespace, _ftj("survivor", annotations={"kubetune.dev/sim-run-ms": "6000"}))
    _wait_cond(api, namespace, "survivor", "Running", timeout=60)
    before = _children(api, namespace, "survivor")
    assert set(before) == {
        "Job/survivor-train",
        "Service/survivor-train",
        "ConfigMap/survivor-config",
        "Secret/survivor-control",
    }
    planned_before = _cond(_get(api, namespace, "survivor"), "Planned")
    operator.stop()
    try:
        # Created while no operator runs: picked up when it starts.
        _create(api, namespace, _ftj("latecomer", planOnly=True))
        time.sleep(1)
        assert not (_get(api, namespace, "latecomer").get("status") or {}).get("conditions")
    finally:
        operator.start()
    _wait_cond(api, namespace, "latecomer", "Succeeded", reason="PlanOnly")
    _wait_cond(api, namespace, "survivor", "Succeeded", timeout=90)
    assert _children(api, namespace, "survivor") == before  # same objects, none added
    assert _cond(_get(api, namespace, "survivor"), "Planned") == planned_before


def test_operator_serves_metrics_and_liveness(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    import urllib.request

    from kubetune.operator import main as operator_main

    _create(api, namespace, _ftj("measured", planOnly=True))
    _wait_cond(api, namespace, "measured", "Succeeded")
    port = operator_main._state["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'kubetune_operator_reconciles_total{result="planned"}' in text
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in text
    assert "kubetune_operator_api_requests_total" in text
    assert 'kubetune_operator_jobs{state="Succeeded"}' in text
    url = f"http://127.0.0.1:{operator.liveness_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["reconciles"] >= 1


def test_ttl_after_finished_deletes_the_job(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    # Succeeded is visible for the TTL only: 5 s leaves a loaded machine time to see it.
    _create(api, namespace, _ftj("brief", planOnly=True, ttlSecondsAfterFinished=5))
    _wait_cond(api, namespace, "brief", "Succeeded")

    def deleted() -> bool:
        try:
            _get(api, namespace, "brief")
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(deleted, 30, "ttlSecondsAfterFinished to delete the FineTuneJob")


def test_active_deadline_fails_the_job(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(
        api,
        namespace,
        _ftj("slow", activeDeadlineSeconds=2, annotations={"kubetune.dev/sim-run-ms": "60000"}),
    )
    failed = _wait_cond(api, namespace, "slow", "Failed", timeout=60)
    assert failed["reason"] == "DeadlineExceeded"


def _kubectl(dev_cluster: Any, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(dev_cluster.bins.kubectl), f"--kubeconfig={dev_cluster.layout.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def _apply_example(dev_cluster: Any, ns: str, name: str) -> None:
    path = EXAMPLES / name

    def applied() -> bool:  # kubectl's discovery may lag right after the CRD is installed
        try:
            _kubectl(dev_cluster, "apply", "-n", ns, "-f", str(path))
        except subprocess.CalledProcessError:
            return False
        return True

    wait_for(applied, 30, f"kubectl apply -f {path}")


def test_example_configmap_dataset_trains_and_kubectl_shows_the_columns(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _apply_example(dev_cluster, namespace, "configmap-dataset.yaml")
    name = _get_only(api, namespace)
    _wait_cond(api, namespace, name, "Succeeded", timeout=90)
    train = api["batch"].read_namespaced_job(f"{name}-train", namespace)
    assert train.spec.completions == _get(api, namespace, name)["spec"]["resources"]["numNodes"]
    header, row = _kubectl(dev_cluster, "get", "ftj", "-n", namespace).splitlines()[:2]
    assert header.split()[:5] == ["NAME", "STATUS", "METHOD", "PROGRESS", "EVAL-LOSS"]
    assert row.split()[:3] == [name, "Succeeded", "LoRA"]
    describe = _kubectl(dev_cluster, "describe", "ftj", "-n", namespace, name)
    for reason in ("PlanReady", "Created", "Completed"):
        assert reason in describe


def _get_only(api: dict[str, Any], ns: str) -> str:
    items = api["custom"].list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    assert len(items) == 1
    return str(items[0]["metadata"]["name"])


@pytest.mark.parametrize(
    ("example", "claims"),
    [
        ("minimal.yaml", {"training-data"}),
        ("plan-only.yaml", {"training-data"}),
        ("lora-multinode.yaml", {"training-data"}),
    ],
)
def test_examples_with_volume_data_start_a_prepare_pod_with_their_volumes(
    dev_cluster: Any,
    operator: OperatorProcess,
    api: dict[str, Any],
    namespace: str,
    example: str,
    claims: set[str],
) -> None:
    _apply_example(dev_cluster, namespace, example)
    name = _get_only(api, namespace)
    prep = wait_for(lambda: _job_or_none(api, namespace, f"{name}-prepare"), 30, "prepare Job")
    pod = prep.spec.template.spec
    assert {
        v.persistent_volume_claim.claim_name for v in pod.volumes if v.persistent_volume_claim
    } == claims
    (container,) = pod.containers
    assert container.command == ["python", "-m", "kubetune.prepare"]
    env = {e.name: e.value for e in container.env}
    assert env["KUBETUNE_DATASET_PATH"].startswith("/mnt/data/training-data/")
    spec = _get(api, namespace, name)["spec"]
    assert json.loads(env["KUBETUNE_SPEC_JSON"])["model"]["uri"] == spec["model"]["uri"]
    assert "nvidia.com/gpu" not in (container.resources.limits or {})  # planning needs no GPU
    assert prep.metadata.owner_references[0].name == name
    if spec.get("nodeSelector"):
        assert pod.node_selector == spec["nodeSelector"]


def test_the_real_trainer_runs_a_job_end_to_end_on_the_local_runner(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Any
) -> None:
    """prepare pod (plans from the files) -> training pod (torchrun + kubetune.trainer on a
    tiny model) -> status with the trainer's metrics -> outputs on disk."""
    out = tmp_path / "out"
    job = _real_trainer_job(dev_cluster, tmp_path, "real", out, hyperparameters={"epochs": 2})
    _create(api, namespace, job, rows=None)
    planned = _wait_cond(api, namespace, "real", "Planned", timeout=120)
    assert planned["message"].startswith("LoRA")  # method Auto: LoRA by data size
    _wait_cond(api, namespace, "real", "Succeeded", timeout=420)
    status = _get(api, namespace, "real")["status"]
    # The tiny model finds these rows ~3x as surprising as English: the trainer took the
    # plan's alternative (Full) and Auto turned replay on; the operator put both decisions
    # into status.plan (method and reasons) with an Event each.
    assert status["plan"]["method"] == "Full"
    auto = [r for r in status["plan"]["reasons"] if r.startswith("Auto at training start")]
    assert any("method Full instead of LoRA" in r for r in auto), auto
    assert any(r.startswith("Auto at training start: replay on") for r in auto), auto
    assert "AutoDecision" in _events(api, namespace, "real")
    switched = _cond(_get(api, namespace, "real"), "Planned")
    assert switched is not None
    assert switched["message"].startswith("Full with ZeRO-0")
    assert switched["message"].endswith("(Auto switched from LoRA at training start)")
    # Learnable data: the operator's policy (on by default) lets it run to the end.
    assert _cond(_get(api, namespace, "real"), "EarlyStopped") is None
    assert _cond(_get(api, namespace, "real"), "Succeeded")["reason"] == "Completed"  # type: ignore[index]
    assert status["metrics"]["evalLoss"] > 0
    assert status["progress"]["percentage"] == 100.0
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "report.md").exists()
    assert json.loads((out / "plan.json").read_text())["method"] == status["plan"]["method"]


def test_a_missing_configmap_is_waited_for_then_used(
    operator: OperatorProcess, api: dict[str, Any], namespace: str
) -> None:
    _create(api, namespace, _ftj("later", planOnly=True), rows=None)

    def waiting() -> dict[str, Any] | None:
        c = _cond(_get(api, namespace, "later"), "Planned")
        return c if c and c["reason"] == "InputNotFound" else None

    cond = wait_for(waiting, 30, "Planned=False/InputNotFound")
    assert cond is not None
    assert cond["status"] == "False"
    assert "has no key 'train.jsonl'" in cond["message"]
    assert _cond(_get(api, namespace, "later"), "Failed") is None
    assert "InputNotFound" in _events(api, namespace, "later")
    api["core"].create_namespaced_config_map(
        namespace, {"metadata": {"name": "later-data"}, "data": {"train.jsonl": _rows(50)}}
    )
    done = _wait_cond(api, namespace, "later", "Succeeded", timeout=60)
    assert done["reason"] == "PlanOnly"


def test_stop_requested_reaches_the_trainer_which_stops_early(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Any
) -> None:
    """spec.stopRequested -> the operator POSTs /stop with the job's token to rank 0 -> the
    real trainer stops after the step, keeps the best checkpoint and exits 0."""
    out = tmp_path / "out"
    job = _real_trainer_job(
        dev_cluster,
        tmp_path,
        "stopme",
        out,
        method={"type": "LoRA"},
        hyperparameters={"epochs": 100},
        earlyStopping={"enabled": False},
    )
    _create(api, namespace, job, rows=None)
    history = out / "metrics.jsonl"
    wait_for(
        lambda: history.exists() and len(history.read_text().splitlines()) >= 5,
        240,
        "the trainer to log a few steps",
    )

    # While it runs, the operator copies rank 0's live figures into the status.
    def live_step() -> int:
        progress = (_get(api, namespace, "stopme").get("status") or {}).get("progress") or {}
        return int(progress.get("step", 0))

    wait_for(live_step, 60, "live progress copied from rank 0 into status")
    api["custom"].patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "stopme", {"spec": {"stopRequested": True}}
    )
    done = _wait_cond(api, namespace, "stopme", "Succeeded", timeout=240)
    assert done["reason"] == "EarlyStopped"
    stopped = _cond(_get(api, namespace, "stopme"), "EarlyStopped")
    assert stopped is not None
    assert stopped["reason"] == "StopRequested"
    progress = _get(api, namespace, "stopme")["status"]["progress"]
    assert progress["step"] < progress["totalSteps"]  # it stopped long before the end
    assert (out / "final" / "adapter_config.json").exists()


def test_the_operator_stops_a_run_that_only_memorises_and_keeps_the_best(
    dev_cluster: Any, operator: OperatorProcess, api: dict[str, Any], namespace: str, tmp_path: Any
) -> None:
    """Data the model can only learn by heart: the operator reads rank 0's evaluations,
    its policy says stop, it POSTs /stop with the job's token, and the real trainer stops,
    keeps the best checkpoint and exits 0: Succeeded with EarlyStopped, an Event, the
    operator's counter, and the diagnostics in status.metrics."""
    import urllib.request

    from kubetune.operator import main as operator_main
    from tests.tinymodel import random_rows

    data = random_rows(48, seed=4)
    out = tmp_path / "out"
    job = _real_trainer_job(
        dev_cluster,
        tmp_path,
        "memorises",
        out,
        data_rows=data,
        method={"type": "Full"},
        hyperparameters={
            "epochs": 60,
            "learningRate": 0.003,
            "evalSteps": 5,
            "microBatchSize": 8,
            "gradientAccumulationSteps": 1,
        },
        earlyStopping={"patience": 2},
    )
    _create(api, namespace, job, rows=None)
    done = _wait_cond(api, namespace, "memorises", "Succeeded", timeout=420)
    assert done["reason"] == "EarlyStopped"
    obj = _get(api, namespace, "memorises")
    stopped = _cond(obj, "EarlyStopped")
    assert stopped is not None
    assert stopped["reason"] in {
        "Overfitting",
        "OverMemorization",
        "NoImprovement",
        "MemorizationExceeded",
        "ForgettingExceeded",
    }
    assert "eval" in stopped["message"]
    status = obj["status"]
    assert status["progress"]["step"] < status["progress"]["totalSteps"]
    assert status["earlyStop"]["reason"] == stopped["reason"]
    # The decision was the operator's: the trainer only stops itself on divergence.
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["earlyStop"]["reason"] == stopped["reason"]
    assert stopped["reason"] in _events(api, namespace, "memorises")
    best = report["summary"]["metrics"]["bestStep"]
    assert report["summary"]["bestCheckpoint"].endswith(f"checkpoint-{best}")
    assert (out / "final" / "model.safetensors").exists()
    # The diagnostics reached the status.
    for field in ("memorizationRate", "heldoutMemorizationRate", "generalPerplexityRatio"):
        assert field in status["metrics"], status["metrics"]
    port = operator_main._state["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert f'kubetune_operator_early_stops_total{{reason="{stopped["reason"]}"}}' in text


def _real_trainer_job(
    dev_cluster: Any,
    tmp_path: Any,
    name: str,
    out: Any,
    data_rows: list[dict[str, str]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A job on the local pod runner that the stand-in hands to the real trainer: a tiny
    model and 64 rows (or `data_rows`) in files, CPU, output in `out`."""
    from tests.tinymodel import build_tiny_model, rows

    model = build_tiny_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (data_rows or rows(64))))
    placement = local_runner_pod_placement(dev_cluster.state.local_runner_node)
    return _ftj(
        name,
        resources={"numNodes": 1, "gpusPerNode": 0},
        model={"uri": f"file://{model}"},
        dataset={"uri": f"file://{data}"},
        output={"uri": f"file://{out}"},
        nodeSelector=placement["nodeSelector"],
        tolerations=placement["tolerations"],
        annotations={"standin": "real-trainer"},
        **spec,
    )
