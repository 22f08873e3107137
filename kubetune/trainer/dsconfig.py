"""The DeepSpeed config dict for a plan (pure; no torch import)."""

from __future__ import annotations

from typing import Any

from kubetune.api.plan import PlanDocument


def deepspeed_config(plan: PlanDocument, *, bf16: bool) -> dict[str, Any]:
    """ZeRO stage and offload as planned; batch sizes, clipping and precision from the plan.

    `bf16` is decided by the caller from the device (GPUs that support it); CPU runs train
    in fp32. Values that HF Trainer fills from its own arguments are left as "auto" so the
    two never disagree.
    """
    stage, offload = plan.zero_stage, plan.offload
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            {
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": "auto",
            }
        )
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Gather the full weights when saving, so checkpoints load without DeepSpeed.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if offload in ("Optimizer", "OptimizerAndParameters") and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "OptimizerAndParameters" and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed insists on its compiled CPU Adam unless told otherwise; the
        # trainer's torch AdamW works everywhere (slower on the CPU side, but no compiler).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
