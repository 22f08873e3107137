"""`kubetune dev-cluster up|status|down` as a user runs it: a second, independent cluster
that outlives the `up` command and leaves no process behind after `down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.devcluster.cluster import ClusterState

pytestmark = pytest.mark.cluster

KUBETUNE = [sys.executable, "-m", "kubetune.cli"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*KUBETUNE, *args], capture_output=True, text=True, timeout=240)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(
            done.returncode,
            done.args,
            done.stdout,
            done.stderr + f"\n(stderr above; stdout: {done.stdout})",
        )
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_status_down_leaves_no_orphans(tmp_path: Path) -> None:
    root = tmp_path / "dc"
    up = _cli("dev-cluster", "up", "--dir", str(root), "--gpu-nodes", "2", "--gpus-per-node", "4")
    assert f"export KUBECONFIG={root.resolve() / 'kubeconfig'}" in up.stdout
    try:
        state = ClusterState.load(root / "state.json")
        names = [p.name for p in state.processes]
        assert names == [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "pod-runner",
        ]
        assert all(_alive(p.pid) for p in state.processes)  # they outlive `up`
        status = json.loads(_cli("dev-cluster", "status", "--dir", str(root), "-o", "json").stdout)
        assert status["running"] is True
        assert status["apiserverReady"] is True
        assert status["gpuNodes"] == ["gpu-node-0", "gpu-node-1"]
        with pytest.raises(subprocess.CalledProcessError) as again:
            _cli("dev-cluster", "up", "--dir", str(root))
        assert "already running" in again.value.stderr
    finally:
        down = _cli("dev-cluster", "down", "--dir", str(root))
    assert "stopped" in down.stdout
    assert not any(_alive(p.pid) for p in state.processes)
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    after = _cli("dev-cluster", "status", "--dir", str(root), check=False)
    assert after.returncode == 1


def test_up_without_built_tools_says_how_to_build_them(tmp_path: Path) -> None:
    env = {**os.environ, "KUBETUNE_TOOLS_DIR": str(tmp_path / "empty")}
    result = subprocess.run(
        [*KUBETUNE, "dev-cluster", "up", "--dir", str(tmp_path / "dc")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert "make tools" in result.stderr


def test_up_with_kueue_runs_it_with_its_webhooks_and_down_stops_it(tmp_path: Path) -> None:
    from kubernetes import client, config

    root = tmp_path / "dck"
    up = _cli(
        "dev-cluster", "up", "--dir", str(root), "--gpu-nodes", "1", "--no-local-runner", "--kueue"
    )
    assert "starting Kueue (webhooks on 127.0.0.1:" in up.stdout
    try:
        state = ClusterState.load(root / "state.json")
        kueue = next(p for p in state.processes if p.name == "kueue")
        assert _alive(kueue.pid)
        api = config.new_client_from_config(config_file=str(root / "kubeconfig"))
        hooks = client.AdmissionregistrationV1Api(api).list_mutating_webhook_configuration()
        (ours,) = [h for h in hooks.items if h.metadata.name.startswith("kubetune-dev-kueue-")]
        urls = {w.client_config.url for w in ours.webhooks}
        port = state.ports["kueue_webhook"]
        assert f"https://127.0.0.1:{port}/mutate-batch-v1-job" in urls
    finally:
        _cli("dev-cluster", "down", "--dir", str(root), check=False)
    assert not _alive(kueue.pid)
