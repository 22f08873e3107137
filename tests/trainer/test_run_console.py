"""What `kubetune run` shows a person: the quickstart under a pseudo-terminal (a live
progress bar and one line per evaluation, no library noise) and without one (plain lines at
a bounded rate), and --quiet."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
KUBETUNE = [sys.executable, "-m", "kubetune"]

#: What the libraries print on their own and must not reach the console: HF's per-step and
#: per-evaluation dictionaries, its bars, and the warnings a quickstart run used to show.
NOISE = (
    "{'loss'",
    "{'eval_loss'",
    "eval_samples_per_second",
    "FutureWarning",
    "gradient_checkpointing",
    "mtime may not be reliable",
    "Setting accelerator to CPU",
    "Writing model shards",
    "Traceback",
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "default",  # the warnings a user's shell would show
    }


def _run_in_terminal(args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run under a pseudo-terminal of 140x40; returns the exit code and what it showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "140"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal closed with the last process
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError("kubetune run did not finish in time")
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def _assert_no_noise(text: str) -> None:
    for noise in NOISE:
        assert noise not in text, f"{noise!r} reached the console:\n{text[-3000:]}"


def test_the_quickstart_in_a_terminal_shows_progress_and_each_evaluation(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    code, raw = _run_in_terminal(
        [*KUBETUNE, "run", str(QUICKSTART), "--output", str(out)], tmp_path, timeout=900
    )
    screen = ANSI.sub("", raw).replace("\r", "\n")
    assert code == 0, screen[-4000:]
    _assert_no_noise(screen)
    # The first lines name the log the libraries' output went to, and it holds it.
    log = out / "logs" / "run.log"
    assert f"library output: {log}" in screen
    assert log.stat().st_size > 0
    # The live display: a bar with step/total, epoch, loss and ETA.
    assert "━" in raw
    assert re.search(r"step \d+/\d+ · epoch [\d.]+ · loss [\d.]+ .*ETA \S+", screen), screen
    assert re.search(r"best eval [\d.]+", screen)
    # One line per evaluation, with the figures the run exists for and the verdict.
    lines = [ln for ln in screen.splitlines() if ln.startswith("eval @ step ")]
    evaluations = [r for r in _history(out) if "eval_loss" in r]
    assert len({ln.split(":")[0] for ln in lines}) == len(evaluations) >= 2
    for needle in ("gap ", "perplexity ", "token accuracy ", "memorised train ", "-> keeps going"):
        assert any(needle in ln for ln in lines), (needle, lines)
    assert any("general text x" in ln for ln in lines)
    # Auto's decisions as they happen, and the end.
    assert "Auto at training start" in screen
    assert re.search(r"trained \d+ step\(s\) in \S+; final model in ", screen)
    # The report's summary and figures, not its reasons again (they came with the plan).
    assert "# kubetune run report" in screen
    assert "| evalLoss |" in screen
    assert "## Why this plan" not in screen
    assert "## Warnings" in screen  # the quickstart's: 300 examples, estimated token counts
    assert f"report: {out / 'report.md'}" in screen


def _history(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _short_quickstart(tmp_path: Path, **hp: object) -> Path:
    """The quickstart file (its ConfigMaps too) with a shorter run."""
    docs = list(yaml.safe_load_all(QUICKSTART.read_text()))
    for doc in docs:
        if doc.get("kind") == "FineTuneJob":
            doc["spec"].setdefault("hyperparameters", {}).update(hp)
    path = tmp_path / "quickstart-short.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_without_a_terminal_the_output_is_plain_lines_at_a_bounded_rate(tmp_path: Path) -> None:
    job = _short_quickstart(tmp_path, epochs=1)
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        [*KUBETUNE, "run", str(job), "--output", str(out)],
        cwd=tmp_path,
        env={**_env(), "KUBETUNE_PROGRESS_SECONDS": "2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout + result.stderr
    _assert_no_noise(text)
    assert "\x1b[" not in text  # no escape codes in a pipe
    assert "━" not in text
    progress = [ln for ln in result.stdout.splitlines() if ln.startswith("step ")]
    # The first and last step and one per 2 s between them: compared with how long the
    # steps took (the events file has every step's event and its time).
    events = [json.loads(ln) for ln in (out / "logs" / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "progress"]
    span = steps[-1]["time"] - steps[0]["time"]
    assert len(steps) > len(progress) >= 2
    assert span / 2 * 0.5 <= len(progress) <= min(span + 2, seconds) / 2 + 2, (span, progress)
    assert re.fullmatch(r"step \d+/(\d+) \(100%\) · .*", progress[-1])
    evaluations = [r for r in _history(out) if "eval_loss" in r]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("eval @ step ")]
    assert len(lines) == len(evaluations) >= 2
    assert f"library output: {out / 'logs' / 'run.log'}" in result.stdout


def test_quiet_prints_only_errors_with_the_same_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    docs = list(yaml.safe_load_all(QUICKSTART.read_text()))
    for doc in docs:
        if doc.get("kind") == "FineTuneJob":
            doc["spec"]["dataset"]["uri"] = f"file://{tmp_path}/no-such-data.jsonl"
    bad.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [*KUBETUNE, "run", str(bad), "--quiet"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no-such-data.jsonl" in result.stderr
    both = subprocess.run(
        [*KUBETUNE, "run", str(bad), "--quiet", "--verbose"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert both.returncode == 2
    assert "--verbose and --quiet exclude each other" in both.stderr
