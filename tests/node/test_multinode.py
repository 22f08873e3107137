"""Multi-node training for real: the operator's own torchrun command in two pods of the
training Job, rendezvousing through the headless Service's DNS names on the real node,
DeepSpeed ZeRO-2 full fine-tuning over gloo with the built trainer image. One run goes
through what a gang meets: a pod deleted mid-run (every rank saves on SIGTERM, the gang
restarts together and resumes from that checkpoint), the FineTuneJob suspended and resumed
(the same), and the operator's stop request ending both ranks at one step (Succeeded,
EarlyStopped, the best checkpoint kept, the output loads back). A second run partitions
ZeRO-3 full fine-tuning over 2 pods x 2 processes and has a worker of pod 1 SIGKILLed
inside its container: a counted crash, a gang restart, and the run finishes from the
checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.node.conftest import finished_ftj, jsonl_config_map, operator_pod, output_claim
from tests.waiting import wait_for

pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
INDEX = "batch.kubernetes.io/job-completion-index"
ROWS = [
    {"prompt": f"Q: what is {a} times {b}?", "completion": f" A: {a * b}."}
    for a in range(8)
    for b in range(8)
]


def _ftj(custom: Any, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return obj


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _pods(core: Any, ns: str, job: str) -> list[Any]:
    return list(core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items)


def _running_gang(core: Any, ns: str, job: str, nodes: int, exclude: set[str]) -> Any:
    """The job's `nodes` pods, all Running and none of `exclude` (an earlier attempt's)."""
    pods = [
        p
        for p in _pods(core, ns, job)
        if p.metadata.uid not in exclude
        and p.status.phase == "Running"
        and p.metadata.deletion_timestamp is None
    ]
    return pods if len(pods) == nodes else None


def _checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    steps = []
    for d in root.glob("checkpoint-*") if root.exists() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "trainer_state.json").exists():
            steps.append(int(m[1]))
    return sorted(steps)


def _trained_past(out: Path, step: int) -> bool:
    """Whether rank 0 logged a training step after `step` (metrics.jsonl)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    rows = [json.loads(line) for line in lines if line.strip()]
    return any(r.get("train_loss") is not None and r["step"] > step for r in rows)


def _resumed_from(core: Any, ns: str, pod: str) -> Any:
    """The checkpoint rank 0's console says this attempt resumes from."""
    try:
        log = core.read_namespaced_pod_log(pod, ns)
    except Exception:  # the container may not have started yet
        return None
    m = re.search(r"resuming from checkpoint-(\d+)", log)
    return int(m[1]) if m else None


def _rank0(pods: list[Any]) -> Any:
    return next(p for p in pods if (p.metadata.annotations or {}).get(INDEX) == "0")


def test_two_pods_train_with_zero2_restart_as_a_gang_resume_and_stop_together(
    node_cluster: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    ns = installed["jobs"]
    wait_for(lambda: operator_pod(core, installed["system"]), 240, "the operator pod")
    volume = output_claim(core, ns, "gang-out", tmp_path_factory.mktemp("gang-pv"))
    jsonl_config_map(core, ns, "products", ROWS)
    name, train = "gang", "gang-train"
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://kubetune/tiny-llama-en"},
            "dataset": {"uri": "configmap://products/train.jsonl", "validationSplit": 0.2},
            "output": {"uri": "pvc://gang-out/gang"},
            "method": {"type": "Full"},
            "deepspeed": {"zeroStage": 2},
            "resources": {"numNodes": 2, "gpusPerNode": 0},
            # Long enough for the interruptions below; the stop request ends it.
            "hyperparameters": {"epochs": 60, "evalSteps": 4, "microBatchSize": 4},
            "earlyStopping": {"enabled": False},
            "diagnostics": {"enabled": False},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    out = volume / "gang"

    # Two pods rendezvous and train; the status shows both and the progress.
    first = wait_for(
        lambda: _running_gang(core, ns, train, 2, set()), 600, "both training pods Running"
    )
    wait_for(lambda: _checkpoints(out), 600, "a first checkpoint", interval=2)
    obj = _ftj(custom, ns, name)
    running = _conditions(obj)["Running"]
    assert running["status"] == "True", running
    assert "of 2 pod(s) active" in running["message"], running
    wait_for(
        lambda: ((_ftj(custom, ns, name).get("status") or {}).get("progress") or {}).get("step"),
        120,
        "status.progress from rank 0",
    )
    plan = obj["status"]["plan"]
    assert (plan["method"], plan["zeroStage"], plan["numNodes"]) == ("Full", 2, 2)
    [pod_spec] = {json.dumps(p.spec.termination_grace_period_seconds) for p in first}
    assert int(pod_spec) >= 120

    # Pod 1 deleted: both ranks save on its SIGTERM, the gang restarts and resumes there.
    before = _checkpoints(out)[-1]
    victim = next(p for p in first if (p.metadata.annotations or {}).get(INDEX) == "1")
    core.delete_namespaced_pod(victim.metadata.name, ns)
    restarts = wait_for(
        lambda: ((_ftj(custom, ns, name).get("status") or {}).get("restarts") or {}).get(
            "interruptions"
        ),
        600,
        "the operator's gang restart",
        interval=2,
    )
    assert restarts == 1
    obj = _ftj(custom, ns, name)
    assert "count" not in obj["status"]["restarts"], obj["status"]["restarts"]
    old = {p.metadata.uid for p in first}
    second = wait_for(
        lambda: _running_gang(core, ns, train, 2, old), 600, "the restarted gang Running"
    )
    resumed = wait_for(
        lambda: _resumed_from(core, ns, _rank0(second).metadata.name),
        600,
        "rank 0 to resume",
        interval=2,
    )
    assert resumed >= before, (resumed, before)
    saved_on_sigterm = resumed
    # The restarted gang trains again (a step past the checkpoint) before the next SIGTERM.
    wait_for(lambda: _trained_past(out, resumed), 600, "a step after resuming", interval=2)

    # Suspended: the pods get SIGTERM, save, and stop; resumed: the run goes on from there.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": True}}
    )
    wait_for(
        lambda: not [p for p in _pods(core, ns, train) if p.status.phase in ("Pending", "Running")],
        600,
        "the suspended job's pods to stop",
        interval=2,
    )
    assert _ftj(custom, ns, name)["status"]["state"] in ("Suspended", "Running"), _ftj(
        custom, ns, name
    )["status"]
    suspended_at = _checkpoints(out)[-1]
    assert suspended_at > saved_on_sigterm, (suspended_at, saved_on_sigterm)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": False}}
    )
    old |= {p.metadata.uid for p in second}
    third = wait_for(lambda: _running_gang(core, ns, train, 2, old), 600, "the resumed gang")
    resumed = wait_for(
        lambda: _resumed_from(core, ns, _rank0(third).metadata.name),
        600,
        "rank 0 to resume after the suspension",
        interval=2,
    )
    assert resumed == suspended_at, (resumed, suspended_at)

    # The stop request ends both ranks at one step: Succeeded, EarlyStopped, output kept.
    wait_for(lambda: _trained_past(out, resumed), 600, "a step after resuming", interval=2)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"stopRequested": True}}
    )

    obj = wait_for(
        lambda: finished_ftj(custom, ns, name), 900, "the stopped job to finish", interval=2
    )
    conds = _conditions(obj)
    assert conds["Succeeded"]["status"] == "True", json.dumps(obj["status"])[:3000]
    assert conds["Succeeded"]["reason"] == "EarlyStopped", conds["Succeeded"]
    assert obj["status"]["earlyStop"]["reason"] == "StopRequested", obj["status"]
    last = [p for p in _pods(core, ns, train) if p.metadata.uid not in old]
    assert sorted(p.status.phase for p in last) == ["Succeeded", "Succeeded"], [
        (p.metadata.name, p.status.phase) for p in last
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["resumedFrom"].endswith(f"checkpoint-{suspended_at}")
    # The best checkpoint (lowest eval loss) is kept through the rotation and the restarts,
    # and the final model is its weights (loaded back at the end on every rank).
    best = report["summary"]["bestCheckpoint"]
    assert best, report["summary"]
    kept = out / "checkpoints" / Path(best).name
    assert (kept / "trainer_state.json").is_file(), (best, _checkpoints(out))
    from safetensors.torch import load_file

    final_weights = load_file(str(out / "final" / "model.safetensors"))
    best_weights = load_file(str(kept / "model.safetensors"))
    shared = sorted(set(final_weights) & set(best_weights))
    assert shared, (list(final_weights)[:5], list(best_weights)[:5])
    assert all(final_weights[k].equal(best_weights[k]) for k in shared)
    # metrics.jsonl has every attempt's rows: the loss fell over the whole run.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    assert losses[-1] < losses[0], (losses[0], losses[-1])
    assert (out / "final" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert sum(p.numel() for p in model.parameters()) == plan["totalParameters"]


def _kill_rank(hostname: str) -> int:
    """SIGKILL a trainer worker of the pod with `hostname` (an Indexed Job's pod is
    `<job>-<index>`; its containers' HOSTNAME) from the host, where the pods are processes:
    a rank that dies by itself, as by the kernel's OOM killer or a segfault. Returns the
    killed pid."""
    import os
    import signal

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        worker = b"kubetune.trainer" in argv and not {
            b"kubetune.trainer.launch",
            b"torch.distributed.run",
        } & set(argv)
        if worker and f"HOSTNAME={hostname}".encode() in environ:
            os.kill(int(entry), signal.SIGKILL)
            return int(entry)
    raise AssertionError(f"no trainer worker of {hostname} found in /proc")


def test_zero3_full_on_2x2_ranks_restarts_the_gang_when_a_rank_is_killed(
    node_cluster: Any,
    node_api: Any,
    installed: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ZeRO-3 full fine-tuning partitioned over 2 pods x 2 processes (4 ranks, torchrun's
    --nproc-per-node 2 in each pod); a worker of pod 1 SIGKILLed inside its container (no
    SIGTERM, no checkpoint of its own): torchrun fails that pod, the Job controller stops
    the other, and the operator restarts the gang from the last checkpoint, counting one
    crash against spec.backoffLimit; the run then finishes."""
    from kubernetes import client

    core = client.CoreV1Api(node_api)
    custom = client.CustomObjectsApi(node_api)
    ns = installed["jobs"]
    wait_for(lambda: operator_pod(core, installed["system"]), 240, "the operator pod")
    volume = output_claim(core, ns, "gang3-out", tmp_path_factory.mktemp("gang3-pv"))
    jsonl_config_map(core, ns, "products3", ROWS)
    name, train = "gang3", "gang3-train"
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://kubetune/tiny-llama-en"},
            "dataset": {"uri": "configmap://products3/train.jsonl", "validationSplit": 0.2},
            "output": {"uri": "pvc://gang3-out/gang3"},
            "method": {"type": "Full"},
            "deepspeed": {"zeroStage": 3},
            "resources": {
                "numNodes": 2,
                "gpusPerNode": 0,
                "processesPerNode": 2,
                # Two pods of 2 processes ask for 1 CPU each by default: more than this
                # 2-core node has left beside the operator; a user sizes it to the nodes.
                "resourcesPerNode": {"requests": {"cpu": "250m"}},
            },
            "hyperparameters": {"epochs": 8, "evalSteps": 4, "microBatchSize": 4},
            "earlyStopping": {"enabled": False},
            "diagnostics": {"enabled": False},
            "backoffLimit": 2,
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    out = volume / "gang3"
    first = wait_for(
        lambda: _running_gang(core, ns, train, 2, set()), 600, "both training pods Running"
    )
    plan = _ftj(custom, ns, name)["status"]["plan"]
    assert (plan["method"], plan["zeroStage"], plan["numNodes"]) == ("Full", 3, 2)
    assert plan["gpusPerNode"] == 2  # the plan's processes per node (CPU ranks)
    [command] = {" ".join(p.spec.containers[0].command) for p in first}
    assert "--nproc-per-node=2" in command, command
    wait_for(lambda: _checkpoints(out), 600, "a first checkpoint", interval=1)
    before = _checkpoints(out)[-1]
    victim = next(p for p in first if (p.metadata.annotations or {}).get(INDEX) == "1")
    _kill_rank(victim.spec.hostname or victim.metadata.name)

    restarts = wait_for(
        lambda: ((_ftj(custom, ns, name).get("status") or {}).get("restarts") or {}).get("count"),
        600,
        "the operator's gang restart after the crash",
        interval=2,
    )
    assert restarts == 1
    status = _ftj(custom, ns, name)["status"]
    assert status["restarts"]["lastReason"] == "PodFailed", status["restarts"]
    # It names a pod of the gang: the killed one, or its peer whose collective failed in
    # the same second (the API's finish times have one-second resolution).
    assert any(p.metadata.name in status["restarts"]["lastMessage"] for p in first), status
    old = {p.metadata.uid for p in first}
    second = wait_for(
        lambda: _running_gang(core, ns, train, 2, old), 600, "the restarted gang Running"
    )
    resumed = wait_for(
        lambda: _resumed_from(core, ns, _rank0(second).metadata.name),
        600,
        "rank 0 to resume",
        interval=2,
    )
    assert resumed >= before, (resumed, before)

    obj = wait_for(lambda: finished_ftj(custom, ns, name), 900, "the job to finish", interval=2)
    conds = _conditions(obj)
    assert conds["Succeeded"]["status"] == "True", json.dumps(obj["status"])[:3000]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["resumedFrom"].endswith(f"checkpoint-{resumed}")
    assert report["summary"]["progress"]["step"] == report["summary"]["progress"]["totalSteps"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert sum(p.numel() for p in model.parameters()) == plan["totalParameters"]
