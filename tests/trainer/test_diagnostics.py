"""The diagnostics on real (tiny) models: the memorisation probe tells a model that has
memorised its examples from one that has not; the perplexity probe agrees with the model's
own loss; a run on data it can only memorise is stopped with a reason, keeps its best
checkpoint, and its report shows the curves, the probes and the stop point."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import random_rows
from tests.trainer.conftest import MakeRun
from tests.trainer.test_trainer import _train

pytestmark = pytest.mark.trainer


def _rows(tiny_model: Path, examples: list[dict[str, str]]) -> tuple[Any, list[Any]]:
    from transformers import AutoTokenizer

    from kubetune.data import Example
    from kubetune.trainer.data import TokenizedDataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    exs = [
        Example(line=i + 1, prompt=e["prompt"], target=e["completion"])
        for i, e in enumerate(examples)
    ]
    return tok, TokenizedDataset(exs, tok, 128).rows


def _memorise(model: Any, rows: list[Any], steps: int) -> None:
    """Full fine-tuning on `rows` until the model has them by heart."""
    import torch

    from kubetune.trainer.data import Collator

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = Collator(pad_id=0)(rows)
    model.train()
    # One thread: the model is tiny, and OpenMP threads spinning against the other test
    # processes on a busy machine made this loop take minutes instead of seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)


def test_the_memorisation_probe_separates_memorised_from_untrained(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from kubetune.diagnostics.probes import memorization

    torch.manual_seed(0)
    tok, seen = _rows(tiny_model, random_rows(8, seed=1))
    _, unseen = _rows(tiny_model, random_rows(8, seed=2))
    pad = int(tok.pad_token_id)

    def probe(model: Any, rows: list[Any]) -> Any:
        return memorization(
            model, rows, k=4, m=12, near_distance=0.1, pad_id=pad, device="cpu", batch_size=5
        )

    untrained = LlamaForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_model).config)  # type: ignore[arg-type]
    assert probe(untrained, seen).exact_rate == 0.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = probe(model, seen)
    _memorise(model, seen, steps=150)
    after, baseline = probe(model, seen), probe(model, unseen)
    assert before.exact_rate == 0.0
    assert after.exact_rate >= 0.75, after
    assert after.near_rate >= after.exact_rate
    assert baseline.exact_rate == 0.0, baseline  # held-out: nothing to recall
    assert model.training  # the probe restores the training mode


def test_the_perplexity_probe_agrees_with_the_model_loss(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.diagnostics import perplexity_summary
    from kubetune.diagnostics.probes import text_rows, token_nlls
    from kubetune.trainer.runtime import GENERAL_TEXT_DEFAULT

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok, rows = _rows(tiny_model, random_rows(6, seed=3))
    nlls = token_nlls(model, rows, "cpu", batch_size=4)
    with torch.no_grad():
        losses = []
        counts = []
        for r in rows:
            out = model(
                input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])
            )
            n = sum(1 for x in r["labels"][1:] if x != -100)
            losses.append(float(out.loss) * n)
            counts.append(n)
    assert len(nlls) == sum(counts)
    assert sum(nlls) / len(nlls) == pytest.approx(sum(losses) / sum(counts), rel=1e-4)
    summary = perplexity_summary(nlls, high_threshold=100.0)
    assert summary.perplexity == pytest.approx(math.exp(sum(losses) / sum(counts)), rel=1e-4)

    general = text_rows(GENERAL_TEXT_DEFAULT.read_text(), tok, seq_len=64, budget=500)
    targets = sum(1 for r in general for x in r["labels"] if x != -100)
    assert 450 <= targets <= 500  # the token budget holds
    assert all(len(r["input_ids"]) <= 64 for r in general)


def test_a_run_that_can_only_memorise_is_stopped_keeps_its_best_and_reports(
    make_run: MakeRun,
) -> None:
    data = "\n".join(json.dumps(r) for r in random_rows(48, seed=4))
    run = make_run(
        method="Full",
        data=data,
        hp={
            "epochs": 40,
            "learningRate": 0.003,
            "evalSteps": 5,
            "warmupSteps": 0,
            "microBatchSize": 8,
            "gradientAccumulationSteps": 1,
        },
        spec_extra={
            "earlyStopping": {"enabled": True, "patience": 2},
            "diagnostics": {"memorizationSamples": 12, "prefixTokens": 4, "maxOverhead": 0.5},
        },
    )
    _train(run)
    term = run.termination()
    stop = term["earlyStop"]
    assert stop["reason"] in {
        "Overfitting",
        "OverMemorization",
        "NoImprovement",
        "MemorizationExceeded",
        "ForgettingExceeded",
    }, stop
    assert str(stop["message"])
    assert term["progress"]["step"] < term["progress"]["totalSteps"]
    report = json.loads((run.output / "report.json").read_text())
    summary = report["summary"]
    best_step = summary["metrics"]["bestStep"]
    assert summary["bestCheckpoint"].endswith(f"checkpoint-{best_step}")
    assert Path(summary["bestCheckpoint"]).is_dir()  # kept although newer ones were saved
    evals = [r for r in report["history"] if r.get("eval_loss") is not None]
    assert min(evals, key=lambda r: r["eval_loss"])["step"] == best_step
    # The diagnostics ran: base figures before training, probes at evaluations.
    assert report["history"][0]["phase"] == "base"
    assert report["history"][0]["general_perplexity_base"] > 1
    probed = [r for r in evals if "memorization_rate_train" in r]
    assert probed, "no evaluation ran the memorisation probe"
    assert all(0.0 <= r["memorization_rate_heldout"] <= 1.0 for r in probed)
    assert "general_perplexity_ratio" in probed[-1]
    assert set(summary["probeSeconds"]) == {
        "general_perplexity",
        "data_perplexity",
        "memorization",
        "base_samples",  # no generalTextUri: the base model's own samples, drawn once
    }
    markdown = (run.output / "report.md").read_text()
    assert f"Ended: early, {stop['reason']}" in markdown
    assert "## Diagnostics cost" in markdown
    assert (run.output / "loss.png").stat().st_size > 10_000


def test_the_memorisation_rule_stops_a_run_that_recalls_its_rows_verbatim(
    make_run: MakeRun,
) -> None:
    """Random completions (nothing to learn but the rows themselves) at a high learning
    rate, the loss rules out of reach (patience 50) and a tight margin: the memorisation
    probe's training rate pulls away from the held-out baseline and the policy stops the
    run for it, with the figures in the termination message, the history and the report."""
    from kubetune.operator.status import eval_points
    from kubetune.policy import StopSettings, decide
    from kubetune.trainer.callbacks import _eval_dict, with_probes

    data = "\n".join(json.dumps(r) for r in random_rows(40, seed=5, words=6))
    run = make_run(
        method="Full",
        data=data,
        hp={
            "epochs": 60,
            "learningRate": 0.01,
            "evalSteps": 5,
            "warmupSteps": 0,
            "microBatchSize": 12,
            "gradientAccumulationSteps": 1,
        },
        spec_extra={
            "earlyStopping": {
                "enabled": True,
                "patience": 50,
                "overMemorization": False,
                "memorization": {"margin": 0.1, "evaluations": 2},
                "forgetting": {"enabled": False},
            },
            "diagnostics": {
                "memorizationSamples": 12,
                "prefixTokens": 3,
                "continuationTokens": 6,
                "maxOverhead": 1.0,
            },
        },
    )
    _train(run)
    term = run.termination()
    stop = term["earlyStop"]
    assert stop["reason"] == "MemorizationExceeded", stop
    assert "held-out baseline" in stop["message"]
    assert term["progress"]["step"] < term["progress"]["totalSteps"]
    evals = [r for r in run.history() if r.get("eval_loss") is not None]
    last_two = [r for r in evals if "memorization_rate_train" in r][-2:]
    assert len(last_two) == 2
    for r in last_two:
        assert r["memorization_rate_train"] - r["memorization_rate_heldout"] > 0.1, r
    assert evals[-1]["step"] == term["progress"]["step"]
    report = json.loads((run.output / "report.json").read_text())
    best_step = report["summary"]["metrics"]["bestStep"]
    assert report["summary"]["bestCheckpoint"].endswith(f"checkpoint-{best_step}")
    # The operator's path decides the same from the rows GET /evaluations would serve.
    settings = StopSettings.from_spec(
        json.loads((run.output / "spec.json").read_text())["earlyStopping"]
    )
    from kubetune.policy import EvalPoint

    points = [
        with_probes(
            EvalPoint(step=int(r["step"]), eval_loss=float(r["eval_loss"])),
            r,
        )
        for r in evals
    ]
    served = eval_points([_eval_dict(p) for p in points])
    assert served == points
    assert decide(served, settings).reason == "MemorizationExceeded"


def test_without_general_text_the_forgetting_probe_reads_the_base_models_own_samples(
    make_run: MakeRun, tiny_model: Path
) -> None:
    """No dataset.generalTextUri: the trainer draws seeded samples from the base model
    before training, caches them in the output with their cost, and the forgetting probe's
    figures are those of that text (the base model's perplexity on the cached samples is
    the probe's base figure); a second start reads the cache instead of sampling again."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.diagnostics import perplexity_summary
    from kubetune.diagnostics.probes import token_nlls

    run = make_run(
        method="LoRA",
        rows=48,
        hp={"epochs": 4, "learningRate": 0.01, "evalSteps": 4, "microBatchSize": 8},
        spec_extra={
            "diagnostics": {"memorizationSamples": 4, "maxOverhead": 1.0},
            # Only the forgetting rule may stop it (the loss rules out of reach).
            "earlyStopping": {
                "enabled": True,
                "patience": 50,
                "overMemorization": False,
                "memorization": {"enabled": False},
                "forgetting": {"maxRatio": 2.0, "evaluations": 2},
            },
        },
    )
    _train(run)
    # The base model's own text is forgotten fast at this learning rate: the forgetting
    # rule stops the run, its figures in the message.
    term = run.termination()
    assert term["earlyStop"]["reason"] == "ForgettingExceeded", term.get("earlyStop")
    assert "forgetting.maxRatio 2" in term["earlyStop"]["message"]
    assert term["progress"]["step"] < term["progress"]["totalSteps"]
    cache = run.output / "base-model-samples.json"
    assert cache.is_file()
    data = json.loads(cache.read_text())
    samples = data["samples"]
    assert len(samples) >= 2
    assert all(1 <= len(x) <= data["length"] for x in samples)
    assert len(data["text"]) == len(samples)
    assert all(isinstance(t, str) for t in data["text"])
    report = json.loads((run.output / "report.json").read_text())
    summary = report["summary"]
    general = summary["generalText"]
    assert general["source"] == "BaseModel"
    assert general["cached"] is False
    assert general["samples"] == len(samples)
    assert general["tokens"] == sum(len(x) for x in samples) <= general["maxTokens"]
    assert general["seconds"] > 0
    assert summary["probeSeconds"]["base_samples"] > 0
    assert "samples of the base model" in (run.output / "report.md").read_text()
    base_row = report["history"][0]
    assert base_row["phase"] == "base"
    figures = [
        r["general_perplexity_ratio"] for r in report["history"] if "general_perplexity_ratio" in r
    ]
    assert len(figures) >= 2
    assert all(math.isfinite(x) and x > 0 for x in figures)
    assert figures[-2] > 2.0
    assert figures[-1] > 2.0
    assert math.isfinite(summary["metrics"]["generalPerplexity"])
    # The probe's base figure is the base model's perplexity on exactly these samples.
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    start = json.loads((tiny_model / "config.json").read_text())["bos_token_id"]
    rows = [{"input_ids": [start, *x], "labels": [-100, *x]} for x in samples]
    with torch.no_grad():
        expected = perplexity_summary(token_nlls(model, rows, "cpu"), 100.0).perplexity
    assert base_row["general_perplexity_base"] == pytest.approx(expected, rel=1e-3)
    # Not the shipped English text: the base model finds its own text far less surprising.
    assert base_row["general_perplexity_base"] < 50, base_row

    # A second run into the same output reads the cache (a resume, a restarted pod).
    import shutil

    shutil.rmtree(run.output / "checkpoints")
    shutil.rmtree(run.output / "final")
    _train(run)
    again = json.loads((run.output / "report.json").read_text())["summary"]
    assert again["generalText"]["cached"] is True
    assert again["generalText"]["samples"] == len(samples)
    assert "base_samples" not in again["probeSeconds"]
    assert json.loads(cache.read_text())["samples"] == samples


def test_base_model_samples_are_seeded_untruncated_and_leave_the_random_state(
    tiny_model: Path,
) -> None:
    """The sampler: the same seed gives the same samples, another seed others; a model
    whose generation config would truncate the distribution (top-k 1: every sample the
    same) is still sampled from its full softmax; the global random state is untouched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.diagnostics.probes import sample_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0

    def draw(seed: int) -> list[list[int]]:
        return sample_tokens(
            model,
            start_id=int(tok.bos_token_id),
            eos_id=int(tok.eos_token_id),
            samples=6,
            length=24,
            seed=seed,
            pad_id=int(tok.pad_token_id),
            device="cpu",
            batch_size=4,
        )

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = draw(7)
    assert torch.equal(torch.rand(3), expected)
    assert draw(7) == first
    assert draw(8) != first
    assert len(first) == 6
    assert all(1 <= len(x) <= 24 for x in first)
    assert len({tuple(x) for x in first}) > 1  # not top-k 1's single greedy text


def test_general_text_shipped_keeps_the_english_text_and_draws_no_samples(
    make_run: MakeRun, tmp_path: Path
) -> None:
    """dataset.generalText: Shipped: the forgetting probe reads kubetune's English text as
    before; nothing is sampled or cached."""
    run = make_run(
        method="LoRA",
        rows=24,
        hp={"epochs": 1, "evalSteps": 2, "microBatchSize": 8},
        spec_extra={
            # make_run writes the training data there.
            "dataset": {"uri": f"file://{tmp_path / 'train.jsonl'}", "generalText": "Shipped"},
            "diagnostics": {"memorizationSamples": 2, "maxOverhead": 1.0},
        },
    )
    _train(run)
    assert not (run.output / "base-model-samples.json").exists()
    summary = json.loads((run.output / "report.json").read_text())["summary"]
    assert summary["generalText"]["source"] == "Shipped"
    assert summary["generalText"]["tokens"] >= 256
    assert "base_samples" not in summary["probeSeconds"]
    assert "the shipped English text" in (run.output / "report.md").read_text()


def test_a_resumed_run_gives_the_policy_its_earlier_probe_figures(tmp_path: Path) -> None:
    """After a resume the policy sees the whole run: the evaluations from the checkpoint's
    log history with the probe figures of the history rows written before (which only rank
    0 reads; the other ranks take its points)."""
    from types import SimpleNamespace

    from kubetune.policy import StopSettings, decide
    from kubetune.trainer.callbacks import KubetuneCallback

    history = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 5, "eval_loss": 1.0, "memorization_rate_train": 0.6},
        {"step": 5, "memorization_rate_heldout": 0.1},  # not an evaluation row: ignored
        {"step": 10, "eval_loss": 0.9, "memorization_rate_train": 0.7},
        {"step": 15, "eval_loss": 0.8, "memorization_rate_train": 0.9},  # after the checkpoint
    ]
    rows[0]["memorization_rate_heldout"] = 0.1
    rows[2]["memorization_rate_heldout"] = 0.2
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    callback = KubetuneCallback(
        settings=StopSettings(),
        metrics=None,
        control=None,
        history_path=history,
        tokens_per_step=1.0,
        is_main=True,
    )
    state = SimpleNamespace(
        global_step=10,
        log_history=[
            {"loss": 1.2, "step": 5},
            {"eval_loss": 1.0, "step": 5},
            {"loss": 1.1, "step": 10},
            {"eval_loss": 0.9, "step": 10},
        ],
    )
    callback._resume_history(state)
    assert [(p.step, p.memorization_train, p.memorization_heldout) for p in callback.evals] == [
        (5, 0.6, 0.1),
        (10, 0.7, 0.2),
    ]
    assert decide(callback.evals, StopSettings()).reason == "MemorizationExceeded"
    assert len(history.read_text().splitlines()) == 3  # the row after the checkpoint is redone
