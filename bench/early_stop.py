"""Early stopping on an overfit-prone small dataset: compute used and best eval loss of
the same job run for its full epoch budget (early stopping off) and with kubetune's policy
(early stopping on), side by side in one run.

The job is the quickstart's (the built-in base model, the Mossbrook glossary: 300 training
examples, 40 held-out ones with unseen names) made overfit-prone: each entry's habitat and
use are swapped with other entries' at random (the kind of plant still follows the name),
and it runs full fine-tuning at a high learning rate for many epochs. Both runs use the
same seed, so their trajectories are the same until the policy stops one of them;
the question is whether it stops after the best point and how much compute that saves.
Goal: at most 40% of the compute for a best eval loss within 1% of the full run's best.

    .venv/bin/python bench/early_stop.py            # 10 epochs, appends to RESULTS.md
    .venv/bin/python bench/early_stop.py --smoke    # a tiny budget, nothing recorded
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench._common import ROOT, header, record

QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def scramble_uses(lines: list[str], seed: int) -> list[str]:
    """Make the glossary overfit-prone: each entry keeps its name and kind of plant (a rule
    the model can learn from the name) but gets another entry's habitat and use, at random,
    so those of held-out plants cannot be inferred and the only way to lower the training
    loss further is to memorise them."""
    rows = [json.loads(line) for line in lines if line.strip()]
    heads, places, tails = [], [], []
    for r in rows:
        head, _, tail = r["completion"].partition("; ")
        kind, _, place = head.partition(" found ")
        heads.append(kind)
        places.append(place)
        tails.append(tail)
    rng = random.Random(seed)
    rng.shuffle(places)
    rng.shuffle(tails)
    return [
        json.dumps({"prompt": r["prompt"], "completion": f"{h} found {p}; {t}"})
        for r, h, p, t in zip(rows, heads, places, tails, strict=True)
    ]


def job_file(directory: Path, *, epochs: int, early: bool, rows: int | None) -> Path:
    """The quickstart job, full fine-tuning for `epochs`, early stopping on or off."""
    docs = list(yaml.safe_load_all(QUICKSTART.read_text()))
    out = []
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ConfigMap":
            for key in doc["data"]:
                lines = doc["data"][key].splitlines()
                if rows is not None:
                    lines = lines[: rows if "train" in key else rows // 4]
                doc["data"][key] = "\n".join(scramble_uses(lines, seed=len(key))) + "\n"
        if doc["kind"] == "FineTuneJob":
            spec = doc["spec"]
            spec["method"] = {"type": "Full"}
            spec["hyperparameters"] = {
                "learningRate": 0.006,
                "epochs": epochs,
                "microBatchSize": 16,
                "gradientAccumulationSteps": 1,
                "evalSteps": 6,
            }
            spec["earlyStopping"] = {"enabled": early, "patience": 3}
            doc["metadata"]["name"] = "early" if early else "full"
        out.append(doc)
    path = directory / ("early.yaml" if early else "full.yaml")
    path.write_text(yaml.safe_dump_all(out, sort_keys=False))
    return path


def run(job: Path, output: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kubetune"), "run", str(job), "--output", str(output)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"kubetune run {job} failed:\n{result.stderr[-3000:]}")
    report = json.loads((output / "report.json").read_text())
    summary = report["summary"]
    evals = [r for r in report["history"] if r.get("eval_loss") is not None]
    tokens_per_step = None
    plan = report["plan"]
    hp = plan.get("hyperparameters") or {}
    if plan.get("tokenCount") and plan.get("exampleCount"):
        tokens_per_step = (
            plan["tokenCount"] / plan["exampleCount"] * int(hp.get("effectiveBatchSize") or 1)
        )
    best = min(evals, key=lambda r: r["eval_loss"])
    return {
        "steps": summary["progress"]["step"],
        "total_steps": summary["progress"]["totalSteps"],
        "train_seconds": summary["trainRuntimeSeconds"],
        "wall_seconds": wall,
        "best_eval_loss": best["eval_loss"],
        "best_step": best["step"],
        "evaluations": len(evals),
        "stop": summary.get("earlyStop"),
        "tokens_per_step": tokens_per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget, nothing recorded")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    epochs, rows = (2, 48) if args.smoke else (args.epochs, None)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        d = Path(tmp)
        # Both at once: the same code and the same machine load for both (compute is
        # compared in optimizer steps; their wall times are not comparable anyway).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            full_f = pool.submit(
                run, job_file(d, epochs=epochs, early=False, rows=rows), d / "out-full"
            )
            early_f = pool.submit(
                run, job_file(d, epochs=epochs, early=True, rows=rows), d / "out-early"
            )
            full, early = full_f.result(), early_f.result()
    compute = early["steps"] / full["steps"]
    best_gap = (early["best_eval_loss"] - full["best_eval_loss"]) / full["best_eval_loss"]
    stop = early["stop"] or {}
    lines = [
        header("Early stopping versus the full epoch budget (bench/early_stop.py)"),
        f"Quickstart data with habitats and uses scrambled, base model, full fine-tuning, "
        f"lr 0.006, {epochs} epochs, micro-batch 16, evaluation every 6 steps, patience 3, "
        "same seed.",
        "",
        "| run | steps | train s | best eval loss | best at step | evaluations | ended |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in (("full budget", full), ("early stopping", early)):
        ended = f"{r['stop']['reason']}" if r["stop"] else "completed"
        lines.append(
            f"| {name} | {r['steps']} / {r['total_steps']} | {r['train_seconds']:.0f} | "
            f"{r['best_eval_loss']:.4f} | {r['best_step']} | {r['evaluations']} | {ended} |"
        )
    ok_compute = compute <= 0.40
    ok_loss = best_gap <= 0.01
    lines += [
        "",
        f"- compute (optimizer steps, same tokens per step): {100 * compute:.0f}% of the full "
        f"run (goal <= 40%: {'met' if ok_compute else 'missed'}); train time "
        f"{100 * early['train_seconds'] / full['train_seconds']:.0f}%",
        f"- best eval loss: {100 * best_gap:+.2f}% against the full run's best (goal within "
        f"1%: {'met' if ok_loss else 'missed'})",
        f"- stop: {stop.get('reason', '-')}: {stop.get('message', '-')}",
    ]
    record("\n".join(lines), enabled=not (args.smoke or args.no_record))


if __name__ == "__main__":
    main()
