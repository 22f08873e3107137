"""Rank 0's termination message stays under the kubelet's 4 KiB and keeps what the operator
needs most: a method switch survives (with its plan's short fields) before the warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.finish import write_termination
from tests.plans import plan_document

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path) -> TrainerConfig:
    return TrainerConfig(
        spec={},
        plan=plan_document(),
        model="m",
        dataset="d",
        output=tmp_path,
        termination_path=tmp_path / "termination.json",
    )


def test_a_long_message_keeps_the_method_switch_and_its_short_plan(tmp_path: Path) -> None:
    switch = {
        "kind": "method",
        "step": 0,
        "text": "Auto at training start: method Full instead of LoRA: surprising data.",
        "plan": {
            "method": "Full",
            "zeroStage": 2,
            "memory": {"perGpuGiB": 9.5},
            "hyperparameters": {f"k{i}": "x" * 40 for i in range(20)},
            "remedies": {f"r{i}": "y" * 40 for i in range(20)},
        },
    }
    payload = {
        "metrics": {f"m{i}": 1.0 for i in range(20)},
        "progress": {"step": 10},
        "output": "/out/final",
        "warnings": ["w" * 400] * 10,
        "decisions": [switch],
    }
    write_termination(_cfg(tmp_path), payload)
    text = (tmp_path / "termination.json").read_text()
    assert len(text.encode()) <= 3800
    data = json.loads(text)
    assert data["decisions"][0]["plan"] == {
        "method": "Full",
        "zeroStage": 2,
        "memory": {"perGpuGiB": 9.5},
    }
    assert data["metrics"]["m0"] == 1.0
    assert "warnings" not in data


def test_a_short_message_is_written_whole(tmp_path: Path) -> None:
    payload = {"metrics": {"evalLoss": 0.5}, "output": "/out/final"}
    write_termination(_cfg(tmp_path), payload)
    assert json.loads((tmp_path / "termination.json").read_text()) == payload


def test_the_progress_outlives_a_switchs_long_plan_and_the_warnings(tmp_path: Path) -> None:
    """status.progress comes from this message: a long plan in a decision is shortened, and
    the warnings go, before the progress does."""
    switch = {
        "kind": "steps",
        "step": 0,
        "text": "Steps at training start: 150 in all.",
        "plan": {"hyperparameters": {f"k{i}": "x" * 40 for i in range(60)}},
    }
    payload = {
        "metrics": {f"m{i}": 1.0 for i in range(20)},
        "progress": {"step": 150, "totalSteps": 150, "percentage": 100.0},
        "output": "/out/final",
        "warnings": ["w" * 300] * 3,
        "decisions": [switch],
    }
    write_termination(_cfg(tmp_path), payload)
    data = json.loads((tmp_path / "termination.json").read_text())
    assert data["progress"]["percentage"] == 100.0
    assert data["warnings"] == payload["warnings"]
    assert "hyperparameters" not in data["decisions"][0]["plan"]
