"""Renders a preview of the Grafana dashboard with matplotlib: docs/dashboard-preview.png.

No Grafana runs here, so the preview is drawn from the dashboard JSON (layout, panel types,
titles, units, decimals, min/max, thresholds, legends) and a snapshot of real range-query
results: charts/kubetune/dashboards/preview-data.json, which tests/cluster/test_prometheus.py
writes when KUBETUNE_DASHBOARD_PREVIEW=<path> is set (a real Prometheus that scraped a real
CPU training run and the operator). To refresh both:

    KUBETUNE_DASHBOARD_PREVIEW=charts/kubetune/dashboards/preview-data.json \\
        .venv/bin/pytest -m cluster tests/cluster/test_prometheus.py
    .venv/bin/python charts/render_preview.py

It is a preview, not a screenshot: panels are drawn the way Grafana draws them in spirit
(time series, stat, gauge, bar gauge, table, state timeline) but not pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"
SNAPSHOT = ROOT / "charts" / "kubetune" / "dashboards" / "preview-data.json"
OUT = ROOT / "docs" / "dashboard-preview.png"

GRID_COLUMNS = 24
FIGURE_WIDTH_IN = 20.0
GRID_UNIT_IN = 0.34  # height of one Grafana grid row
HEADER_IN = 1.05
DPI = 72
# Grafana's threshold colour names and its classic series palette.
COLORS = {"green": "#56a64b", "orange": "#ff9830", "red": "#e02f44", "blue": "#3274d9"}
PALETTE = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9"]
PANEL_FACE, PANEL_EDGE, TEXT, MUTED = "#ffffff", "#d8d9da", "#1f1f20", "#6e7079"
# Thresholds further above the data than this factor are noted, not drawn.
THRESHOLD_REACH = 10.0

Axes = Any  # matplotlib ships no type information that mypy reads here


def color(name: str) -> str:
    return COLORS.get(name, name)


def legend(fmt: str, metric: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"
    return re.sub(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def format_value(value: float | None, unit: str, decimals: int | None) -> str:
    """A value as Grafana shows it in a stat, gauge or bar gauge, for the units used here."""
    if value is None or not math.isfinite(value):
        return "No data"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "bytes":
        scaled, suffix = _scale(value, 1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
        return f"{scaled:.{0 if suffix == 'B' else 1}f} {suffix}"
    if unit == "s":
        if abs(value) >= 3600:
            return f"{value / 3600:.1f} h"
        if abs(value) >= 60:
            return f"{int(value // 60)} min {int(value % 60)} s"
        if abs(value) >= 1 or value == 0:
            return f"{value:.{1 if decimals is None else decimals}f} s"
        return f"{value * 1000:.0f} ms"
    suffix = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    if unit == "short" and abs(value) >= 1000:
        scaled, big = _scale(value, 1000.0, ["", "K", "M", "B", "T"])
        return f"{scaled:.1f} {big}"
    if decimals is not None:
        return f"{value:.{decimals}f}{suffix}"
    return f"{value:.4g}{suffix}"


def _scale(value: float, base: float, suffixes: list[str]) -> tuple[float, str]:
    index = 0
    while abs(value) >= base and index < len(suffixes) - 1:
        value, index = value / base, index + 1
    return value, suffixes[index]


def axis_unit(unit: str, top: float) -> tuple[float, str]:
    """(divisor, label) for a time-series y axis: ticks are value / divisor, in label."""
    if unit == "percentunit":
        return 0.01, "%"
    if unit == "bytes":
        _, suffix = _scale(top, 1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
        power = ["B", "KiB", "MiB", "GiB", "TiB"].index(suffix)
        return 1024.0**power, suffix
    if unit == "s":
        return (1.0, "s") if top >= 1 or top == 0 else (0.001, "ms")
    return 1.0, {"ops": "ops/s", "reqps": "req/s"}.get(unit, "")


def threshold_color(value: float | None, steps: list[dict[str, Any]]) -> str:
    chosen = steps[0]["color"] if steps else "green"
    if value is not None:
        for step in steps:
            if step["value"] is None or value >= step["value"]:
                chosen = step["color"]
    return color(chosen)


def _points(series: dict[str, Any]) -> tuple[list[float], list[float]]:
    xs = [float(t) for t, v in series["values"] if v is not None]
    ys = [float(v) for _, v in series["values"] if v is not None]
    return xs, ys


def _last(series: dict[str, Any]) -> float | None:
    values = [v for _, v in series["values"] if v is not None]
    return float(values[-1]) if values else None


def _series(panel: dict[str, Any], data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(legend, series) for every series of every target, in target order."""
    fmts = {tg["refId"]: tg.get("legendFormat", "") for tg in panel.get("targets", [])}
    return [
        (legend(fmts.get(tg["refId"], ""), series["metric"]), series)
        for tg in data["targets"]
        for series in tg["series"]
    ]


def _clock(seconds: float, _pos: Any = None) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _timeseries(
    ax: Axes, panel: dict[str, Any], data: dict[str, Any], marks: list[float], duration: float
) -> None:
    from matplotlib.ticker import FuncFormatter

    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "none")
    lines = _series(panel, data)
    every = [y for _, s in lines for y in _points(s)[1]]
    lo, hi = (min(every), max(every)) if every else (0.0, 1.0)
    divisor, label = axis_unit(unit, max(abs(lo), abs(hi)))
    for i, (name, series) in enumerate(lines):
        xs, ys = _points(series)
        ax.plot(xs, [y / divisor for y in ys], color=PALETTE[i % len(PALETTE)], lw=1.6, label=name)
    bottom = defaults.get("min", min(lo, 0.0) if lo >= 0 else lo)
    top = defaults.get("max", hi)
    shown = (defaults.get("custom") or {}).get("thresholdsStyle", {}).get("mode", "off") != "off"
    off_scale: list[str] = []
    if shown:
        steps = defaults["thresholds"]["steps"]
        reach = max(abs(lo), abs(hi)) * THRESHOLD_REACH
        for step in steps:
            value = step["value"]
            if value is None:
                continue
            if "max" in defaults or reach == 0 or value <= reach:
                top = max(top, value * 1.15) if "max" not in defaults else top
                ax.axhline(value / divisor, color=color(step["color"]), ls="--", lw=1.2)
            else:
                off_scale.append(format_value(value, unit, None))
        # Grafana's "line+area": each band tinted with its colour.
        edges = [s["value"] if s["value"] is not None else -math.inf for s in steps]
        for j, step in enumerate(steps):
            lower = max(edges[j], bottom)
            upper = min(edges[j + 1] if j + 1 < len(steps) else math.inf, top)
            if upper > lower:
                ax.axhspan(lower / divisor, upper / divisor, color=color(step["color"]), alpha=0.06)
    if top <= bottom:
        top = bottom + 1.0
    pad = 0.0 if "max" in defaults else (top - bottom) * 0.05
    ax.set_ylim(bottom / divisor, (top + pad) / divisor)
    for t in marks:
        ax.axvline(t, color=COLORS["red"], ls=":", lw=1.4)
    ax.set_xlim(0, duration)
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))
    if label:
        ax.set_ylabel(label, fontsize=8, color=MUTED)
    if off_scale:
        ax.text(
            1.0,
            1.02,
            "thresholds " + ", ".join(off_scale) + ": above the data",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color=MUTED,
        )
    ax.grid(True, color="#ececec", lw=0.8)
    ax.tick_params(labelsize=7, colors=MUTED)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if lines:
        ax.legend(loc="best", fontsize=7, frameon=True, framealpha=0.8, handlelength=1.2)


def _stat(ax: Axes, panel: dict[str, Any], data: dict[str, Any]) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    lines = _series(panel, data)
    ax.set_axis_off()
    for i, (name, series) in enumerate(lines):
        centre = 1 - (i + 0.5) / len(lines)
        value = _last(series)
        xs, ys = _points(series)
        if len(xs) > 1:  # Grafana's default sparkline, faint, behind the number
            span_y = (max(ys) - min(ys)) or 1.0
            base = centre - 0.5 / len(lines)
            ax.fill_between(
                [(x - xs[0]) / ((xs[-1] - xs[0]) or 1.0) for x in xs],
                base,
                [base + 0.6 / len(lines) * (y - min(ys)) / span_y for y in ys],
                color=threshold_color(value, steps),
                alpha=0.12,
                lw=0,
            )
        ax.text(
            0.5,
            centre,
            format_value(value, defaults.get("unit", "none"), defaults.get("decimals")),
            ha="center",
            va="center",
            fontsize=22,
            fontweight="bold",
            color=threshold_color(value, steps),
        )
        ax.text(0.5, centre - 0.3 / len(lines), name, ha="center", fontsize=7, color=MUTED)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def _gauge(ax: Axes, panel: dict[str, Any], data: dict[str, Any]) -> None:
    from matplotlib.patches import Wedge

    defaults = panel["fieldConfig"]["defaults"]
    lo, hi = float(defaults.get("min", 0.0)), float(defaults.get("max", 1.0))
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-0.35, 1.15)
    lines = _series(panel, data)
    value = _last(lines[0][1]) if lines else None
    share = 0.0 if value is None else min(max((value - lo) / ((hi - lo) or 1.0), 0.0), 1.0)
    ax.add_patch(Wedge((0, 0), 1.0, 0, 180, width=0.22, color="#e9e9ec"))
    fill = threshold_color(value, defaults["thresholds"]["steps"])
    ax.add_patch(Wedge((0, 0), 1.0, 180 - 180 * share, 180, width=0.22, color=fill))
    text = format_value(value, defaults.get("unit", "none"), defaults.get("decimals"))
    ax.text(0, 0.2, text, ha="center", va="center", fontsize=20, fontweight="bold", color=fill)
    if lines:
        ax.text(0, -0.2, lines[0][0], ha="center", fontsize=7, color=MUTED)


def _bargauge(ax: Axes, panel: dict[str, Any], data: dict[str, Any]) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    lines = [(name, _last(s)) for name, s in _series(panel, data)]
    values = [v for _, v in lines if v is not None]
    top = float(defaults.get("max", max(values, default=1.0) * 1.25 or 1.0))
    steps = defaults["thresholds"]["steps"]
    for i, (name, value) in enumerate(lines):
        y = len(lines) - 1 - i
        ax.barh(y, top, color="#e9e9ec", height=0.55)
        ax.barh(y, value or 0.0, color=threshold_color(value, steps), height=0.55)
        ax.text(0, y + 0.42, name, fontsize=8, color=TEXT, va="bottom")
        shown = format_value(value, defaults.get("unit", "none"), defaults.get("decimals"))
        ax.text(top, y, f" {shown}", fontsize=11, fontweight="bold", va="center", color=TEXT)
    ax.set_xlim(0, top * 1.15)
    ax.set_ylim(-0.6, max(len(lines), 1) - 0.1)
    ax.set_axis_off()


def _table(ax: Axes, panel: dict[str, Any], data: dict[str, Any]) -> None:
    rows = [s["metric"] for tg in data["targets"] for s in tg["series"]]
    columns = sorted({k for row in rows for k in row})
    ax.set_axis_off()
    if not rows:
        return
    table = ax.table(
        cellText=[[row.get(c, "") for c in columns] for row in rows],
        colLabels=columns,
        loc="center",
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.6)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor(PANEL_EDGE)
        if r == 0:
            cell.set_text_props(fontweight="bold", color=MUTED)


def _state_timeline(
    ax: Axes, panel: dict[str, Any], data: dict[str, Any], step: float, duration: float
) -> None:
    from matplotlib.ticker import FuncFormatter

    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    lines = _series(panel, data)
    ax.set_yticks([len(lines) - 1 - i for i in range(len(lines))], [n for n, _ in lines])
    for i, (_name, series) in enumerate(lines):
        xs, _ = _points(series)
        spans: list[tuple[float, float]] = []
        for x in xs:  # contiguous samples make one state span
            if spans and x - spans[-1][1] <= 2.5 * step:
                spans[-1] = (spans[-1][0], x)
            else:
                spans.append((x, x))
        y = len(lines) - 1 - i
        ax.broken_barh(
            [(a, max(b - a, step)) for a, b in spans],
            (y - 0.3, 0.6),
            color=threshold_color(1.0, steps),
        )
    ax.set_xlim(0, duration)
    ax.set_ylim(-0.6, max(len(lines), 1) - 0.4)
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))
    ax.tick_params(labelsize=7, colors=MUTED)
    ax.tick_params(axis="y", labelsize=8, colors=TEXT, length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _annotation_marks(snapshot: dict[str, Any]) -> list[float]:
    """The first instant each annotation query matched (Grafana draws a marker there)."""
    marks = []
    for annotation in snapshot.get("annotations", []):
        for series in annotation["series"]:
            xs, _ = _points(series)
            if xs:
                marks.append(xs[0])
    return marks


def render(dashboard: dict[str, Any], snapshot: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    data = {p["id"]: p for p in snapshot["panels"]}
    panels = dashboard["panels"]
    grid_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = grid_h * GRID_UNIT_IN + HEADER_IN
    fig = plt.figure(figsize=(FIGURE_WIDTH_IN, height), dpi=DPI, facecolor="#f4f5f5")
    col_w = FIGURE_WIDTH_IN / GRID_COLUMNS
    duration = float(snapshot["durationSeconds"])
    step = float(snapshot.get("stepSeconds", 1))
    marks = _annotation_marks(snapshot)
    run = snapshot.get("run", {})
    fig.text(
        0.2 / FIGURE_WIDTH_IN,
        1 - 0.32 / height,
        f"{dashboard['title']}  (namespace {snapshot['namespace']}, "
        f"FineTuneJob {snapshot['finetunejob']})",
        fontsize=15,
        fontweight="bold",
        color=TEXT,
        va="center",
    )
    about = (
        f"Preview drawn with matplotlib from real range queries ({snapshot['recorded']}, "
        f"commit {snapshot['commit']}): {run.get('what', '')}; stopped early with "
        f"{run.get('earlyStop', '?')} after {run.get('steps', '?')} steps. x axes: min:s "
        "from the start of the window; red dotted line: the 'Early stops' annotation. "
        "Not a Grafana screenshot."
    )
    fig.text(
        0.2 / FIGURE_WIDTH_IN,
        1 - 0.7 / height,
        "\n".join(textwrap.wrap(about, 280)),
        fontsize=9,
        color=MUTED,
        va="center",
    )

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Grid units -> figure fractions (left, bottom, width, height)."""
        top_in = HEADER_IN + y * GRID_UNIT_IN
        return (
            x * col_w / FIGURE_WIDTH_IN,
            1 - (top_in + h * GRID_UNIT_IN) / height,
            w * col_w / FIGURE_WIDTH_IN,
            h * GRID_UNIT_IN / height,
        )

    gap_in = 0.06
    for panel in panels:
        g = panel["gridPos"]
        left, bottom, width, high = box(g["x"], g["y"], g["w"], g["h"])
        if panel["type"] == "row":
            fig.text(
                left + 0.1 / FIGURE_WIDTH_IN,
                bottom + high / 2,
                panel["title"],
                fontsize=12,
                fontweight="bold",
                color=TEXT,
                va="center",
            )
            continue
        gx, gy = gap_in / FIGURE_WIDTH_IN, gap_in / height
        frame = Rectangle(
            (left + gx, bottom + gy),
            width - 2 * gx,
            high - 2 * gy,
            transform=fig.transFigure,
            facecolor=PANEL_FACE,
            edgecolor=PANEL_EDGE,
            lw=1.0,
            zorder=-1,  # behind the panel's axes
        )
        fig.patches.append(frame)
        fig.text(
            left + 0.15 / FIGURE_WIDTH_IN,
            bottom + high - 0.22 / height,
            panel["title"],
            fontsize=10,
            fontweight="bold",
            color=TEXT,
            va="center",
        )
        axis_left = {"timeseries": 0.7, "state-timeline": 1.9}.get(panel["type"], 0.2)
        axis_bottom = 0.4 if panel["type"] in ("timeseries", "state-timeline") else 0.15
        ax = fig.add_axes(
            (
                left + axis_left / FIGURE_WIDTH_IN,
                bottom + axis_bottom / height,
                width - (axis_left + 0.2) / FIGURE_WIDTH_IN,
                high - (axis_bottom + 0.45) / height,
            )
        )
        ax.set_facecolor(PANEL_FACE)
        entry = data.get(panel["id"], {"targets": []})
        kind = panel["type"]
        if kind == "timeseries":
            _timeseries(ax, panel, entry, marks, duration)
        elif kind == "stat":
            _stat(ax, panel, entry)
        elif kind == "gauge":
            _gauge(ax, panel, entry)
        elif kind == "bargauge":
            _bargauge(ax, panel, entry)
        elif kind == "table":
            _table(ax, panel, entry)
        elif kind == "state-timeline":
            _state_timeline(ax, panel, entry, step, duration)
        else:
            raise ValueError(f"panel {panel['title']!r}: no preview for type {kind!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--data", type=Path, default=SNAPSHOT)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv[1:])
    render(json.loads(args.dashboard.read_text()), json.loads(args.data.read_text()), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
