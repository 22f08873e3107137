"""The run's report: JSON (everything), Markdown (for people) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(plan: dict[str, Any], summary: dict[str, Any]) -> str:
    m = summary.get("metrics") or {}
    mem = plan.get("memory") or {}
    stop = summary.get("earlyStop")
    lines = [
        "# kubetune run report",
        "",
        f"- Method: **{plan.get('method')}**, ZeRO-{plan.get('zeroStage')}, "
        f"offload {plan.get('offload')}",
        f"- Trainable parameters: {summary.get('trainableParameters', 0):,} of "
        f"{summary.get('totalParameters', 0):,}",
        f"- Planned memory per GPU: {mem.get('perGpuGiB', 0):.2f} GiB",
        f"- Steps: {(summary.get('progress') or {}).get('step')} of "
        f"{(summary.get('progress') or {}).get('totalSteps')}",
        f"- Ended: {'early, ' + stop['reason'] + ': ' + stop['message'] if stop else 'completed'}",
        f"- Output: `{summary.get('output')}` (best checkpoint: `{summary.get('bestCheckpoint')}`)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in m.items()),
        "",
        "## Why this plan",
        "",
        *(f"- {r}" for r in plan.get("reasons", [])),
    ]
    if plan.get("warnings"):
        lines += ["", "## Warnings", "", *(f"- {w}" for w in plan["warnings"])]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def plot(history: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(
    out: Path,
    plan: dict[str, Any],
    spec: dict[str, Any],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    (out / "report.json").write_text(
        json.dumps({"summary": summary, "plan": plan, "spec": spec, "history": history}, indent=2)
    )
    (out / "report.md").write_text(markdown(plan, summary))
    plot(history, out / "loss.png")
