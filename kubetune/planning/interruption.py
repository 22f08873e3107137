"""How long a run needs to stop cleanly, and how long a rank may wait for the others: from
the plan's sizes. The operator sets the training pods' `terminationGracePeriodSeconds`, the
trainer's shutdown timeout and the collective (gloo/NCCL) timeout from these, so that a
SIGTERM (a pod deleted or drained, the job suspended or preempted by a queue) ends with a
checkpoint, and a rank whose peer died or hangs is stopped in bounded time."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune.api.plan import PlanDocument

#: A node's sustained write bandwidth to the output volume, assumed low on purpose (network
#: storage under several writers); a faster volume only makes the grace period generous.
WRITE_MIB_PER_SECOND = 200.0
#: What a save costs beyond its bytes: serialisation, the ranks' barriers, the rename.
SAVE_OVERHEAD_SECONDS = 15.0
#: The optimizer step (or evaluation) in flight when SIGTERM arrives finishes before the save.
STEP_MARGIN_SECONDS = 60.0
#: The grace period's bounds: a tiny run still gets two minutes; beyond an hour a
#: drain should not wait (the run then resumes from its last periodic checkpoint).
MIN_GRACE_SECONDS = 120
MAX_GRACE_SECONDS = 3600
#: The launcher keeps this long of the grace period for itself (torchrun's workers are
#: killed this long before the kubelet's SIGKILL, so the launcher can still report).
LAUNCHER_MARGIN_SECONDS = 10
#: The collective timeout never goes below this: rank 0 alone reads and tokenises the data
#: and runs the probes while the other ranks wait in a broadcast.
MIN_COLLECTIVE_SECONDS = 900

#: Bytes per parameter: weights as saved (bf16), a trainable parameter's fp32 master copy and
#: Adam's two moments (4 + 4 + 4), and an adapter's weights (fp32).
_WEIGHT_BYTES = 2
_OPTIMIZER_BYTES = 12
_ADAPTER_BYTES = 4
_ADAPTER_METHODS = ("LoRA", "QLoRA", "Prefix")


@dataclass(frozen=True)
class StopTimes:
    """A run's stop budget, in seconds."""

    #: The busiest node's checkpoint, at WRITE_MIB_PER_SECOND.
    checkpoint_seconds: float
    #: The training pods' terminationGracePeriodSeconds.
    grace_seconds: int
    #: torchrun's wait for its workers after SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
    shutdown_seconds: int
    #: The process group's timeout: the longest a rank waits in one collective.
    collective_seconds: int


def checkpoint_bytes_per_node(plan: PlanDocument) -> int:
    """What the busiest node (node 0) writes for one checkpoint: the weights as saved (the
    whole model for full and partial fine-tuning, only the adapter otherwise) and the
    optimizer states of the trainable parameters, split across the nodes as the ZeRO stage
    shards them. Under DeepSpeed node 0 writes the weights twice: the model file and the
    engine's own copy (ZeRO-1/2's `mp_rank_00_model_states.pt`; at ZeRO-3 the 16-bit
    weights gathered for the model file, beside its shard of the partitioned ones)."""
    nodes = max(1, plan.num_nodes)
    trainable = max(0, plan.trainable_parameters)
    if plan.method in _ADAPTER_METHODS:
        weights = trainable * _ADAPTER_BYTES
    else:
        weights = max(0, plan.total_parameters) * _WEIGHT_BYTES
    optimizer = trainable * _OPTIMIZER_BYTES
    if plan.zero_stage >= 3:
        return weights + math.ceil((weights + optimizer) / nodes)
    if plan.zero_stage >= 1:
        return 2 * weights + math.ceil(optimizer / nodes)
    return weights + optimizer


def stop_times(plan: PlanDocument, write_mib_per_second: float = WRITE_MIB_PER_SECOND) -> StopTimes:
    """The grace period covers the step in flight and twice the checkpoint's estimated write
    (the estimate is a bandwidth guess); the collective timeout covers three checkpoints
    (rank 0 saving while the others wait at its barrier) and five minutes more."""
    seconds = SAVE_OVERHEAD_SECONDS + checkpoint_bytes_per_node(plan) / (
        write_mib_per_second * 1024 * 1024
    )
    grace = math.ceil(STEP_MARGIN_SECONDS + 2 * seconds)
    grace = min(MAX_GRACE_SECONDS, max(MIN_GRACE_SECONDS, grace))
    collective = max(MIN_COLLECTIVE_SECONDS, math.ceil(3 * seconds + 300))
    return StopTimes(
        checkpoint_seconds=round(seconds, 1),
        grace_seconds=grace,
        shutdown_seconds=grace - LAUNCHER_MARGIN_SECONDS,
        collective_seconds=collective,
    )
