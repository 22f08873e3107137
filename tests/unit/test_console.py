"""The console lines of a run (kubetune.console), the plain display's rate limit, and the
events file reader of `kubetune run`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune import console
from kubetune.local_run import EventReader, log_tail
from kubetune.run_display import PlainDisplay, QuietDisplay, make_display

pytestmark = pytest.mark.unit


def test_progress_line_has_step_epoch_loss_best_and_eta() -> None:
    event = {
        "kind": "progress",
        "step": 40,
        "totalSteps": 150,
        "epoch": 1.0666,
        "trainLoss": 3.21449,
        "bestEvalLoss": 3.1,
        "etaSeconds": 185,
    }
    assert console.progress_line(event) == (
        "step 40/150 (26%) · epoch 1.07 · loss 3.214 · best eval 3.100 · ETA 3m05s"
    )
    assert console.progress_line(event, percent=False).startswith("step 40/150 · epoch")
    # Before the first evaluation and the second step: no best eval, no ETA yet.
    early = console.progress_line({"step": 1, "totalSteps": 150, "trainLoss": 4.3})
    assert "best eval" not in early
    assert early.endswith("ETA ?")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (-1, "?"), (float("nan"), "?"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m")],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert console.duration(seconds) == text


def test_an_evaluation_line_has_every_figure_and_the_verdict() -> None:
    event = {
        "kind": "evaluation",
        "step": 40,
        "epoch": 1.07,
        "eval_loss": 2.5,
        "loss_gap": 0.25,
        "eval_perplexity": 12.18,
        "eval_token_accuracy": 0.5123,
        "memorization_rate_train": 0.31,
        "memorization_rate_heldout": 0.05,
        "general_perplexity_ratio": 1.18,
        "verdict": {"stop": False, "bestEvalLoss": 2.4, "bestStep": 35},
    }
    line = console.evaluation_line(event)
    assert line == (
        "eval @ step 40 (epoch 1.07): loss 2.500, gap +0.250, perplexity 12.18, token "
        "accuracy 0.512, memorised train 0.31 / held-out 0.05, general text x1.18 of base "
        "-> keeps going; best 2.400 at step 35"
    )
    # An evaluation without probes says only what was measured.
    bare = console.evaluation_line({"step": 5, "eval_loss": 3.0, "verdict": {}})
    assert bare == "eval @ step 5: loss 3.000 -> keeps going"


def test_the_verdict_says_whether_the_trainer_stops_or_only_would() -> None:
    stop = {"stop": True, "acts": True, "reason": "Overfitting", "message": "gap grew"}
    assert console.verdict_text(stop) == "stops: Overfitting (gap grew)"
    assert console.verdict_text({**stop, "acts": False}) == "would stop: Overfitting (gap grew)"
    assert console.verdict_text({"stop": False}) == "keeps going"


def test_stop_done_decision_and_error_lines() -> None:
    assert console.event_line(
        {"kind": "stop", "step": 30, "reason": "NoImprovement", "bestStep": 20}
    ) == ("early stop at step 30: NoImprovement; the best checkpoint (step 20) is kept")
    done = console.event_line(
        {"kind": "done", "steps": 150, "seconds": 31, "output": "/o/final", "bestEvalLoss": 1.5}
    )
    assert done is not None
    assert done.startswith("trained 150 step(s) in 31s; final model in /o")
    assert console.event_line({"kind": "decision", "text": "Auto at start: x"}) == (
        "Auto at start: x"
    )
    assert console.event_line({"kind": "decision", "text": "Steps: y"}) == "Auto: Steps: y"
    assert console.event_line({"kind": "error", "text": "boom"}) == "error: boom"
    assert console.event_line({"kind": "unknown"}) is None


def _progress(step: int, total: int = 100) -> dict[str, object]:
    return {"kind": "progress", "step": step, "totalSteps": total}


def test_plain_progress_lines_come_at_a_bounded_rate_and_evaluations_always() -> None:
    lines = console.PlainLines(seconds=30)
    said = []
    # 100 steps, one every 2 s (200 s), an evaluation every 10 steps.
    for step in range(1, 101):
        now = 2.0 * step
        for event in (_progress(step), {"kind": "evaluation", "step": step, "eval_loss": 1.0}):
            if event["kind"] == "evaluation" and step % 10:
                continue
            line = lines.line(event, now)
            if line is not None:
                said.append(line)
    progress = [s for s in said if s.startswith("step ")]
    evals = [s for s in said if s.startswith("eval @")]
    assert len(evals) == 10
    # The first step, then one per 30 s (200 s / 30 s), and the last step.
    assert progress[0].startswith("step 1/100")
    assert progress[-1].startswith("step 100/100")
    assert 7 <= len(progress) <= 9, progress


def test_the_plain_and_quiet_displays() -> None:
    out = io.StringIO()
    display = make_display(quiet=False, terminal=False, stream=out)
    assert isinstance(display, PlainDisplay)
    display.event({"kind": "evaluation", "step": 5, "eval_loss": 2.0})
    display.event(_progress(1))
    display.event(_progress(2))  # within the rate limit
    assert out.getvalue().splitlines() == [
        "eval @ step 5: loss 2.000 -> keeps going",
        "step 1/100 (1%) · ETA ?",
    ]
    quiet = make_display(quiet=True, terminal=True, stream=out)
    assert isinstance(quiet, QuietDisplay)


def test_the_terminal_display_draws_a_bar_and_prints_lines_above_it() -> None:
    from rich.console import Console

    from kubetune.run_display import TerminalDisplay

    buffer = io.StringIO()
    display = TerminalDisplay(Console(file=buffer, force_terminal=True, width=120))
    display.event({"kind": "start", "text": "training LoRA"})
    display.event({**_progress(40, 150), "trainLoss": 2.0, "etaSeconds": 20})
    display.event({"kind": "evaluation", "step": 40, "eval_loss": 2.0, "verdict": {}})
    display.close()
    text = buffer.getvalue()
    assert "training LoRA" in text
    assert "━" in text
    assert "step 40/150 · loss 2.000 · ETA 20s" in text
    assert "eval @ step 40: loss 2.000 -> keeps going" in text


def test_the_event_reader_returns_complete_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read() == []  # not written yet
    path.write_text(json.dumps({"kind": "start"}) + "\n" + '{"kind": "prog')
    assert reader.read() == [{"kind": "start"}]
    with path.open("a") as f:
        f.write('ress", "step": 1}\nnot json\n')
    assert reader.read() == [{"kind": "progress", "step": 1}]
    assert reader.read() == []


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    assert log_tail(log, 3) == "line 47\nline 48\nline 49"
    assert log_tail(tmp_path / "missing.log") == ""


def test_the_progress_interval_comes_from_the_environment() -> None:
    assert console.progress_seconds({}) == console.PLAIN_PROGRESS_SECONDS
    assert console.progress_seconds({"KUBETUNE_PROGRESS_SECONDS": "2.5"}) == 2.5
    assert console.progress_seconds({"KUBETUNE_PROGRESS_SECONDS": "-1"}) == 0.0
    bad = {"KUBETUNE_PROGRESS_SECONDS": "soon"}
    assert console.progress_seconds(bad) == console.PLAIN_PROGRESS_SECONDS


def test_after_a_failure_the_pod_launcher_prints_the_ranks_log_tails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.launch import TAIL_LINES, print_rank_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "trainer-rank-0.log").write_text("".join(f"r0 {i}\n" for i in range(100)))
    (logs / "trainer-rank-1.log").write_text("Segmentation fault\n")
    monkeypatch.setenv("KUBETUNE_OUTPUT_PATH", str(tmp_path))
    out = io.StringIO()
    print_rank_logs(out)
    text = out.getvalue()
    assert f"r0 {100 - TAIL_LINES}\n" in text
    assert f"r0 {99 - TAIL_LINES}\n" not in text
    assert "Segmentation fault" in text
    assert text.index("trainer-rank-0.log") < text.index("trainer-rank-1.log")
