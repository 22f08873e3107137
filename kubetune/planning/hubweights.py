"""Parameter counts of a hub model from its safetensors headers, without its weights:
`huggingface_hub.get_safetensors_metadata` reads each file's header with HTTP range requests
(a few kilobytes per file) and the shard index; the tensors' dtypes and shapes then give the
same `WeightCounts` as a local directory's headers (`kubetune.planning.weights`).

Offline (HF_HUB_OFFLINE=1) nothing is asked of the hub: the counts come from the hub cache's
snapshot when it holds the weight files (`read_weight_counts`), else there are none and the
plan uses the config's shapes and says why. The I/O of the prepare step, not of the pure
planner: the operator planning in-process never calls the hub.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.planning.weights import WeightCounts, counts_from_tensors, read_weight_counts


def hub_weight_counts(
    repo: str, revision: str | None, token: str | None, snapshot: Path | None = None
) -> tuple[WeightCounts | None, str]:
    """The counts of hub model `repo` (from the hub's safetensors metadata, or offline from
    the cached `snapshot` directory) and, when there are none, why (for the plan's notes)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        counts = read_weight_counts(snapshot) if snapshot is not None else None
        why = "" if counts else "offline, and the hub cache holds no safetensors weights"
        return counts, why
    from huggingface_hub import HfApi

    try:
        # A fresh client: it reads the endpoint (HF_ENDPOINT) now, not at import.
        meta = HfApi().get_safetensors_metadata(repo, revision=revision, token=token or None)
    except Exception as exc:  # no safetensors files, refused, unreachable: planned without
        return None, f"the hub's safetensors metadata could not be read ({type(exc).__name__})"
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in meta.files_metadata.values():
        for name, info in file.tensors.items():
            tensors[name] = (str(info.dtype), tuple(int(d) for d in info.shape))
    return counts_from_tensors(tensors, tuple(sorted(meta.files_metadata))), ""
