"""The run's report: JSON (everything), Markdown (for people) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(plan: PlanDocument, summary: dict[str, Any]) -> str:
    m = summary.get("metrics") or {}
    stop = summary.get("earlyStop")
    lines = [
        "# kubetune run report",
        "",
        f"- Method: **{plan.method}**, ZeRO-{plan.zero_stage}, offload {plan.offload}",
        f"- Trainable parameters: {summary.get('trainableParameters', 0):,} of "
        f"{summary.get('totalParameters', 0):,}",
        f"- Planned memory per GPU: {plan.memory.per_gpu_gib:.2f} GiB",
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
        *(f"- {r}" for r in plan.reasons),
    ]
    warnings = [*plan.warnings, *(summary.get("warnings") or [])]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    probes = summary.get("probeSeconds") or {}
    if probes:
        runtime = float(summary.get("trainRuntimeSeconds") or 0.0)
        spent = sum(probes.values())
        share = f" ({100 * spent / runtime:.1f}% of the run)" if runtime else ""
        lines += [
            "",
            "## Diagnostics cost",
            "",
            f"Probes took {spent:.1f} s{share}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(probes.items())),
        ]
    general = summary.get("generalText") or {}
    if general:
        lines += ["", general_text_line(general)]
    gpu = summary.get("gpuMemory") or {}
    if gpu:
        lines += [
            "",
            f"GPU memory on rank 0: peak {gpu['peakTotalGiB']:.2f} GiB (reserved "
            f"{gpu['peakReservedGiB']:.2f} + {gpu['outsideAllocatorGiB']:.2f} outside the "
            f"allocator; tensors {gpu['peakAllocatedGiB']:.2f}) against the plan's "
            f"{gpu['plannedPerGpuGiB']:.2f} GiB per GPU.",
        ]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def general_text_line(general: dict[str, Any]) -> str:
    """The forgetting probe's text in one sentence: its source, size and cost."""
    source = general.get("source")
    tokens = general.get("tokens", 0)
    if source != "BaseModel":
        what = "dataset.generalTextUri" if source == "Uri" else "the shipped English text"
        return f"General text (forgetting probe): {what}, {tokens} tokens."
    if not general.get("samples"):
        return "General text (forgetting probe): no base-model samples (probe off)."
    how = (
        f"cached (drawn in {general.get('seconds', 0):.1f} s at the first start)"
        if general.get("cached")
        else f"drawn in {general.get('seconds', 0):.1f} s"
    )
    return (
        f"General text (forgetting probe): {general['samples']} samples of the base model, "
        f"{tokens} tokens (at most {general.get('maxTokens')}), {how}"
        + (f"; `{general['file']}`." if general.get("file") else ".")
    )


def plot(history: list[dict[str, Any]], path: Path, stop_step: int | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in history if r.get(key) is not None]

    train, evals = series("train_loss"), series("eval_loss")
    probes = {
        "memorisation (train)": series("memorization_rate_train"),
        "memorisation (held-out)": series("memorization_rate_heldout"),
        "general-text perplexity ratio": series("general_perplexity_ratio"),
    }
    two = any(probes.values())
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(7, 6 if two else 4), dpi=100)
    ax = axes[0] if two else axes
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
        best = min(evals, key=lambda p: p[1])
        ax.axvline(best[0], color="green", linestyle=":", label=f"best (step {best[0]})")
    if stop_step is not None:
        ax.axvline(stop_step, color="red", linestyle="--", label=f"stopped (step {stop_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if two:
        for label, pts in probes.items():
            if pts:
                axes[1].plot(*zip(*pts, strict=True), marker=".", label=label)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("rate / ratio")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(
    out: Path,
    plan: PlanDocument,
    spec: dict[str, Any],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    (out / "report.json").write_text(
        json.dumps(
            {"summary": summary, "plan": plan.to_json(), "spec": spec, "history": history},
            indent=2,
        )
    )
    (out / "report.md").write_text(markdown(plan, summary))
    stopped = summary.get("earlyStop")
    step = (summary.get("progress") or {}).get("step") if stopped else None
    plot(history, out / "loss.png", stop_step=step)
