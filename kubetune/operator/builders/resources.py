"""A training pod's CPU and memory when spec.resources.resourcesPerNode sets none: requests
from the plan, so the scheduler places the pod where it fits, and a memory limit, so one
run cannot take its node's memory (docs/operator.md, "Resources").

The rule, per resource name (the user's resourcesPerNode always wins: a resource it names in
requests or limits gets nothing from here):
- CPU request: `CPU_PER_GPU_PROCESS` cores per process with GPUs (data loading, tokenizing,
  NCCL's proxy threads), `CPU_PER_CPU_PROCESS` per process without (CPU runs on small dev
  nodes use whatever is free). No CPU limit: throttling one rank stalls every rank in a
  collective.
- memory request: the plan's host memory per node (`memory.cpuPerNodeGiB`: offloaded
  states), plus `PROCESS_BASE_GIB` per process (Python, torch, the data), plus, without GPUs,
  each process's model states and activations (`memory.perGpuGiB`, then in host memory).
- memory limit: the request times `MEMORY_LIMIT_HEADROOM`, plus the /dev/shm memory volume
  (its pages count against the pod's memory), so a run the estimate misjudges by less than
  that headroom is not OOM-killed, and one that runs away is; with GPUs, plus the weights a
  checkpoint save holds in host memory on node 0 for a moment (full and partial
  fine-tuning: the whole 16-bit model, which ZeRO-3 gathers and safetensors serialises on
  the CPU). Not in the request: the scheduler need not reserve a spike of a few seconds.
"""

from __future__ import annotations

import math
from typing import Final

from kubetune.api.plan import PlanDocument

CPU_PER_GPU_PROCESS: Final = 4
CPU_PER_CPU_PROCESS_MILLI: Final = 500
PROCESS_BASE_GIB: Final = 1.5
MEMORY_LIMIT_HEADROOM: Final = 1.5
#: bf16/fp16 weights as a checkpoint saves them.
SAVED_WEIGHT_BYTES: Final = 2


def _mib(gib: float) -> str:
    return f"{math.ceil(gib * 1024)}Mi"


def host_memory_estimate_gib(plan: PlanDocument, gpus: int, procs: int) -> float:
    """The host memory a training pod needs by the plan (GiB), before any headroom."""
    memory = plan.memory
    need = memory.cpu_per_node_gib + PROCESS_BASE_GIB * procs
    if gpus == 0:
        need += memory.per_gpu_gib * procs
    return need


def save_spike_gib(plan: PlanDocument, gpus: int) -> float:
    """Host memory a checkpoint save holds on node 0 beyond the steady estimate (GiB): the
    16-bit weights of the whole model for full and partial fine-tuning on GPUs (on a CPU
    they are in the estimate already; an adapter is negligible)."""
    if gpus == 0 or plan.method in ("LoRA", "QLoRA", "Prefix"):
        return 0.0
    return SAVED_WEIGHT_BYTES * max(0, plan.total_parameters) / 2**30


def plan_resources(
    plan: PlanDocument, gpus: int, procs: int, shm_gib: float
) -> tuple[dict[str, str], dict[str, str]]:
    """The CPU and memory requests and the memory limit of one training pod, from the plan."""
    need = host_memory_estimate_gib(plan, gpus, procs)
    cpu = str(CPU_PER_GPU_PROCESS * procs) if gpus > 0 else f"{CPU_PER_CPU_PROCESS_MILLI * procs}m"
    requests = {"cpu": cpu, "memory": _mib(need)}
    limit = (need + save_spike_gib(plan, gpus)) * MEMORY_LIMIT_HEADROOM + shm_gib
    limits = {"memory": _mib(limit)}
    return requests, limits
