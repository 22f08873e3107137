"""Generates the kubetune Grafana dashboard: charts/kubetune/dashboards/kubetune.json.

Run `python charts/dashboard.py` after changing a panel; tests/unit/test_chart.py fails when
the JSON is out of date, and tests/cluster/test_prometheus.py runs every query below through
a real Prometheus that scraped a real training run and the operator.

Trainer series carry `namespace` and `finetunejob` (the PodMonitor's relabelling of the pod
label `kubetune.dev/job`); the operator's series carry neither.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "kubetune" / "dashboards" / "kubetune.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The trainer selector every trainer panel uses.
SEL = 'namespace="$namespace", finetunejob=~"$job"'
GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"

# Warning levels (also listed in docs/install.md).
LOSS_GAP_WARN, LOSS_GAP_BAD = 0.3, 0.5  # eval minus train loss
PERPLEXITY_WARN, PERPLEXITY_BAD = 20.0, 50.0  # eval perplexity (docs/api.md's example stop)
EVALS_SINCE_BEST_WARN, EVALS_SINCE_BEST_BAD = 2, 3  # the default patience is 3
MEMORIZATION_WARN, MEMORIZATION_BAD = 0.05, 0.2  # share of probed examples reproduced
GENERAL_RATIO_WARN, GENERAL_RATIO_BAD = 1.1, 1.25  # general-text perplexity / base model's
HIGH_PPL_TOKENS_WARN, HIGH_PPL_TOKENS_BAD = 0.1, 0.25  # share of high-perplexity data tokens
RECONCILE_SECONDS_WARN, RECONCILE_SECONDS_BAD = 1.0, 5.0  # p95 reconcile latency


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | gauge | bargauge | state-timeline | table
    targets: list[Target]
    unit: str = "none"
    description: str = ""
    thresholds: list[tuple[float | None, str]] = field(default_factory=lambda: [(None, GREEN)])
    width: int = 8
    height: int = 8
    decimals: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    show_thresholds: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel]


def t(expr: str, legend: str = "{{finetunejob}}", instant: bool = False) -> Target:
    return Target(expr, legend, instant)


def steps(*pairs: tuple[float | None, str]) -> list[tuple[float | None, str]]:
    return list(pairs)


ROWS: list[Row] = [
    Row(
        "Loss",
        [
            Panel(
                "Train and eval loss",
                "timeseries",
                [
                    t(f"kubetune_train_loss{{{SEL}}}", "{{finetunejob}} train"),
                    t(f"kubetune_eval_loss{{{SEL}}}", "{{finetunejob}} eval"),
                ],
                description="Train loss (mean over the last logging window) and the loss on "
                "the validation set at each evaluation.",
                decimals=3,
            ),
            Panel(
                "Loss gap (eval - train)",
                "timeseries",
                [t(f"kubetune_loss_gap{{{SEL}}}")],
                description="A growing gap means the model fits the training set better than "
                "it generalises: overfitting. earlyStopping.maxLossGap stops the run above it.",
                thresholds=steps((None, GREEN), (LOSS_GAP_WARN, ORANGE), (LOSS_GAP_BAD, RED)),
                decimals=3,
                show_thresholds=True,
            ),
            Panel(
                "Eval perplexity",
                "timeseries",
                [t(f"kubetune_eval_perplexity{{{SEL}}}")],
                description="exp(eval loss). Rising while token accuracy holds is "
                "over-memorisation; earlyStopping.maxEvalPerplexity stops the run above it.",
                thresholds=steps((None, GREEN), (PERPLEXITY_WARN, ORANGE), (PERPLEXITY_BAD, RED)),
                decimals=2,
                show_thresholds=True,
            ),
            Panel(
                "Eval token accuracy",
                "timeseries",
                [t(f"kubetune_eval_token_accuracy{{{SEL}}}")],
                description="Share of validation target tokens predicted exactly.",
                unit="percentunit",
                minimum=0,
                maximum=1,
            ),
        ],
    ),
    Row(
        "Best evaluation",
        [
            Panel(
                "Best eval loss",
                "stat",
                [t(f"kubetune_best_eval_loss{{{SEL}}}")],
                description="Lowest eval loss so far; the best checkpoint is kept.",
                decimals=4,
                width=6,
                height=5,
            ),
            Panel(
                "Best step",
                "stat",
                [t(f"kubetune_best_step{{{SEL}}}")],
                description="Optimizer step of the lowest eval loss.",
                width=6,
                height=5,
            ),
            Panel(
                "Evaluations since best",
                "stat",
                [t(f"kubetune_evals_since_best{{{SEL}}}")],
                description="Evaluations without improvement; the run stops at "
                "earlyStopping.patience (3 by default).",
                thresholds=steps(
                    (None, GREEN), (EVALS_SINCE_BEST_WARN, ORANGE), (EVALS_SINCE_BEST_BAD, RED)
                ),
                width=6,
                height=5,
            ),
            Panel(
                "Plan",
                "table",
                [
                    t(
                        f"kubetune_plan_info{{{SEL}}}",
                        "{{method}} ZeRO-{{zero_stage}} offload {{offload}}",
                        instant=True,
                    )
                ],
                description="The method, ZeRO stage and offload the planner chose.",
                width=6,
                height=5,
            ),
        ],
    ),
    Row(
        "Memorisation and forgetting",
        [
            Panel(
                "Memorisation rate",
                "timeseries",
                [t(f"kubetune_memorization_rate{{{SEL}}}", "{{finetunejob}} {{split}} {{match}}")],
                description="Share of probed examples whose target the model reproduces from "
                "the prompt (exact or near match), on training and held-out examples. Train "
                "far above held-out is verbatim memorisation.",
                unit="percentunit",
                thresholds=steps(
                    (None, GREEN), (MEMORIZATION_WARN, ORANGE), (MEMORIZATION_BAD, RED)
                ),
                minimum=0,
                maximum=1,
                show_thresholds=True,
            ),
            Panel(
                "General-text perplexity ratio",
                "timeseries",
                [t(f"kubetune_general_perplexity_ratio{{{SEL}}}")],
                description="Perplexity on general English text divided by the base model's: "
                "above 1 the model is forgetting general ability.",
                thresholds=steps(
                    (None, GREEN), (GENERAL_RATIO_WARN, ORANGE), (GENERAL_RATIO_BAD, RED)
                ),
                decimals=3,
                show_thresholds=True,
            ),
            Panel(
                "General-text perplexity",
                "timeseries",
                [
                    t(f"kubetune_general_perplexity{{{SEL}}}", "{{finetunejob}} fine-tuned"),
                    t(f"kubetune_general_perplexity_base{{{SEL}}}", "{{finetunejob}} base"),
                ],
                description="Perplexity on general text, now and of the base model.",
                decimals=2,
            ),
        ],
    ),
    Row(
        "Training data",
        [
            Panel(
                "Training-data perplexity (base model)",
                "stat",
                [t(f"kubetune_data_perplexity_base{{{SEL}}}")],
                description="Mean perplexity of the training targets under the base model: "
                "how unfamiliar the data is before fine-tuning.",
                decimals=2,
                width=12,
                height=5,
            ),
            Panel(
                "High-perplexity token share",
                "stat",
                [t(f"kubetune_data_high_perplexity_token_ratio{{{SEL}}}")],
                description="Share of training target tokens the base model finds very "
                "surprising (noise, encoding damage, another language).",
                unit="percentunit",
                thresholds=steps(
                    (None, GREEN), (HIGH_PPL_TOKENS_WARN, ORANGE), (HIGH_PPL_TOKENS_BAD, RED)
                ),
                width=12,
                height=5,
            ),
        ],
    ),
    Row(
        "Throughput and GPU",
        [
            Panel(
                "Tokens per second",
                "timeseries",
                [t(f"kubetune_tokens_per_second{{{SEL}}}")],
                description="Training tokens per second, all ranks together.",
                unit="short",
                width=6,
            ),
            Panel(
                "GPU memory (rank 0)",
                "timeseries",
                [
                    t(
                        f"kubetune_gpu_memory_allocated_bytes{{{SEL}}}",
                        "{{finetunejob}} allocated",
                    ),
                    t(f"kubetune_gpu_memory_peak_bytes{{{SEL}}}", "{{finetunejob}} peak"),
                ],
                description="Memory allocated by PyTorch on rank 0's GPU, and its peak.",
                unit="bytes",
                width=6,
            ),
            Panel(
                "Time spent in probes",
                "timeseries",
                [
                    t(
                        f"sum by (finetunejob, probe) "
                        f"(rate(kubetune_probe_seconds_total{{{SEL}}}[$__rate_interval]))",
                        "{{finetunejob}} {{probe}}",
                    )
                ],
                description="Share of wall time the memorisation, forgetting and data probes take.",
                unit="percentunit",
                width=6,
            ),
            Panel(
                "Learning rate and gradient norm",
                "timeseries",
                [
                    t(f"kubetune_learning_rate{{{SEL}}}", "{{finetunejob}} learning rate"),
                    t(f"kubetune_grad_norm{{{SEL}}}", "{{finetunejob}} grad norm"),
                ],
                description="The scheduled learning rate and the gradient norm before "
                "clipping; a spiking norm precedes divergence.",
                unit="short",
                width=6,
            ),
        ],
    ),
    Row(
        "Progress",
        [
            Panel(
                "Progress",
                "gauge",
                [t(f"kubetune_progress_ratio{{{SEL}}}")],
                description="Optimizer steps done / planned.",
                unit="percentunit",
                minimum=0,
                maximum=1,
                thresholds=steps((None, BLUE)),
                width=6,
                height=6,
            ),
            Panel(
                "ETA",
                "stat",
                [t(f"kubetune_eta_seconds{{{SEL}}}")],
                description="Estimated time to the last planned step.",
                unit="s",
                width=6,
                height=6,
            ),
            Panel(
                "Steps",
                "timeseries",
                [
                    t(f"kubetune_step{{{SEL}}}", "{{finetunejob}} step"),
                    t(f"kubetune_total_steps{{{SEL}}}", "{{finetunejob}} planned"),
                ],
                description="Optimizer steps done and planned.",
                width=6,
                height=6,
            ),
            Panel(
                "Epoch",
                "stat",
                [t(f"kubetune_epoch{{{SEL}}}")],
                description="Epochs done (fractional).",
                decimals=2,
                width=6,
                height=6,
            ),
        ],
    ),
    Row(
        "Early stopping",
        [
            Panel(
                "Early-stop decision (trainer)",
                "state-timeline",
                [t(f"kubetune_early_stop{{{SEL}}} == 1", "{{finetunejob}}: {{reason}}")],
                description="The reason rank 0 stopped the run early (NoImprovement, "
                "Overfitting, OverMemorization, LossGapExceeded, PerplexityExceeded, "
                "MemorizationExceeded, ForgettingExceeded, Diverged), while its last scrape "
                "is visible.",
                thresholds=steps((None, RED)),
                width=12,
                height=6,
            ),
            Panel(
                "Early stops recorded by the operator",
                "bargauge",
                [
                    t(
                        "sum by (reason) (kubetune_operator_early_stops_total)",
                        "{{reason}}",
                        instant=True,
                    )
                ],
                description="FineTuneJobs the operator marked EarlyStopped, by reason, since "
                "the operator started (all namespaces).",
                thresholds=steps((None, ORANGE)),
                width=12,
                height=6,
            ),
        ],
    ),
    Row(
        "Operator",
        [
            Panel(
                "Reconciles",
                "timeseries",
                [
                    t(
                        "sum by (result) "
                        "(rate(kubetune_operator_reconciles_total[$__rate_interval]))",
                        "{{result}}",
                    )
                ],
                description="Reconciles per second, by result.",
                unit="ops",
                width=6,
            ),
            Panel(
                "Reconcile errors",
                "timeseries",
                [
                    t(
                        "sum(rate(kubetune_operator_reconcile_errors_total[$__rate_interval]))",
                        "errors",
                    )
                ],
                description="Reconciles that raised (Kopf retries them with backoff).",
                unit="ops",
                thresholds=steps((None, GREEN), (0.01, RED)),
                show_thresholds=True,
                width=6,
            ),
            Panel(
                "Reconcile latency",
                "timeseries",
                [
                    t(
                        f"histogram_quantile({q}, sum by (le) "
                        "(rate(kubetune_operator_reconcile_duration_seconds_bucket"
                        "[$__rate_interval])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
                description="Time one reconcile takes (quantiles).",
                unit="s",
                thresholds=steps(
                    (None, GREEN), (RECONCILE_SECONDS_WARN, ORANGE), (RECONCILE_SECONDS_BAD, RED)
                ),
                show_thresholds=True,
                width=6,
            ),
            Panel(
                "Jobs by state",
                "timeseries",
                [t("sum by (state) (kubetune_operator_jobs)", "{{state}}")],
                description="FineTuneJobs this operator has reconciled, by state.",
                unit="short",
                width=6,
            ),
            Panel(
                "API requests",
                "timeseries",
                [
                    t(
                        "sum(rate(kubetune_operator_api_requests_total[$__rate_interval]))",
                        "requests",
                    )
                ],
                description="Kubernetes API requests made by reconciles, per second.",
                unit="reqps",
                width=24,
                height=6,
            ),
        ],
    ),
]

# Grafana annotations: an early stop marks the time series of every panel.
ANNOTATIONS = [
    {
        "name": "Early stops",
        "expr": f"kubetune_early_stop{{{SEL}}} == 1",
        "title": "Early stop: {{reason}}",
        "text": "{{finetunejob}} stopped early: {{reason}}",
        "color": RED,
    },
]


def _thresholds(panel: Panel) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": c, "value": v} for v, c in panel.thresholds],
    }


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": _thresholds(panel)}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 2,
            "showPoints": "auto",
            "spanNulls": True,
            "thresholdsStyle": {"mode": "line+area" if panel.show_thresholds else "off"},
        }
    options: dict[str, Any] = {}
    if panel.kind in ("stat", "gauge", "bargauge"):
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    if panel.kind == "timeseries":
        options = {"legend": {"displayMode": "list", "placement": "bottom"}}
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": tg.expr,
            "legendFormat": tg.legend,
            "instant": tg.instant,
            "range": not tg.instant,
            "refId": chr(ord("A") + i),
        }
        for i, tg in enumerate(panel.targets)
    ]
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        out["transformations"] = [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "__name__": True, "Value": True}},
            }
        ]
    return out


def _variable(name: str, label: str, query: str, multi: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-query"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "allValue": ".*" if multi else None,
        "current": {},
        "options": [],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(panel, pid, x, y))
            pid, x, row_h = pid + 1, x + panel.width, max(row_h, panel.height)
        y += row_h
    return {
        "title": "kubetune: fine-tuning jobs",
        "uid": "kubetune-jobs",
        "description": "FineTuneJobs: loss, overfitting, memorisation, forgetting, data "
        "perplexity, throughput, progress, early stops, and the operator's health.",
        "tags": ["kubetune", "fine-tuning"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable(
                    "namespace", "Namespace", "label_values(kubetune_step, namespace)", False
                ),
                _variable(
                    "job",
                    "FineTuneJob",
                    'label_values(kubetune_step{namespace="$namespace"}, finetunejob)',
                    True,
                ),
            ]
        },
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                *[
                    {
                        "datasource": DATASOURCE,
                        "enable": True,
                        "expr": a["expr"],
                        "iconColor": a["color"],
                        "name": a["name"],
                        "titleFormat": a["title"],
                        "textFormat": a["text"],
                        "step": "30s",
                        "useValueForTime": False,
                    }
                    for a in ANNOTATIONS
                ],
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python charts/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
