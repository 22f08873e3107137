"""Host memory for offload planning comes from spec.resources.resourcesPerNode."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.planning.job import host_memory_gib, quantity_value
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

BASE = {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "configmap://d/t.jsonl"}}


@pytest.mark.parametrize(
    ("quantity", "value"),
    [(8, 8.0), ("500m", 0.5), ("64Gi", 64 * 2**30), ("1536Mi", 1.5 * 2**30), ("2e3", 2000.0),
     ("1G", 1e9), ("1.5Ti", 1.5 * 2**40)],
)  # fmt: skip
def test_quantity_value(quantity: int | str, value: float) -> None:
    assert quantity_value(quantity) == pytest.approx(value)


@pytest.mark.parametrize(
    ("resources", "gib"),
    [
        ({}, None),
        ({"resourcesPerNode": {"requests": {"cpu": "8"}}}, None),
        ({"resourcesPerNode": {"requests": {"memory": "32Gi"}}}, 32.0),
        ({"resourcesPerNode": {"requests": {"memory": "32Gi"}, "limits": {"memory": "64Gi"}}}, 64),
        ({"resourcesPerNode": {"limits": {"memory": 0}}}, None),
    ],
)
def test_host_memory_from_resources_per_node(resources: dict[str, Any], gib: float | None) -> None:
    spec = spec_from(BASE, "x", "ns", resources=resources)
    assert host_memory_gib(spec) == gib
