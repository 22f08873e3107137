"""SAM's cost for the plan: two forward and backward passes a micro-batch, and the memory of
one more copy of each trained weight (plus a gradient buffer under accumulation)."""

from __future__ import annotations

import pytest

from kubetune.planning.remedies import sam_cost_sentence, sam_extra_bytes

pytestmark = pytest.mark.unit


def test_extra_bytes_is_four_per_trained_weight() -> None:
    assert sam_extra_bytes(0) == 0
    assert sam_extra_bytes(1_000) == 4_000
    assert sam_extra_bytes(-5) == 0
    assert sam_extra_bytes(1_000, gradient_accumulation_steps=1) == 4_000
    assert sam_extra_bytes(1_000, gradient_accumulation_steps=4) == 8_000


def test_cost_sentence_states_rho_compute_and_memory() -> None:
    s = sam_cost_sentence(0.05)
    assert "rho 0.05" in s
    assert "two forward and backward passes" in s
    assert "2x" in s
    assert "4 bytes" in s
    assert "GiB" not in s
    sized = sam_cost_sentence(0.1, trainable_parameters=2**30)
    assert "rho 0.1" in sized
    assert "4.00 GiB per process" in sized
    assert sized.endswith(".")
