"""Trainer overhead: tokens/s of `kubetune run` against a plain Hugging Face Trainer with the
same model, data, DeepSpeed config and steps (2 processes, DeepSpeed ZeRO-2 over gloo on
CPU), with kubetune's probes on and off. Goals: at least 0.9 of plain HF with all probes on,
0.97 with probes off.

The plain run uses kubetune.trainer.setup.load_inputs and training_arguments (the same
inputs and TrainingArguments, evaluations included) with a bare Trainer: no callback,
metrics endpoint, token accuracy, probes or report. The modes run interleaved, `--reps`
times each, and the median train runtime of each is compared (the steps are the same).

    .venv/bin/python bench/trainer_overhead.py            # quickstart data, 2 epochs, 3 reps
    .venv/bin/python bench/trainer_overhead.py --smoke    # tiny, nothing recorded
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench._common import ROOT, header, record

QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MODES = ("plain HF Trainer", "kubetune, probes off", "kubetune, probes on")


def job_file(path: Path, *, epochs: float, probes: bool, rows: int | None) -> Path:
    docs = []
    for doc in yaml.safe_load_all(QUICKSTART.read_text()):
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ConfigMap" and rows is not None:
            for key in doc["data"]:
                keep = rows if "train" in key else max(4, rows // 4)
                doc["data"][key] = "\n".join(doc["data"][key].splitlines()[:keep]) + "\n"
        if doc["kind"] == "FineTuneJob":
            spec = doc["spec"]
            # LoRA explicitly, as planned for this data.
            spec["method"] = {"type": "LoRA"}
            spec["hyperparameters"] = {"learningRate": 0.003, "epochs": epochs}
            spec["deepspeed"] = {"zeroStage": 2}
            spec["earlyStopping"] = {"enabled": False}
            # The remedies (replay) would add training rows the plain run lacks.
            spec["remedies"] = {
                k: {"mode": "Off"}
                for k in ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
            }
            spec["diagnostics"] = {"enabled": probes}
        docs.append(doc)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def one(mode: str, d: Path, *, epochs: float, rows: int | None, rep: int) -> dict[str, Any]:
    from kubetune.local_run import prepare_local_run

    probes = mode.endswith("probes on")
    tag = f"{rep}-{MODES.index(mode)}"
    job = job_file(d / f"job-{tag}.yaml", epochs=epochs, probes=probes, rows=rows)
    run = prepare_local_run(job, 2, d / f"out-{tag}", None)
    if mode.startswith("plain"):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(ROOT / "bench" / "_plain_hf.py"),
            str(run.config_dir),
        ]
    else:
        command = run.command
    result = subprocess.run(command, env=run.env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    if mode.startswith("plain"):
        line = next(x for x in result.stdout.splitlines() if x.startswith("PLAIN_RESULT "))
        data = json.loads(line.removeprefix("PLAIN_RESULT "))
        return {"runtime": float(data["train_runtime"]), "steps": int(data["steps"])}
    summary = json.loads((run.output / "report.json").read_text())["summary"]
    return {
        "runtime": float(summary["trainRuntimeSeconds"]),
        "steps": int(summary["progress"]["step"]),
        "probe_seconds": sum((summary.get("probeSeconds") or {}).values()),
        "tokens_per_step": run.plan.token_count
        / run.plan.example_count
        * run.plan.hyperparameters.effective_batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, nothing recorded")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    epochs, rows, reps = (1, 32, 1) if args.smoke else (args.epochs, None, args.reps)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        for rep in range(reps):
            for mode in MODES:
                results[mode].append(one(mode, Path(tmp), epochs=epochs, rows=rows, rep=rep))
    steps = {r["steps"] for rs in results.values() for r in rs}
    if len(steps) != 1:
        raise SystemExit(f"the modes ran different numbers of steps: {results}")
    median = {m: statistics.median(r["runtime"] for r in rs) for m, rs in results.items()}
    tokens_per_step = results[MODES[1]][0]["tokens_per_step"]
    step_count = results[MODES[0]][0]["steps"]
    lines = [
        header("Trainer overhead against a plain HF Trainer (bench/trainer_overhead.py)"),
        f"Quickstart data, built-in base model, LoRA as planned, DeepSpeed ZeRO-2, 2 CPU "
        f"processes (gloo), {epochs:g} epoch(s) = {step_count} steps with evaluations, "
        f"{reps} interleaved repetition(s); median train runtime. Steps in every run: "
        f"{sorted(steps)}.",
        "",
        "| mode | steps | train s (median) | runs | tokens/s | ratio to plain | probe s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for mode in MODES:
        rs = results[mode]
        tps = tokens_per_step * step_count / median[mode]
        probe = statistics.median(r.get("probe_seconds", 0.0) for r in rs)
        runs = ", ".join(f"{r['runtime']:.1f}" for r in rs)
        lines.append(
            f"| {mode} | {rs[0]['steps']} | {median[mode]:.1f} | "
            f"{runs} | {tps:,.0f} | "
            f"{median[MODES[0]] / median[mode]:.3f} | {probe:.1f} |"
        )
    off = median[MODES[0]] / median[MODES[1]]
    on = median[MODES[0]] / median[MODES[2]]
    lines += [
        "",
        f"- probes off: {off:.3f} of plain HF (goal >= 0.97: {'met' if off >= 0.97 else 'missed'})",
        f"- probes on: {on:.3f} of plain HF (goal >= 0.90: {'met' if on >= 0.90 else 'missed'})",
        "- kubetune's runs also compute eval token accuracy (argmax of the eval logits), serve "
        "/metrics and write metrics.jsonl; the plain run does none of that.",
    ]
    record("\n".join(lines), enabled=not (args.smoke or args.no_record))


if __name__ == "__main__":
    main()
