"""Plan documents for tests that need one without running the planner: a complete plan
(one CPU process, LoRA on a tiny Llama) deep-merged with a test's camelCase fields."""

from __future__ import annotations

from typing import Any

from kubetune.api.plan import REMEDY_NAMES, PlanDocument
from tests.unit.specs import merge

BASE: dict[str, Any] = {
    "method": "LoRA",
    "zeroStage": 0,
    "offload": "None",
    "trainableParameters": 81920,
    "totalParameters": 984192,
    "fits": True,
    "error": None,
    "model": {"name": "llama", "family": "llama"},
    "numNodes": 1,
    "gpusPerNode": 1,
    "memory": {
        "perGpuGiB": 0.28,
        "modelStatesGiB": 0.0,
        "activationsGiB": 0.02,
        "overheadGiB": 0.25,
        "gpuMemoryGiB": 8.0,
        "usableGiB": 7.2,
        "cpuPerNodeGiB": 0.01,
        "cpuMemoryGiB": None,
    },
    "hyperparameters": {
        "learningRate": 0.003,
        "epochs": 3,
        "microBatchSize": 8,
        "gradientAccumulationSteps": 1,
        "effectiveBatchSize": 8,
        "stepsPerEpoch": 38,
        "totalSteps": 114,
        "warmupSteps": 6,
        "evalSteps": 5,
        "weightDecay": 0.05,
        "dropout": 0.2,
        "maxGradNorm": 1.0,
        "sequenceLength": 64,
        "gradientCheckpointing": False,
        "lrScheduler": "cosine",
        "loraRank": 8,
        "loraAlpha": 16,
        "loraDropout": 0.2,
        "loraTargetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "trainableLayers": 1,
        "prefixTokens": 20,
    },
    "decisions": [{"key": "method", "value": "LoRA", "sentence": "Method by data size."}],
    "warnings": [],
    "exampleCount": 300,
    "tokenCount": 10930,
    "tokenCountEstimated": True,
}


def plan_document(remedies: dict[str, Any] | None = None, **fields: Any) -> PlanDocument:
    """The base plan with `fields` merged in; `remedies` names some remedies' settings and
    the others are Off (mode and state)."""
    data = merge(BASE, fields)
    if remedies is not None:
        off = {name: {"mode": "Off", "state": "Off"} for name in REMEDY_NAMES}
        data["remedies"] = merge(off, remedies)
    return PlanDocument.model_validate(data)
