"""GPU throughput (issues 7 and 20): tokens/s, MFU and peak memory, ~1B Llama, per lever.

Full fine-tuning and LoRA of a Llama-shaped model of 1.1B parameters (TinyLlama's shape,
random weights), bf16, SDPA attention (PyTorch picks its flash kernel on Hopper), through
the trainer's own pieces (bench/_train.py). The rows, side by side in one run, each in a
fresh process: micro-batch 2 (what the planner chose before it searched down from 16k
tokens on a GPU), the plan's own settings, and one lever at a time on top of them:
DeepSpeed ZeRO-1 (its bf16 optimizer: bf16 weights with fp32 masters in the optimizer,
instead of fp32 weights under autocast), Liger's fused kernels (RMSNorm, RoPE, SwiGLU and
the fused linear cross-entropy, which never materialises the logits), and torch.compile.

MFU = model FLOPs per token x tokens/s / the GPU's dense bf16 peak, with the model FLOPs
per token of PaLM (Chowdhery et al. 2022, appendix B), recomputation not counted:

* Full: ``6 N + 12 L h s`` (forward 2N, backward 4N; attention scores 12 L h s),
* LoRA: ``4 N + 6 N_lora + 12 L h s`` (the frozen weights need no weight gradients, so
  their backward is 2N for the input gradients only; the adapters cost 6 per parameter).

    .venv/bin/python bench/gpu.py            # on a GPU (about 3 minutes on an H200)
    .venv/bin/python bench/gpu.py --smoke    # CPU, a tiny model, so the script cannot rot
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

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


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the lever table: what it changes against the row above, and the case."""

    setting: str
    case: Any  # bench._train.Case


def rows(smoke: bool, steps: int, device_gib: float) -> list[Row]:
    """Full fine-tuning and LoRA of the ~1.1B Llama, each lever on top of the plan's own
    settings. The levers that patch the model (Liger) come last: each row runs in a fresh
    process anyway, so nothing carries over."""
    from bench._train import LLAMA_SIZES, TINY_LLAMA, Case

    name, cfg, seq = (
        ("tiny-llama", TINY_LLAMA, 64) if smoke else ("llama-1.1b", LLAMA_SIZES["llama-1.1b"], 2048)
    )
    accel: Literal["GPU", "CPU"] = "CPU" if smoke else "GPU"
    out: list[Row] = []
    last: list[Row] = []
    for method in (Method.FULL, Method.LORA):
        # The planner's own micro-batch for this job: ask with none given.
        own = make_plan(
            DatasetStats(100_000, 100_000 * seq, seq),
            model_arch_from_config(cfg, origin=name, name=name),
            Resources(1, device_gib, accelerator=accel),
            PlanRequest(method=method, max_seq_length=seq, lora_rank=16),
        )
        mb = own.hyperparameters.micro_batch_size
        gc = own.hyperparameters.gradient_checkpointing

        def case(
            micro: int, stage: int = 0, method: Method = method, gc: bool = gc, **levers: bool
        ) -> Any:
            return Case(name, cfg, method, stage, seq, micro, gc, 16, steps, **levers)

        if smoke:
            out.append(Row("plan's own", case(mb)))
            continue
        out.append(Row("micro-batch 2 (4k tokens: the planner before)", case(2)))
        out.append(Row("plan's own", case(mb)))
        if method is Method.FULL:
            out.append(Row("+ ZeRO-1 (DeepSpeed's bf16 optimizer, bf16 weights)", case(mb, 1)))
        out.append(Row("+ Liger kernels", case(mb, liger=True)))
        if method is Method.FULL:
            out.append(Row("+ ZeRO-1 + Liger kernels", case(mb, 1, liger=True)))
            # Compilation takes the longest: last, where the budget may cut it.
            last.append(Row("+ Liger kernels + torch.compile", case(mb, liger=True, compile=True)))
    return out + last


def one_row(index: int, steps: int, smoke: bool) -> int:
    """``--case I``: row I in this (fresh) process; prints its RunResult."""
    import torch

    from bench._train import plan_for, print_case_result, run_case

    cuda = torch.cuda.is_available()
    device_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 4.0
    row = rows(smoke, steps, device_gib)[index]
    plan = plan_for(row.case, device_gib, "GPU" if cuda else "CPU")
    print_case_result(run_case(row.case, plan.to_dict(), deepspeed_on_cpu=smoke))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (first 3 are warm-up)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="rows start only within it")
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warmup = 1 if args.smoke else 3
    steps = 2 if args.smoke else max(args.steps, warmup + 2)
    if args.case is not None:
        return one_row(args.case, steps, args.smoke)

    import torch

    from bench._train import gib, plan_for, run_in_fresh_process

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("No GPU: run with --smoke on a CPU.", file=sys.stderr)
        return 2
    if args.smoke:
        device, device_gib, peak = "CPU", 4.0, None
    else:
        device = torch.cuda.get_device_name(0)
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        peak = peak_flops(device)
    table = rows(args.smoke, steps, device_gib)
    first = table[0].case
    lines = [
        f"Model {first.model} (random weights), sequence {first.seq_len:,}, {steps} steps per "
        f"run of which the first {warmup} are warm-up; tokens/s from the median of the others "
        "(each step timed between CUDA synchronisations); each row in a fresh process. "
        "Device: "
        + device
        + (f", MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else ", no known peak")
        + ".",
        "",
        "| method | setting | micro-batch | GC | ZeRO | trainable | step s (median) | tokens/s "
        "| model TFLOP/s | MFU | peak alloc GiB | peak reserved GiB | planned per-GPU GiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    own_mfu: float | None = None
    best: tuple[float, str] | None = None
    started = time.perf_counter()
    for index, row in enumerate(table):
        case = row.case
        head = f"| {case.method} | {row.setting} | {case.micro_batch}"
        plan = plan_for(case, device_gib, "GPU" if cuda else "CPU")
        if not plan.fits:
            lines.append(f"{head} | - | - | - | plan does not fit | | | | | | |")
            continue
        if time.perf_counter() - started > args.budget_s:
            lines.append(
                f"{head} | - | - | - | skipped: budget ({args.budget_s:.0f} s) | | | | | | |"
            )
            continue
        extra = ("--smoke",) if args.smoke else ()
        # A row may run a minute past the budget (compilation, a slow start), no more.
        left = args.budget_s + 60.0 - (time.perf_counter() - started)
        r = run_in_fresh_process(Path(__file__), index, steps, max(60.0, left), extra)
        if r.error or r.oom or len(r.step_seconds) < steps:
            lines.append(f"{head} | | | | failed: {r.error} | | | | | | |")
            print(lines[-1], flush=True)
            if args.smoke:
                raise SystemExit(f"smoke run failed: {r}")
            continue
        median = statistics.median(r.step_seconds[warmup:])
        tokens_s = case.micro_batch * case.seq_len / median
        lora = r.trainable if case.method is Method.LORA else 0
        achieved = flops_per_token(case.config, case.method, case.seq_len, lora) * tokens_s
        mfu = achieved / peak if peak else None
        if case.method is Method.FULL and row.setting == "plan's own" and mfu is not None:
            own_mfu = mfu
        if case.method is Method.FULL and mfu is not None and (best is None or mfu > best[0]):
            best = (mfu, row.setting)
        lines.append(
            f"{head} | {'yes' if r.gradient_checkpointing else 'no'} "
            f"| {plan.zero_stage} | {r.trainable:,} | {median:.4f} | {tokens_s:,.0f} "
            f"| {achieved / 1e12:.1f} | {f'{mfu:.1%}' if mfu is not None else '-'} "
            f"| {gib(r.peak_allocated)} | {gib(r.peak_reserved)} "
            f"| {gib(plan.memory.per_gpu)} |"
        )
        print(lines[-1], flush=True)
    verdict = "not measured (no GPU)."
    if own_mfu is not None:
        verdict = f"{'**met**' if own_mfu >= MFU_GOAL else '**missed**'} ({own_mfu:.1%})"
        if best is not None:
            verdict += f"; the best Full row: {best[0]:.1%} ({best[1]})."
    lines.append(
        "\nMFU counts model FLOPs only (no recomputation): Full `6N + 12·L·h·s` per token, "
        "LoRA `4N + 6·N_lora + 12·L·h·s`. Each lever row changes one thing against "
        "'plan's own' (the planner's micro-batch for this GPU). Goal: MFU >= 45% for full "
        "fine-tuning at the plan's own settings: " + verdict
    )
    title = "GPU throughput (bench/gpu.py)" + (" (smoke)" if args.smoke else "")
    record(header(title) + "\n" + "\n".join(lines), enabled=not (args.smoke or args.no_record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
