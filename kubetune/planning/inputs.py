"""The planner's inputs: what the data holds, the hardware, and what the user asked for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune.planning.memory import Offload, check_zero_config
from kubetune.planning.methods import Method, MethodSettings
from kubetune.planning.quantization import qlora_setting_problem
from kubetune.planning.thresholds import DEFAULT_SAFETY_MARGIN


@dataclass(frozen=True)
class DatasetStats:
    """What the prepare step measured on the training data.

    ``example_count`` and ``token_count`` are for the examples that will be trained on
    (after any held-out split); ``max_tokens`` is the longest one. ``duplicate_count`` counts
    repeated training examples, ``leakage_count`` validation examples that also occur in
    training, ``overlong_count`` examples longer than the length limit the data step used.
    ``tokens_estimated`` is true when tokens were estimated from the text (no tokenizer).
    ``overlong_example`` names the first over-long example (its source line and length).
    """

    example_count: int
    token_count: int
    max_tokens: int
    validation_count: int = 0
    duplicate_count: int = 0
    leakage_count: int = 0
    overlong_count: int = 0
    tokens_estimated: bool = False
    overlong_example: str = ""
    estimate_reason: str = ""
    """Why the tokens were estimated (no tokenizer, and where it was looked for)."""
    quality_note: str = ""
    """What the duplicate and leakage search found, when it found nothing to name
    (`kubetune.planning.job.quality_decisions` names what it found)."""

    def __post_init__(self) -> None:
        if self.example_count < 1:
            raise ValueError("the dataset has no training examples")
        if self.token_count < self.example_count or self.max_tokens < 1:
            raise ValueError("token counts must be positive (at least one token per example)")
        for name in ("validation_count", "duplicate_count", "leakage_count", "overlong_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def mean_tokens(self) -> float:
        return self.token_count / self.example_count


@dataclass(frozen=True)
class Resources:
    """The hardware: ``gpus_per_node`` devices of ``gpu_memory_gib`` on ``num_nodes`` nodes.

    ``cpu_memory_gib`` is host memory per node available to offload; when it is unknown the
    planner does not plan offload on its own. ``accelerator="CPU"`` plans local CPU
    processes, ``gpu_memory_gib`` then being each process's share of RAM.
    """

    gpus_per_node: int = 1
    gpu_memory_gib: float = 80.0
    num_nodes: int = 1
    cpu_memory_gib: float | None = None
    accelerator: Literal["GPU", "CPU"] = "GPU"

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.num_nodes < 1:
            raise ValueError("need at least one device on at least one node")
        if self.gpu_memory_gib <= 0:
            raise ValueError("device memory must be positive")
        if self.cpu_memory_gib is not None and self.cpu_memory_gib <= 0:
            raise ValueError("host memory must be positive")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; ``None`` means "decide".

    The method settings (``lora_*``, ``prefix_tokens``, ``partial_*``) apply when the
    planner ends up with that method, whether it was requested or chosen.
    """

    method: Method | None = None
    incremental: bool = False
    """The base model is already fine-tuned; this run updates it (lower learning rate)."""
    max_seq_length: int | None = None
    zero_stage: int | None = None
    offload: Offload | None = None
    gradient_checkpointing: bool | None = None
    micro_batch_size: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    flash_attention: bool = True
    zero_init: bool = True
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    """Module names to adapt; ``None`` (or empty) means every linear layer of the blocks."""
    lora_use_dora: bool = False
    """DoRA adapters (LoRA and QLoRA): a trained magnitude per output feature as well."""
    prefix_tokens: int | None = None
    partial_layers: int | None = None
    """Partial: the number of top decoder layers to train."""
    partial_fraction: float | None = None
    """Partial: the share of the decoder layers to train, rounded up (not with the count)."""

    def __post_init__(self) -> None:
        if self.method is not None:
            object.__setattr__(self, "method", Method(self.method))
        if self.offload is not None:
            object.__setattr__(self, "offload", Offload(self.offload))
        if self.lora_target_modules is not None:  # a tuple; empty means the default
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules) or None)
        if self.zero_stage is not None:
            check_zero_config(self.zero_stage, self.offload or Offload.NONE)
        if self.method is Method.QLORA:
            problem = qlora_setting_problem(self.zero_stage, self.offload)
            if problem is not None:
                raise ValueError(f"{problem[0]}: {problem[1]}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= 512:
            raise ValueError("micro-batch size must be between 1 and 512")
        for name in ("max_seq_length", "epochs", "lora_rank", "lora_alpha", "prefix_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise ValueError("learning rate must be in (0, 1)")
        if not 0 <= self.safety_margin < 1:
            raise ValueError("safety margin must be in [0, 1)")
        self._check_method_settings()

    def _check_method_settings(self) -> None:
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ValueError("LoRA dropout must be in [0, 1)")
        if self.partial_layers is not None and self.partial_layers < 1:
            raise ValueError("partial_layers must be positive")
        if self.partial_fraction is not None and not 0 < self.partial_fraction <= 1:
            raise ValueError("partial fraction must be in (0, 1]")
        if self.partial_layers is not None and self.partial_fraction is not None:
            raise ValueError("set partial_layers or partial_fraction, not both")

    @property
    def method_settings(self) -> MethodSettings:
        """The size knobs for each method, as the method choice takes them."""
        return MethodSettings(
            lora_rank=self.lora_rank,
            lora_target_modules=self.lora_target_modules,
            lora_use_dora=self.lora_use_dora,
            prefix_tokens=self.prefix_tokens,
            partial_layers=self.partial_layers,
            partial_fraction=self.partial_fraction,
        )
