"""The dashboard preview: charts/render_preview.py draws the committed snapshot of real range
queries (charts/kubetune/dashboards/preview-data.json, written by
tests/cluster/test_prometheus.py) into docs/dashboard-preview.png, and the snapshot holds
data for every panel of the dashboard as it is now."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"
SNAPSHOT = ROOT / "charts" / "kubetune" / "dashboards" / "preview-data.json"
PREVIEW = ROOT / "docs" / "dashboard-preview.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kubetune_render_preview", ROOT / "charts/render_preview.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_the_snapshot_has_data_for_every_dashboard_panel() -> None:
    board, snapshot = _load(DASHBOARD), _load(SNAPSHOT)
    panels = {p["id"]: p for p in snapshot["panels"]}
    missing = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        got = panels.get(panel["id"])
        if got is None or got["title"] != panel["title"]:
            missing.append(f"{panel['title']}: not in the snapshot (refresh it)")
            continue
        assert [t["refId"] for t in got["targets"]] == [t["refId"] for t in panel["targets"]]
        values = [v for t in got["targets"] for s in t["series"] for _, v in s["values"]]
        if not any(v is not None for v in values):
            missing.append(f"{panel['title']}: no data")
    assert missing == []
    names = [a["name"] for a in board["annotations"]["list"] if "expr" in a]
    assert [a["name"] for a in snapshot["annotations"]] == names
    assert all(a["series"] for a in snapshot["annotations"])
    assert snapshot["run"]["earlyStop"]
    assert SNAPSHOT.stat().st_size < 200_000  # kept small


def test_the_script_renders_the_committed_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    assert _module().main(["render_preview.py", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stat().st_size > 20_000
    assert PREVIEW.read_bytes()[:8] == PNG_SIGNATURE  # the committed one, linked from the docs


def test_values_and_legends_are_formatted_like_grafana() -> None:
    m = _module()
    assert m.format_value(0.054, "percentunit", None) == "5.4%"
    assert m.format_value(3 * 1024**2, "bytes", None) == "3.0 MiB"
    assert m.format_value(125.0, "s", None) == "2 min 5 s"
    assert m.format_value(0.02, "s", None) == "20 ms"
    assert m.format_value(None, "none", 2) == "No data"
    assert m.format_value(5.63397, "none", 4) == "5.6340"
    assert m.legend("{{finetunejob}} {{split}}", {"finetunejob": "g", "split": "train"}) == (
        "g train"
    )
    steps = [{"color": "green", "value": None}, {"color": "red", "value": 0.5}]
    assert m.threshold_color(0.7, steps) == m.COLORS["red"]
    assert m.threshold_color(0.1, steps) == m.COLORS["green"]
