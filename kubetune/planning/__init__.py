"""Pure, torch-free planning: the model's shapes, the memory model and the Plan.

``make_plan(dataset, model, resources, request)`` decides the fine-tuning method, the ZeRO
stage and offload, and the hyperparameters, and says why in ``Plan.reasons``. The rules and
the sources of the memory formulas are in ``docs/planning.md``.
"""

from importlib.resources import files
from pathlib import Path

from kubetune.planning.hyperparameters import Hyperparameters
from kubetune.planning.inputs import DatasetStats, PlanRequest, Resources
from kubetune.planning.memory import (
    GIB,
    MemoryEstimate,
    ModelStateBytes,
    Offload,
    activation_bytes,
    deepspeed_comparable_model_states,
    estimate_memory,
    layer_activation_bytes,
    model_state_bytes,
    overhead_bytes,
)
from kubetune.planning.methods import (
    Method,
    MethodChoice,
    candidate_methods,
    lora_parameters,
    trainable_and_frozen,
)
from kubetune.planning.model import (
    SUPPORTED_FAMILIES,
    LinearShape,
    ModelArch,
    ModelConfigError,
    load_model_arch,
    model_arch_from_config,
)
from kubetune.planning.plan import SURPRISING_DATA_RATIO, Plan, make_plan, method_alternative


def architectures_dir() -> Path:
    """The directory of the bundled reference ``config.json`` files (``<name>.json``)."""
    return Path(str(files("kubetune.planning") / "architectures"))


def bundled_architectures() -> dict[str, Path]:
    """Bundled reference configs by name (``llama-2-7b``, ``gpt2``, ...)."""
    return {path.stem: path for path in sorted(architectures_dir().glob("*.json"))}


__all__ = [
    "GIB",
    "SUPPORTED_FAMILIES",
    "SURPRISING_DATA_RATIO",
    "DatasetStats",
    "Hyperparameters",
    "LinearShape",
    "MemoryEstimate",
    "Method",
    "MethodChoice",
    "ModelArch",
    "ModelConfigError",
    "ModelStateBytes",
    "Offload",
    "Plan",
    "PlanRequest",
    "Resources",
    "activation_bytes",
    "architectures_dir",
    "bundled_architectures",
    "candidate_methods",
    "deepspeed_comparable_model_states",
    "estimate_memory",
    "layer_activation_bytes",
    "load_model_arch",
    "lora_parameters",
    "make_plan",
    "method_alternative",
    "model_arch_from_config",
    "model_state_bytes",
    "overhead_bytes",
    "trainable_and_frozen",
]
