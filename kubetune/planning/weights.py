"""Parameter counts from a model's safetensors headers (the header only, never the weights).

A safetensors file starts with an 8-byte little-endian header length and a JSON header that
maps each tensor name to its dtype, shape and byte offsets. Summing the shapes gives the exact
parameter count of any architecture, the largest tensor bounds the largest single module
(what ZeRO-3 gathers at once), and the first decoder layer's tensors name its linear layers,
without torch and without reading the weights.

The files read are the ones ``transformers`` loads: the shards of
``model.safetensors.index.json``, else ``model.safetensors``. Other ``*.safetensors`` files in
the directory (Mistral's ``consolidated.safetensors``, an adapter) are not the model's weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

#: A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: The files transformers reads (``SAFE_WEIGHTS_INDEX_NAME``, ``SAFE_WEIGHTS_NAME``).
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: A tensor of a numbered block, as transformers names them (``model.layers.0.``,
#: ``transformer.h.0.``, ``gpt_neox.layers.0.``, ``model.decoder.layers.0.``, ``blocks.0.``).
BLOCK = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
#: The norm after the last decoder layer, outside the blocks (``model.norm``,
#: ``transformer.ln_f``, ``gpt_neox.final_layer_norm``, ``model.decoder.final_layer_norm``).
FINAL_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_norm|norm_f)\.(?:weight|bias)$")
#: Floating-point dtypes; an integer tensor is packed (quantized) weights or a buffer, so its
#: element count is not a parameter count.
#: Buffers, not parameters, that older checkpoints store: GPT-2's causal mask
#: (`h.N.attn.bias`, `h.N.attn.masked_bias`; not `attn.c_attn.bias`) and rotary tables.
BUFFER = re.compile(r"(?:^|\.)(?:attn\.(?:bias|masked_bias)|rotary_emb\.inv_freq)$")
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class WeightsHeaderError(ValueError):
    """A safetensors file whose header cannot be read."""


@dataclass(frozen=True)
class WeightCounts:
    """What the headers say.

    ``parameters``: elements of every tensor; ``largest_tensor``: the largest tensor;
    ``first_layer``: the parameters of block 0 of the longest numbered stack (0 when no tensor
    is named like a block); ``first_layer_tensors``: that block's tensors (name inside the
    block, shape); ``final_norm``: the parameters of the norm after the last block (0 when
    none is named like one); ``non_float``: names of tensors with an integer dtype (a quantized
    checkpoint, whose element counts are not parameter counts); ``files``: the files read.
    """

    parameters: int
    largest_tensor: int
    files: tuple[str, ...]
    first_layer: int = 0
    first_layer_tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    final_norm: int = 0
    non_float: tuple[str, ...] = ()


def header_tensors(header: dict[str, object]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape), from a parsed safetensors header (``__metadata__``
    skipped). Raises WeightsHeaderError for an entry without a dtype or an integer shape."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise WeightsHeaderError(f"tensor {name!r} is not a JSON object")
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WeightsHeaderError(f"tensor {name!r} has no shape of non-negative integers")
        if not isinstance(dtype, str):
            raise WeightsHeaderError(f"tensor {name!r} has no dtype")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _first_block(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Block 0 of the numbered stack with the most blocks (the decoder's, not a vision
    tower's), as {name inside the block: shape}."""
    blocks: dict[str, set[int]] = defaultdict(set)
    for name in shapes:
        if m := BLOCK.match(name):
            blocks[m["stack"]].add(int(m["index"]))
    if not blocks:
        return {}
    stack = max(sorted(blocks), key=lambda s: len(blocks[s]))
    first: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        m = BLOCK.match(name)
        if m and m["stack"] == stack and m["index"] == "0":
            first[m["rest"]] = shape
    return first


def counts_from_tensors(
    tensors: dict[str, tuple[str, tuple[int, ...]]], files: tuple[str, ...]
) -> WeightCounts:
    # Buffers some older checkpoints store beside the weights: GPT-2's causal-mask
    # `attn.bias`/`attn.masked_bias` (4-D or scalar) and rotary `inv_freq` tables.
    tensors = {name: t for name, t in tensors.items() if not BUFFER.search(name)}
    shapes = {name: shape for name, (_, shape) in tensors.items()}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    first = _first_block(shapes)
    return WeightCounts(
        parameters=sum(sizes.values()),
        largest_tensor=max(sizes.values(), default=0),
        files=files,
        first_layer=sum(math.prod(shape) for shape in first.values()),
        first_layer_tensors=tuple(sorted(first.items())),
        final_norm=sum(
            n for name, n in sizes.items() if FINAL_NORM.search(name) and not BLOCK.match(name)
        ),
        non_float=tuple(
            sorted(n for n, (dtype, _) in tensors.items() if dtype not in FLOAT_DTYPES)
        ),
    )


def read_header(path: Path) -> dict[str, object]:
    """The JSON header of one safetensors file (reads 8 + header-length bytes)."""
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise WeightsHeaderError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise WeightsHeaderError(f"{path}: header length {length} is not plausible")
            raw = fh.read(length)
    except OSError as err:
        raise WeightsHeaderError(f"{path}: cannot read: {err.strerror}") from err
    if len(raw) != length:
        raise WeightsHeaderError(f"{path}: the header is cut short ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsHeaderError(f"{path}: the safetensors header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise WeightsHeaderError(f"{path}: the safetensors header is not a JSON object")
    return header


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads from a model directory: the index's shards,
    else ``model.safetensors``; none when it has neither."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            shards = sorted({str(s) for s in data["weight_map"].values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise WeightsHeaderError(f"{index}: cannot read the shard index: {err}") from err
        return [directory / s for s in shards]
    single = directory / SINGLE_NAME
    return [single] if single.is_file() else []


def read_weight_counts(directory: Path) -> WeightCounts | None:
    """Counts from the safetensors headers of a model directory; None when it has none, or
    when a shard of its index is not there (a hub cache holding the config and the index
    only: the weights are not here to count)."""
    files = weight_files(directory)
    if not files or not all(path.is_file() for path in files):
        return None
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        header = read_header(path)
        try:
            tensors.update(header_tensors(header))
        except WeightsHeaderError as err:
            raise WeightsHeaderError(f"{path}: {err}") from err
    return counts_from_tensors(tensors, tuple(p.name for p in files))
