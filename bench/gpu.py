"""GPU throughput (issue 7, item 4): tokens/s, MFU and peak memory, ~1B Llama.

Full fine-tuning and LoRA of a Llama-shaped model of 1.1B parameters (TinyLlama's shape,
random weights), bf16, SDPA attention (PyTorch picks its flash kernel on Hopper), the
micro-batch and gradient checkpointing the planner plans for one GPU of this size, through
the trainer's own pieces (bench/_train.py). A second row per method with a larger
micro-batch shows how far batch size alone moves the figure.

MFU = model FLOPs per token x tokens/s / the GPU's dense bf16 peak, with the model FLOPs
per token of PaLM (Chowdhery et al. 2022, appendix B), recomputation not counted:

* Full: ``6 N + 12 L h s`` (forward 2N, backward 4N; attention scores 12 L h s),
* LoRA: ``4 N + 6 N_lora + 12 L h s`` (the frozen weights need no weight gradients, so
  their backward is 2N for the input gradients only; the adapters cost 6 per parameter).

    .venv/bin/python bench/gpu.py            # on a GPU (about a minute on an H200)
    .venv/bin/python bench/gpu.py --smoke    # CPU, a tiny model, so the script cannot rot
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import header, record
from kubetune.planning import (
    GIB,
    DatasetStats,
    Method,
    PlanRequest,
    Resources,
    make_plan,
    model_arch_from_config,
)

#: Dense bf16 peak (no sparsity) by device name, from the vendors' datasheets.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
MFU_GOAL = 0.45


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(cfg: dict[str, Any], method: Method, seq_len: int, lora_params: int) -> float:
    arch = model_arch_from_config(cfg, origin="bench")
    n = arch.total_parameters
    attention = 12 * arch.num_layers * arch.hidden_size * seq_len
    if method is Method.FULL:
        return float(6 * n + attention)
    return float(4 * n + 6 * lora_params + attention)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--steps", type=int, default=13, help="steps per run (first 3 are warm-up)")
    args = ap.parse_args(argv)

    import torch

    from bench._train import LLAMA_SIZES, TINY_LLAMA, Case, gib, plan_for, run_case

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("No GPU: run with --smoke on a CPU.", file=sys.stderr)
        return 2
    warmup = 1 if args.smoke else 3
    steps = 2 if args.smoke else max(args.steps, warmup + 2)
    if args.smoke:
        name, cfg, seq, device_gib, accel = "tiny-llama", TINY_LLAMA, 64, 4.0, "CPU"
        peak = None
        device = "CPU"
    else:
        name, cfg, seq, accel = "llama-1.1b", LLAMA_SIZES["llama-1.1b"], 2048, "GPU"
        device = torch.cuda.get_device_name(0)
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        peak = peak_flops(device)

    lines = [
        f"Model {name} (random weights), sequence {seq:,}, {steps} steps per run of which "
        f"the first {warmup} are warm-up; tokens/s from the median of the others (each step "
        "timed between CUDA synchronisations). Device: "
        + device
        + (f", MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else ", no known peak")
        + ".",
        "",
        "| method | micro-batch | GC | ZeRO | trainable | step s (median) | tokens/s "
        "| model TFLOP/s | MFU | peak alloc GiB | peak reserved GiB | planned per-GPU GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full_mfu: float | None = None
    for method in (Method.FULL, Method.LORA):
        # The planner's own micro-batch for this job: ask with none given.
        own = make_plan(
            DatasetStats(100_000, 100_000 * seq, seq),
            model_arch_from_config(cfg, origin=name, name=name),
            Resources(1, device_gib, accelerator="GPU" if accel == "GPU" else "CPU"),
            PlanRequest(method=method, max_seq_length=seq, lora_rank=16),
        )
        mb = own.hyperparameters.micro_batch_size
        for micro in (mb, 4 * mb) if not args.smoke else (mb,):
            case = Case(name, cfg, method, 0, seq, micro, None, 16, steps)
            plan = plan_for(case, device_gib, accel)
            if not plan.fits:
                lines.append(f"| {method} | {micro} | - | - | - | plan does not fit | | | | | | |")
                continue
            r = run_case(case, plan.to_dict())
            if r.error or r.oom or len(r.step_seconds) < steps:
                lines.append(f"| {method} | {micro} | | | | failed: {r.error} | | | | | | |")
                if args.smoke:
                    raise SystemExit(f"smoke run failed: {r}")
                continue
            median = statistics.median(r.step_seconds[warmup:])
            tokens_s = micro * seq / median
            lora = r.trainable if method is Method.LORA else 0
            achieved = flops_per_token(cfg, method, seq, lora) * tokens_s
            mfu = achieved / peak if peak else None
            if method is Method.FULL and micro == mb and mfu is not None:
                full_mfu = mfu
            lines.append(
                f"| {method} | {micro} | {'yes' if r.gradient_checkpointing else 'no'} "
                f"| {plan.zero_stage} | {r.trainable:,} | {median:.4f} | {tokens_s:,.0f} "
                f"| {achieved / 1e12:.1f} | {f'{mfu:.1%}' if mfu is not None else '-'} "
                f"| {gib(r.peak_allocated)} | {gib(r.peak_reserved)} "
                f"| {gib(plan.memory.per_gpu)} |"
            )
            print(lines[-1], flush=True)
    lines.append(
        "\nMFU counts model FLOPs only (no recomputation): Full `6N + 12·L·h·s` per token, "
        "LoRA `4N + 6·N_lora + 12·L·h·s`. The first row per method is the plan's own "
        "micro-batch. Goal: MFU >= 45% for full fine-tuning at the planned settings: "
        + (
            "not measured (no GPU)."
            if full_mfu is None
            else f"{'**met**' if full_mfu >= MFU_GOAL else '**missed**'} ({full_mfu:.1%})."
        )
    )
    title = "GPU throughput (bench/gpu.py)" + (" (smoke)" if args.smoke else "")
    record(header(title) + "\n" + "\n".join(lines), enabled=not (args.smoke or args.no_record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
