"""A few real training steps through the trainer's own pieces, with memory and step times.

Shared by bench/memory_accuracy.py and bench/gpu.py. The model is a Llama built from a
config with random weights (memory and speed do not depend on the values); the method is
applied by ``kubetune.trainer.model.apply_method``, the DeepSpeed config comes from
``kubetune.trainer.dsconfig.deepspeed_config`` and the Hugging Face ``TrainingArguments``
mirror ``kubetune.trainer.recipe.run`` (DeepSpeed only when the plan's ZeRO stage is above 0
on one process, bf16 on a GPU, gradient checkpointing as planned and only on a GPU), minus
evaluation, checkpoints, metrics and the stop endpoint, which do not change the peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.plan import PlanDocument
from kubetune.planning import (
    GIB,
    DatasetStats,
    Method,
    Offload,
    Plan,
    PlanRequest,
    Resources,
    make_plan,
    model_arch_from_config,
)

#: Llama-shaped configs (``config.json`` keys) by name; vocabulary 32,000 as Llama 2.
LLAMA_BASE: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
}


def llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int = 32000
) -> dict[str, Any]:
    return {
        **LLAMA_BASE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
    }


#: About 0.55B, 1.1B (TinyLlama's shape), 3.4B (OpenLLaMA-3B's shape) and 8.0B (Llama-3-8B's
#: shape, its 128,256-token vocabulary included).
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "llama-0.5b": llama_config(1536, 4096, 16, 12, 4),
    "llama-1.1b": llama_config(2048, 5632, 22, 32, 4),
    "llama-3.4b": llama_config(3200, 8640, 26, 32, 32),
    "llama-8b": {
        **llama_config(4096, 14336, 32, 32, 8, vocab=128256),
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
}

TINY_LLAMA = llama_config(64, 172, 2, 4, 2, vocab=512)


@dataclass(frozen=True)
class Case:
    """One configuration to train: model, method, ZeRO stage and activation settings.

    ``gradient_checkpointing=None`` lets the planner choose, as it does for a real job.
    """

    model: str
    config: dict[str, Any]
    method: Method
    zero_stage: int
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool | None = None
    lora_rank: int = 16
    steps: int = 3
    #: Levers the throughput table measures: Liger's fused kernels (RMSNorm, RoPE, SwiGLU,
    #: fused linear cross-entropy) through ``TrainingArguments.use_liger_kernel``, and
    #: ``torch.compile`` through ``TrainingArguments.torch_compile``.
    liger: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        shape = f"mb{self.micro_batch}x{self.seq_len}"
        levers = "".join([" +liger" if self.liger else "", " +compile" if self.compile else ""])
        return f"{self.model} {self.method} ZeRO-{self.zero_stage} {shape}{levers}"


def plan_for(case: Case, gpu_memory_gib: float, accelerator: str = "GPU") -> Plan:
    """The planner's plan for exactly this case on one device (world size 1)."""
    arch = model_arch_from_config(case.config, origin=case.model, name=case.model)
    return make_plan(
        DatasetStats(
            example_count=100_000,
            token_count=100_000 * case.seq_len,
            max_tokens=case.seq_len,
        ),
        arch,
        Resources(
            gpus_per_node=1,
            gpu_memory_gib=gpu_memory_gib,
            accelerator="GPU" if accelerator == "GPU" else "CPU",
        ),
        PlanRequest(
            method=case.method,
            zero_stage=case.zero_stage,
            offload=Offload.NONE,
            gradient_checkpointing=case.gradient_checkpointing,
            micro_batch_size=case.micro_batch,
            max_seq_length=case.seq_len,
            lora_rank=case.lora_rank if case.method.is_lora else None,
        ),
    )


@dataclass
class RunResult:
    """What one run measured. Bytes are per device; ``step_seconds`` per optimizer step."""

    trainable: int = 0
    total: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    outside_allocator: int = 0
    baseline_allocated: int = 0
    steady_allocated: int = 0
    step_seconds: list[float] = field(default_factory=list)
    used_deepspeed: bool = False
    gradient_checkpointing: bool = False
    oom: bool = False
    error: str | None = None
    seconds: float = 0.0


def _distributed_env() -> None:
    """What torchrun would set for one process, so DeepSpeed can start its process group."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")


def _step_timer(sync: bool) -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list[float] = []
            self.steady = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if sync:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if sync:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)
            if sync:
                self.steady = torch.cuda.memory_allocated()

    return StepTimer()


class RandomTokens:
    """``count`` rows of ``seq_len`` random token ids (labels = inputs), full length."""

    def __init__(self, count: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (count, seq_len), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_case(case: Case, plan: dict[str, Any], *, deepspeed_on_cpu: bool = False) -> RunResult:
    """Build the model, apply the planned method and train ``case.steps`` steps.

    On a GPU the peak memory counters are reset after the model is built (its weights stay
    allocated, so they are in the peak), and the DeepSpeed engine's start is inside it.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from kubetune.trainer.data import Collator
    from kubetune.trainer.dsconfig import deepspeed_config
    from kubetune.trainer.model import apply_method, count_parameters, quantization_config
    from kubetune.trainer.setup import load_in_bf16

    result = RunResult()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    document = PlanDocument.model_validate(plan)
    hp = plan["hyperparameters"]
    # As the recipe: DeepSpeed for a ZeRO stage above 0 (one process here).
    use_ds = int(plan["zeroStage"]) > 0 and (cuda or deepspeed_on_cpu)
    result.used_deepspeed = use_ds
    result.gradient_checkpointing = bool(hp["gradientCheckpointing"]) and cuda
    if use_ds:
        _distributed_env()
    # A previous case's DeepSpeed config must not leak into this build.
    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        result.baseline_allocated = torch.cuda.memory_allocated()
    trainer: Any = None
    model: Any = None
    try:
        config = LlamaConfig(**{k: v for k, v in case.config.items() if k != "architectures"})
        dtype = torch.bfloat16 if load_in_bf16(document, bf16) else torch.float32
        quantised = quantization_config(document, cuda)
        if quantised is not None:
            model = _quantised_random_model(config, document, quantised, cuda)
        else:
            with torch.device("cuda" if cuda else "cpu"):
                model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                    config, dtype=dtype, attn_implementation="sdpa"
                )
        model = apply_method(model, document)
        result.trainable, result.total = count_parameters(model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = _step_timer(cuda)
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as out:
            args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=case.micro_batch,
                gradient_accumulation_steps=1,
                learning_rate=float(hp["learningRate"]),
                max_steps=case.steps,
                warmup_steps=0,
                weight_decay=float(hp["weightDecay"]),
                max_grad_norm=float(hp["maxGradNorm"]),
                lr_scheduler_type=str(hp["lrScheduler"]),
                gradient_checkpointing=result.gradient_checkpointing,
                eval_strategy="no",
                save_strategy="no",
                logging_steps=max(case.steps, 1),
                report_to=[],
                seed=0,
                bf16=bf16,
                use_cpu=not cuda,
                ddp_backend="gloo" if (use_ds and not cuda) else None,
                deepspeed=deepspeed_config(document, bf16=bf16) if use_ds else None,
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_num_workers=0,
                use_liger_kernel=case.liger,
                torch_compile=case.compile,
            )
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=RandomTokens(
                    case.steps * case.micro_batch, case.seq_len, int(config.vocab_size)
                ),
                data_collator=Collator(pad_id=0),
                callbacks=[timer],
            )
            trainer.train()
        result.step_seconds = list(timer.seconds)
        result.steady_allocated = int(timer.steady)
        if cuda:
            torch.cuda.synchronize()
            result.peak_allocated = torch.cuda.max_memory_allocated()
            result.peak_reserved = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            result.outside_allocator = max(0, (total - free) - torch.cuda.memory_reserved())
    except torch.cuda.OutOfMemoryError as exc:
        result.oom = True
        result.error = str(exc).splitlines()[0][:200]
        if cuda:
            result.peak_allocated = torch.cuda.max_memory_allocated()
            result.peak_reserved = torch.cuda.max_memory_reserved()
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        engine = getattr(trainer, "model_wrapped", None) if trainer is not None else None
        if use_ds and engine is not None and hasattr(engine, "destroy"):
            with contextlib.suppress(Exception):  # cleanup only
                engine.destroy()
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer, model
        unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - started
    return result


def _quantised_random_model(config: Any, document: PlanDocument, quantised: Any, cuda: bool) -> Any:
    """QLoRA's base as the trainer loads it: the random model saved as a bf16 checkpoint and
    loaded back in 4 bits (``kubetune.trainer.model.load_model``); the full-precision copy is
    freed before the peak counters are reset."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.model import compute_dtype, load_model

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-base-") as base:
        with torch.device("cuda" if cuda else "cpu"):
            full = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=torch.bfloat16, attn_implementation="sdpa"
            )
        full.save_pretrained(base)
        del full
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return load_model(base, dtype=compute_dtype(document), quantization=quantised)


def predicted_bytes(plan: Plan) -> tuple[int, int]:
    """(model states + activations, the per-GPU total with overhead) the plan predicts."""
    mem = plan.memory
    return mem.model_states + mem.activations, mem.per_gpu


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


#: The line a case's fresh process prints its RunResult on (JSON after the mark).
CASE_MARK = "CASE-RESULT "


def print_case_result(result: RunResult) -> None:
    print(CASE_MARK + json.dumps(dataclasses.asdict(result)), flush=True)


def run_in_fresh_process(
    script: Path, index: int, steps: int, timeout_s: float, extra: tuple[str, ...] = ()
) -> RunResult:
    """Run case ``index`` of ``script`` (``script --case I --steps N``) in a fresh process: a
    clean CUDA allocator, and no DeepSpeed, Accelerate or patched-kernel state left over
    from an earlier case (in one process, ZeRO-3 engines kept their memory and later ZeRO-0
    cases still ran through DeepSpeed; Liger patches the model classes it touches)."""
    cmd = [sys.executable, str(script), "--case", str(index), "--steps", str(steps), *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return RunResult(error=f"timed out after {timeout_s:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(CASE_MARK):
            return RunResult(**json.loads(line.removeprefix(CASE_MARK)))
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    oom = "OutOfMemoryError" in done.stderr
    return RunResult(oom=oom, error=f"exit {done.returncode}: {' / '.join(tail)[:300]}")
