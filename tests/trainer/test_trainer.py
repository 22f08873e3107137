"""Real training of a tiny model on CPU: single process, two-process DeepSpeed ZeRO-2 with
LoRA and ZeRO-3 full fine-tuning, resume after a kill, bad data, the stop endpoint."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import MakeRun, Run

pytestmark = pytest.mark.trainer

FAST_LORA = {
    "epochs": 4,
    "learningRate": 0.02,
    "evalSteps": 6,
    "warmupSteps": 0,
    "microBatchSize": 8,
    "gradientAccumulationSteps": 1,
}
FAST_FULL = {
    "epochs": 4,
    "learningRate": 0.003,
    "evalSteps": 6,
    "warmupSteps": 0,
    "microBatchSize": 8,
    "gradientAccumulationSteps": 1,
}


def _train(run: Run, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        run.command, env=run.env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        # In a pod the libraries' output (and the traceback) goes to the output's log.
        log = run.output / "logs" / "trainer-rank-0.log"
        detail = log.read_text()[-4000:] if log.exists() else result.stderr[-4000:]
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-2000:]}\n{detail}")
    return result


def _losses(run: Run) -> tuple[list[float], list[float]]:
    hist = run.history()
    return (
        [r["train_loss"] for r in hist if r.get("train_loss") is not None],
        [r["eval_loss"] for r in hist if r.get("eval_loss") is not None],
    )


def _assert_learned(run: Run) -> None:
    train, evals = _losses(run)
    assert len(evals) >= 2
    assert evals[-1] < evals[0] * 0.85, f"eval loss did not fall enough: {evals}"
    assert min(train[-3:]) < train[0] * 0.8, f"train loss did not fall: {train}"


def test_single_process_lora_learns_and_writes_every_output(make_run: MakeRun) -> None:
    run = make_run(method="LoRA", hp=FAST_LORA)
    result = _train(run)
    _assert_learned(run)
    # As in a pod (no `kubetune run` around it): plain lines on stdout, one per evaluation,
    # and the libraries' output in the output folder's log, named in the first line.
    log = run.output / "logs" / "trainer-rank-0.log"
    assert result.stdout.splitlines()[0] == f"kubetune trainer: library output in {log}"
    evals = [ln for ln in result.stdout.splitlines() if ln.startswith("eval @ step ")]
    assert len(evals) == len(_losses(run)[1])
    assert "training LoRA: " in result.stdout
    assert "{'loss'" not in result.stdout + result.stderr
    assert "INFO kubetune.trainer: method LoRA" in log.read_text()
    final = run.output / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (final / name).exists(), name
    for name in ("plan.json", "spec.json", "metrics.jsonl", "report.json", "report.md", "loss.png"):
        assert (run.output / name).exists(), name
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run.env["KUBETUNE_MODEL_PATH"])
    model = PeftModel.from_pretrained(base, str(final))
    assert any("lora_" in n for n, _ in model.named_parameters())
    # The adapter merges into the base weights and gives the same outputs.
    import torch

    from kubetune.trainer.merge import merge_adapter

    merged_dir = merge_adapter(run.output)
    merged: Any = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    ids = torch.tensor([[1, 5, 9, 12, 20]])
    model.eval()
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    term = run.termination()
    assert term["metrics"]["evalLoss"] == pytest.approx(_losses(run)[1][-1])
    assert term["progress"]["percentage"] == 100.0
    assert "# kubetune run report" in (run.output / "report.md").read_text()


def test_single_process_full_fine_tuning_learns(make_run: MakeRun) -> None:
    run = make_run(method="Full", hp=FAST_FULL)
    _train(run)
    _assert_learned(run)


def test_two_process_deepspeed_zero2_lora(make_run: MakeRun) -> None:
    # Two processes double the batch and halve the steps: train twice the epochs.
    run = make_run(method="LoRA", zero=2, nproc=2, hp={**FAST_LORA, "epochs": 10})
    assert run.plan["zeroStage"] == 2
    _train(run)
    _assert_learned(run)
    assert json.loads((run.output / "final" / "adapter_config.json").read_text())["r"] >= 1


def test_two_process_deepspeed_zero3_full_fine_tuning(make_run: MakeRun) -> None:
    run = make_run(method="Full", zero=3, nproc=2, hp=FAST_FULL)
    assert run.plan["zeroStage"] == 3
    _train(run)
    _assert_learned(run)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run.output / "final"))
    assert sum(p.numel() for p in model.parameters()) == run.plan["totalParameters"]


def test_a_killed_run_resumes_from_its_last_checkpoint(make_run: MakeRun) -> None:
    hp = {**FAST_LORA, "epochs": 6, "evalSteps": 4}
    run = make_run(method="LoRA", hp=hp)
    ckpts = run.output / "checkpoints"
    proc = subprocess.Popen(
        run.command, env=run.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
        (d / "trainer_state.json").exists() for d in ckpts.glob("checkpoint-*")
    ):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.5)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    done = sorted(
        int(d.name.split("-")[1])
        for d in ckpts.glob("checkpoint-*")
        if (d / "trainer_state.json").exists()
    )
    assert done, "no checkpoint was written before the kill"
    last = done[-1]
    result = _train(run)
    # The console line says so, and the library log has the trainer's own log line.
    assert f"; resuming from checkpoint-{last}" in result.stdout
    log = (run.output / "logs" / "trainer-rank-0.log").read_text()
    assert f"resuming from {ckpts / f'checkpoint-{last}'}" in log
    steps = [r["step"] for r in run.history() if r.get("train_loss") is not None]
    # Steps up to the checkpoint ran once; only those after it (at most one checkpoint
    # interval, done by the killed run before the kill) may have run twice.
    for step in range(1, last + 1):
        assert steps.count(step) == 1, (step, steps)
    assert all(steps.count(s) <= 2 for s in steps)
    assert max(steps) == run.termination()["progress"]["totalSteps"]
    assert all(steps.count(s) == 1 for s in steps if s > last + hp["evalSteps"])
    assert run.termination()["progress"]["percentage"] == 100.0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("", "the dataset is empty"),
        ('{"prompt": "a", "completion": "b"}\n{oops\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "line 1: missing field 'completion'"),
        ('{"text": "x"}\n{"prompt": "a", "completion": "b"}\n', "line 2: this row is"),
    ],
)
def test_bad_data_exits_with_the_config_error_code(
    make_run: MakeRun, tiny_model: Path, data: str, expected: str
) -> None:
    run = make_run(method="LoRA", hp=FAST_LORA)
    Path(run.env["KUBETUNE_DATASET_PATH"]).write_text(data)
    result = subprocess.run(run.command, env=run.env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 78, result.stderr[-2000:]
    term = run.termination()
    assert term["reason"] == "ConfigError"
    assert expected in term["error"]


def test_data_encoding_masks_the_prompt(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune.data import Example
    from kubetune.trainer.data import IGNORE_INDEX, Collator, encode

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    row = encode(Example(1, "Define term 3: ", "Term 3 means item 3."), tok, 64)
    n_prompt = len(tok("Define term 3: ", add_special_tokens=False)["input_ids"])
    assert row["labels"][: 1 + n_prompt] == [IGNORE_INDEX] * (1 + n_prompt)
    assert row["labels"][1 + n_prompt :] == row["input_ids"][1 + n_prompt :]
    assert row["input_ids"][-1] == tok.eos_token_id
    text_row = encode(Example(1, "", "plain text"), tok, 64)
    assert IGNORE_INDEX not in text_row["labels"][1:]
    batch: Any = Collator(pad_id=tok.pad_token_id)([row, text_row])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert int(batch["attention_mask"][1].sum()) == len(text_row["input_ids"])


def test_the_launcher_fails_bad_data_with_the_config_error_code_before_torchrun(
    make_run: MakeRun,
) -> None:
    run = make_run(method="LoRA", hp=FAST_LORA)
    Path(run.env["KUBETUNE_DATASET_PATH"]).write_text('{"prompt": "a", "completion": 3}\n')
    config_dir = run.command[-1]
    cmd = [
        run.command[0],
        "-m",
        "kubetune.trainer.launch",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "kubetune.trainer",
        config_dir,
    ]
    env = {**run.env, "KUBETUNE_CONFIG_DIR": config_dir.split("=", 1)[1]}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 78, result.stderr[-2000:]
    assert "line 1: field 'completion' must be a string" in run.termination()["error"]


def test_the_stop_endpoint_needs_the_token_and_stops_the_run(make_run: MakeRun) -> None:
    import urllib.error
    import urllib.request

    from kubetune.trainer.server import ControlServer, TrainerMetrics

    server = ControlServer(TrainerMetrics(), "right", 0, host="127.0.0.1").start()
    try:
        url = f"http://127.0.0.1:{server.port}/stop"
        for token in ("", "wrong"):
            req = urllib.request.Request(
                url, method="POST", data=b"{}", headers={"Authorization": f"Bearer {token}"}
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=5)
            assert err.value.code == 401
        assert not server.stop_requested.is_set()
        req = urllib.request.Request(
            url,
            method="POST",
            data=b'{"reason": "StopRequested"}',
            headers={"Authorization": "Bearer right"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 202
        assert server.stop_requested.is_set()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            assert b"kubetune_eval_loss" in resp.read()
    finally:
        server.close()


@pytest.mark.parametrize("method", ["Prefix", "Partial"])
def test_prefix_and_partial_fine_tuning_train_and_save(make_run: MakeRun, method: str) -> None:
    run = make_run(method=method, hp={**FAST_FULL, "learningRate": 0.01})
    assert run.plan["method"] == method
    _train(run)
    _, evals = _losses(run)
    assert evals[-1] < evals[0], evals
    final = run.output / "final"
    if method == "Prefix":
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == (
            "PREFIX_TUNING"
        )
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(final))
    trainable = run.termination()
    assert trainable["progress"]["percentage"] == 100.0


def test_chat_rows_use_the_tokenizer_chat_template_and_learn_only_the_reply() -> None:
    from kubetune.data import parse_jsonl
    from kubetune.trainer.basemodel import build_tokenizer
    from kubetune.trainer.data import IGNORE_INDEX, encode

    tok = build_tokenizer("hello world. how are you? fine thanks. " * 200, 300)
    assert tok.chat_template
    row = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "fine thanks."},
            ]
        }
    )
    fmt, (example,) = parse_jsonl(row, "chat.jsonl")
    assert fmt == "Chat"
    encoded = encode(example, tok, 128)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "how are you?"}], add_generation_prompt=True, tokenize=False
    )
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    reply = str(tok.decode([t for t in encoded["labels"] if t != IGNORE_INDEX]))
    assert reply.startswith("fine thanks.")
    assert tok.decode(encoded["input_ids"][:n_prompt]) == tok.decode(
        tok(prompt, add_special_tokens=False)["input_ids"]
    )


def test_a_hub_dataset_is_read_through_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real hub code path, offline, against a local directory in the hub cache layout."""
    from kubetune.trainer.data import read_examples

    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--support"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    (snap / "data").mkdir(parents=True)
    (snap / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (snap / "data" / "eval.jsonl").write_text('{"prompt": "c", "completion": "hello"}\n')
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        fmt, rows = read_examples("hf://acme/support", None)
        assert (fmt, rows[0].target) == ("PromptCompletion", "b")
        fmt, rows = read_examples("hf://acme/support/data/eval.jsonl", None)
        assert (fmt, rows[0].target) == ("PromptCompletion", "hello")
        with pytest.raises((OSError, ValueError)):
            read_examples("hf://acme/missing", None)
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
