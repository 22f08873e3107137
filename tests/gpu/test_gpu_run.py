"""The GPU tier: a short real fine-tune on CUDA through `kubetune run`, the trainer the
operator runs (bf16, the plan's own micro-batch), on a ~85M-parameter Llama with random
weights and the test's own tokenizer (nothing from a hub).

Each run checks that the training loss falls, that the probes (memorisation, general-text
perplexity) run on the GPU and land in the history, that rank 0's /metrics reports GPU
memory while it trains, and that the measured peak (the allocator's reservation plus what
the device holds outside it) stays within the plan's per-GPU estimate. Skipped without
CUDA: run it on a GPU machine with `pytest -m gpu` (bench/device.sh does)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tinymodel import rows


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda(), reason="needs CUDA (run with -m gpu on a GPU machine)"),
]

KUBETUNE = [sys.executable, "-m", "kubetune"]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with a ~85M-parameter random Llama (12 layers, 768 wide):
    large enough that activations and optimizer state, not the CUDA context, dominate."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("gpu-model"))
    tiny = json.loads((out / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=tiny["vocab_size"],
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(tmp_path: Path, model: Path, method: str) -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows(400)) + "\n")
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(json.dumps(r) for r in rows(60, start=400)) + "\n")
    job: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"gpu-{method.lower()}"},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {
                "uri": f"file://{train}",
                "validationUri": f"file://{validation}",
                "format": "PromptCompletion",
            },
            "method": {"type": method},
            "hyperparameters": {
                "learningRate": 2e-3 if method == "LoRA" else 3e-4,
                "epochs": 2,
                "crossValidation": {"mode": "Off"},
            },
            "resources": {"numNodes": 1, "gpusPerNode": 1},
            "earlyStopping": {"enabled": False},
            "remedies": {
                k: {"mode": "Off"}
                for k in ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
            },
            "output": {"uri": f"file://{tmp_path / 'out'}"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kubetune_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _train(tmp_path: Path, model: Path, method: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the job; returns the report and the largest GPU-memory gauges /metrics showed."""
    port = _free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    console = tmp_path / "console.log"  # a file: a pipe nobody reads would fill and block
    with console.open("w") as sink:
        proc = subprocess.Popen(
            [*KUBETUNE, "run", str(_job(tmp_path, model, method)), "--metrics-port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            for name, value in _metrics(port).items():
                if name.startswith("kubetune_gpu_memory"):
                    seen[name] = max(seen.get(name, 0.0), value)
        except OSError:
            pass  # not serving yet, or already closed
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == 0, console.read_text()[-4000:]
    report: dict[str, Any] = json.loads((tmp_path / "out" / "report.json").read_text())
    return report, seen


@pytest.mark.parametrize("method", ["Full", "LoRA"])
def test_a_short_bf16_fine_tune_on_the_gpu_learns_probes_and_fits_its_plan(
    tmp_path: Path, gpu_model: Path, method: str
) -> None:
    report, gauges = _train(tmp_path, gpu_model, method)
    plan, summary, history = report["plan"], report["summary"], report["history"]
    assert plan["method"] == method, plan
    train = [r["train_loss"] for r in history if r.get("train_loss") is not None]
    assert len(train) >= 6, history
    assert sum(train[-3:]) < 0.8 * sum(train[:3]), train
    evals = [r for r in history if r.get("eval_loss") is not None]
    assert evals, history
    probed = [r for r in evals if r.get("memorization_rate_train") is not None]
    assert probed, evals[-1]
    assert probed[-1].get("general_perplexity_ratio") is not None, evals[-1]
    assert gauges.get("kubetune_gpu_memory_peak_bytes", 0) > 0, gauges
    gpu = summary["gpuMemory"]
    assert gpu["plannedPerGpuGiB"] == pytest.approx(plan["memory"]["perGpuGiB"], abs=0.01)
    # The plan's estimate holds what the run used (no OOM where the plan fits) ...
    assert gpu["peakTotalGiB"] <= gpu["plannedPerGpuGiB"], gpu
    # ... and is not so loose that it would refuse jobs that fit: within 2x here, where the
    # 1 GiB context allowance is a large share of a small model's total.
    assert gpu["peakTotalGiB"] >= 0.5 * gpu["plannedPerGpuGiB"], gpu
