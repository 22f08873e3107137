"""The local pod runner really runs a pod's command as a local process under the real API
server, and reports its exit code and termination message back."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.components import local_runner_pod_placement
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def _indexed_job(
    name: str, node: str, script: str, completions: int = 1, env: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "restartPolicy": "Never",
                    **local_runner_pod_placement(node),
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubetune/trainer:dev",
                            "command": ["python", "-c", textwrap.dedent(script)],
                            "env": env or [],
                        }
                    ],
                },
            },
        },
    }


def _finished(batch: Any, ns: str, name: str) -> str | None:
    for cond in batch.read_namespaced_job(name, ns).status.conditions or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return str(cond.type)
    return None


def test_job_runs_python_and_its_termination_message_is_read_back(
    dev_cluster: Any, api_client: Any, namespace: str
) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    script = """
        import json, os, sys
        msg = {"index": os.environ["JOB_COMPLETION_INDEX"], "pod": os.environ["POD_NAME"],
               "ns": os.environ["POD_NAMESPACE"], "ip": os.environ["POD_IP"],
               "greeting": os.environ["GREETING"], "python": sys.executable}
        with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as f:
            json.dump(msg, f)
    """
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "WHO", "value": "kubetune"},
        {"name": "GREETING", "value": "hello $(WHO)"},
    ]
    node = dev_cluster.state.local_runner_node
    batch.create_namespaced_job(namespace, _indexed_job("py", node, script, completions=2, env=env))
    assert wait_for(lambda: _finished(batch, namespace, "py"), 90, "job py") == "Complete"
    pods = core.list_namespaced_pod(namespace, label_selector="app=py").items
    assert len(pods) == 2
    seen = set()
    for pod in pods:
        assert pod.spec.node_name == node
        assert pod.status.phase == "Succeeded"
        term = pod.status.container_statuses[0].state.terminated
        assert term.exit_code == 0
        msg = json.loads(term.message)
        assert msg["pod"] == pod.metadata.name
        assert msg["ns"] == namespace
        assert msg["ip"] == "127.0.0.1"
        assert msg["greeting"] == "hello kubetune"
        assert msg["index"] == pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]
        assert Path(msg["python"]).parent == Path(sys.executable).parent  # the project's venv
        seen.add(msg["index"])
    assert seen == {"0", "1"}


def test_a_failing_process_fails_the_pod_with_its_exit_code_and_log_tail(
    dev_cluster: Any, api_client: Any, namespace: str
) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    job = _indexed_job(
        "crash",
        dev_cluster.state.local_runner_node,
        "import sys; print('bad data on line 7'); sys.exit(42)",
    )
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = (
        "FallbackToLogsOnError"
    )
    batch.create_namespaced_job(namespace, job)
    assert wait_for(lambda: _finished(batch, namespace, "crash"), 90, "job crash") == "Failed"
    (pod,) = core.list_namespaced_pod(namespace, label_selector="app=crash").items
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 42
    assert "bad data on line 7" in term.message


def test_deleting_a_pod_kills_its_process(
    dev_cluster: Any, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    pidfile = dev_cluster.layout.root / f"{namespace}-sleeper.pid"
    script = f"""
        import os, time
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "sleeper"},
            "spec": {
                **local_runner_pod_placement(dev_cluster.state.local_runner_node),
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "command": ["python", "-c", textwrap.dedent(script)],
                    }
                ],
            },
        },
    )
    wait_for(
        lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running",
        60,
        "the sleeper pod to run",
    )
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, "the pid file"))
    os.kill(pid, 0)  # the process exists
    core.delete_namespaced_pod("sleeper", namespace)

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(pod_gone, 30, "the pod to be removed")

    def process_gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(process_gone, 10, "the process to be killed")
