"""The planner's model-state figures against DeepSpeed's own estimators (needs deepspeed).

For every bundled architecture, several GPU layouts and every offload setting, our figure
must be within 5% of ``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``. The same formulas are checked without DeepSpeed
in tests/unit/test_planning_memory.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kubetune.planning import (
    Offload,
    bundled_architectures,
    deepspeed_comparable_model_states,
    load_model_arch,
)

pytestmark = pytest.mark.trainer

TOLERANCE = 0.05
LAYOUTS = [(1, 1), (8, 1), (8, 2)]  # (GPUs per node, nodes): 1, 8 and 16 over 2 nodes
ARCHITECTURES = sorted(bundled_architectures())


def _estimator(module: str, name: str) -> Callable[..., Any]:
    import importlib

    # A plain import: the trainer tier installs DeepSpeed, so a missing one is a failure.
    found: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return found


def _close(ours: int, theirs: int) -> bool:
    return abs(ours - theirs) <= TOLERANCE * max(theirs, 1)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize(("gpn", "nodes"), LAYOUTS)
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_zero2_agrees_with_deepspeed(name: str, gpn: int, nodes: int, cpu_offload: bool) -> None:
    estimate = _estimator(
        "deepspeed.runtime.zero.stage_1_and_2", "estimate_zero2_model_states_mem_needs"
    )
    arch = load_model_arch(bundled_architectures()[name])
    p = arch.total_parameters
    ds_cpu, ds_gpu = estimate(
        total_params=p,
        num_gpus_per_node=gpn,
        num_nodes=nodes,
        cpu_offload=cpu_offload,
        additional_buffer_factor=1.5,
    )
    offload = Offload.OPTIMIZER if cpu_offload else Offload.NONE
    ours = deepspeed_comparable_model_states(
        p, arch.largest_layer_parameters, 2, offload, gpn, nodes
    )
    assert _close(ours.gpu, ds_gpu), (ours.gpu, ds_gpu)
    if cpu_offload and nodes > 1:
        # DeepSpeed's ZeRO-2 offload branch sizes the per-node host memory with the total
        # GPU count (max(4 * total_gpus, 16)); its other branches, and ZeRO-3, use the GPUs
        # of one node, which is what we do. Only one node's ranks load the model on a node,
        # so ours is the lower figure here.
        assert ours.cpu <= ds_cpu
    else:
        assert _close(ours.cpu, ds_cpu), (ours.cpu, ds_cpu)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize(("gpn", "nodes"), LAYOUTS)
@pytest.mark.parametrize(
    ("cpu_offload", "cpu_offload_params"), [(False, False), (True, False), (True, True)]
)
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero3_agrees_with_deepspeed(
    name: str,
    gpn: int,
    nodes: int,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
) -> None:
    estimate = _estimator("deepspeed.runtime.zero.stage3", "estimate_zero3_model_states_mem_needs")
    arch = load_model_arch(bundled_architectures()[name])
    p, largest = arch.total_parameters, arch.largest_layer_parameters
    ds_cpu, ds_gpu, _ = estimate(
        total_params=p,
        largest_layer_params=largest,
        num_gpus_per_node=gpn,
        num_nodes=nodes,
        cpu_offload=cpu_offload,
        cpu_offload_params=cpu_offload_params,
        zero_init=zero_init,
        additional_buffer_factor=1.5,
    )
    if cpu_offload_params:
        offload = Offload.OPTIMIZER_AND_PARAMETERS
    elif cpu_offload:
        offload = Offload.OPTIMIZER
    else:
        offload = Offload.NONE
    ours = deepspeed_comparable_model_states(p, largest, 3, offload, gpn, nodes, zero_init)
    assert _close(ours.gpu, ds_gpu), (ours.gpu, ds_gpu)
    assert _close(ours.cpu, ds_cpu), (ours.cpu, ds_cpu)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_estimators_inputs_are_deepspeeds_measure_of_the_built_model(name: str) -> None:
    """The two figures fed to the estimators above are what DeepSpeed's ``model_to_params``
    measures on the model transformers builds from the same config (on the meta device, so
    no weights are allocated; ``parameters()`` counts a tied weight once, as DeepSpeed's
    ``data_ptr`` dedup does, which cannot run on meta tensors): the unique parameters and
    the largest module's own parameters."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = bundled_architectures()[name]
    fields = json.loads(path.read_text())
    config = AutoConfig.for_model(
        **{k: v for k, v in fields.items() if k not in ("_name_or_path", "architectures")}
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    arch = load_model_arch(path)
    assert (arch.total_parameters, arch.largest_layer_parameters) == (total, largest)
