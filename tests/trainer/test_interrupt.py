"""SIGTERM, as the kubelet sends it to a training pod: the launcher (a pod's PID 1) passes
it to torchrun, every rank saves the same step's checkpoint and stops, the launcher exits
143 with an `Interrupted` termination message, and the next start resumes there with no
step before it trained twice. Two processes, DeepSpeed ZeRO-2 and ZeRO-3 (sharded
checkpoints), on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from kubetune.contract import EXIT_INTERRUPTED, REASON_INTERRUPTED, Env
from tests.trainer.conftest import MakeRun, Run

pytestmark = pytest.mark.trainer

HP = {
    "epochs": 3,
    "learningRate": 0.003,
    "evalSteps": 4,
    "warmupSteps": 0,
    "microBatchSize": 4,
    "gradientAccumulationSteps": 1,
}


def _launcher(run: Run) -> list[str]:
    """What a training pod runs (the operator's torchrun arguments, on one host)."""
    trainer = run.command[run.command.index("-m", 3) :]  # -m kubetune.trainer --config-dir=..
    return [
        sys.executable,
        "-m",
        "kubetune.trainer.launch",
        "--standalone",
        "--nproc-per-node=2",
        *trainer,
    ]


def _checkpoints(run: Run) -> list[int]:
    root = run.output / "checkpoints"
    return sorted(
        int(d.name.split("-")[1])
        for d in root.glob("checkpoint-*")
        if (d / "trainer_state.json").exists()
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [2, 3])
def test_sigterm_saves_a_checkpoint_on_every_rank_and_the_run_resumes_there(
    make_run: MakeRun, zero: int
) -> None:
    run = make_run(method="Full", zero=zero, nproc=2, hp=HP)
    config_dir = run.command[-1].split("=", 1)[1]
    env = {**run.env, Env.CONFIG_DIR: config_dir, Env.SHUTDOWN_TIMEOUT: "60"}
    command = _launcher(run)
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not _checkpoints(run):
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.5)
    assert _checkpoints(run), "no periodic checkpoint within 400 s"
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped_in = time.monotonic() - sent
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    message = json.loads((run.output / "termination.json").read_text())
    assert message["reason"] == REASON_INTERRUPTED, message
    step = message["step"]
    assert step == _checkpoints(run)[-1], (step, _checkpoints(run))
    assert f"checkpoint-{step}" in message["message"]
    # Both ranks' DeepSpeed optimizer shards (ZeRO-3: the weights' too) are in that
    # checkpoint; no final output yet.
    shards = list((run.output / "checkpoints" / f"checkpoint-{step}").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not (run.output / "final").exists()
    assert "interrupted: stopped by SIGTERM" in err
    assert stopped_in < 90, stopped_in

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from checkpoint-{step}" in result.stdout
    steps = [r["step"] for r in run.history() if r.get("train_loss") is not None]
    for s in range(1, step + 1):
        assert steps.count(s) == 1, (s, steps)
    assert all(steps.count(s) == 1 for s in steps), steps
    assert run.termination()["progress"]["percentage"] == 100.0
