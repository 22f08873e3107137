"""The model's architecture, read from a Hugging Face ``config.json`` (no weights, no torch).

For the families in the table (``SUPPORTED_FAMILIES``) the parameter count is computed exactly
from the shapes the ``transformers`` implementation of each family builds (embeddings,
attention with grouped-query K/V, gated or plain MLP, norms, biases where the family has them,
the LM head unless it is tied to the embedding). ``largest_layer_parameters`` is the largest
single module (one ``nn.Linear`` or ``nn.Embedding``), which is what DeepSpeed's
``model_to_params`` measures for ZeRO-3: the largest block of weights that must be gathered
on one GPU at once.

Any other causal LM is read from its config's standard fields (``STANDARD_FIELDS``) with a
Llama-like layer assumed; ``with_weight_counts`` then replaces what the assumption cannot know
with what the model's safetensors headers say (``kubetune.planning.weights``): the exact
parameter count, the first decoder layer's parameters and linear layers (the LoRA targets),
the final norm and the largest tensor. ``ModelArch.notes`` says which was which, for the
plan's reasons.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kubetune.planning.weights import WeightCounts

NormKind = Literal["rms", "layer"]

#: Families whose layout this module knows exactly (the table). Another family is planned
#: from its config's standard fields with Llama-like shapes assumed, and what its safetensors
#: headers say when the model directory has them (``with_weight_counts``); the plan's reasons
#: say so (``ModelArch.notes``).
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)

#: The standard config fields a family outside the table must have to be planned.
STANDARD_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)


class ModelConfigError(ValueError):
    """The model's config.json cannot be read or does not describe a supported model."""


@dataclass(frozen=True)
class LinearShape:
    """One linear projection inside a decoder layer."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelArch:
    """The shapes of a decoder-only transformer, as its config.json states them."""

    name: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    gated_mlp: bool
    norm: NormKind
    qkv_bias: bool
    output_bias: bool
    mlp_bias: bool
    learned_positions: int = 0
    """Rows of a learned absolute position table (GPT-2, OPT); 0 for rotary families."""
    embed_dim: int = 0
    """Width of the token embedding when it differs from ``hidden_size`` (OPT-350m); 0 = same."""
    final_norm: bool = True
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys (Qwen3): two ``head_dim`` weights per layer."""
    counted_parameters: int = 0
    """The exact count from the safetensors headers; 0 = computed from the shapes."""
    largest_tensor: int = 0
    """The largest tensor in the safetensors headers; 0 = computed from the shapes."""
    counted_layer_parameters: int = 0
    """One decoder layer's parameters from the safetensors headers; 0 = from the shapes."""
    counted_final_norm: int = 0
    """The final norm's parameters from the safetensors headers; 0 = from the shapes."""
    header_linears: tuple[LinearShape, ...] = ()
    """A family outside the table: the linear layers of its first decoder layer as the
    safetensors headers name them (its 2-D weights); empty = from the shapes."""
    notes: tuple[str, ...] = ()
    """What could not be known from the config and was assumed (for the plan's reasons)."""

    @property
    def in_table(self) -> bool:
        """Whether kubetune knows this family's layout exactly (``SUPPORTED_FAMILIES``)."""
        return self.family in SUPPORTED_FAMILIES

    # ---- shapes -----------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def token_embed_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def layer_linears(self) -> tuple[LinearShape, ...]:
        """The linear projections of one decoder layer, named as the HF module names them."""
        if self.header_linears:
            return self.header_linears
        h, i = self.hidden_size, self.intermediate_size
        b_qkv, b_o, b_mlp = self.qkv_bias, self.output_bias, self.mlp_bias
        if self.family == "gpt2":
            return (
                LinearShape("c_attn", h, self.q_dim + 2 * self.kv_dim, b_qkv),
                LinearShape("attn.c_proj", self.q_dim, h, b_o),
                LinearShape("c_fc", h, i, b_mlp),
                LinearShape("mlp.c_proj", i, h, b_mlp),
            )
        if self.family == "gpt_neox":
            return (
                LinearShape("query_key_value", h, self.q_dim + 2 * self.kv_dim, b_qkv),
                LinearShape("dense", self.q_dim, h, b_o),
                LinearShape("dense_h_to_4h", h, i, b_mlp),
                LinearShape("dense_4h_to_h", i, h, b_mlp),
            )
        if self.family == "phi3":  # fused q/k/v and gate/up projections, no biases
            return (
                LinearShape("qkv_proj", h, self.q_dim + 2 * self.kv_dim, b_qkv),
                LinearShape("o_proj", self.q_dim, h, b_o),
                LinearShape("gate_up_proj", h, 2 * i, b_mlp),
                LinearShape("down_proj", i, h, b_mlp),
            )
        if self.family == "opt":
            return (
                LinearShape("q_proj", h, self.q_dim, b_qkv),
                LinearShape("k_proj", h, self.kv_dim, b_qkv),
                LinearShape("v_proj", h, self.kv_dim, b_qkv),
                LinearShape("out_proj", self.q_dim, h, b_o),
                LinearShape("fc1", h, i, b_mlp),
                LinearShape("fc2", i, h, b_mlp),
            )
        # llama, mistral, qwen2, qwen3, gemma and families outside the table: gated MLP
        return (
            LinearShape("q_proj", h, self.q_dim, b_qkv),
            LinearShape("k_proj", h, self.kv_dim, b_qkv),
            LinearShape("v_proj", h, self.kv_dim, b_qkv),
            LinearShape("o_proj", self.q_dim, h, b_o),
            LinearShape("gate_proj", h, i, b_mlp),
            LinearShape("up_proj", h, i, b_mlp),
            LinearShape("down_proj", i, h, b_mlp),
        )

    @property
    def norm_parameters(self) -> int:
        """Parameters of one norm: RMSNorm has a weight, LayerNorm a weight and a bias."""
        return self.hidden_size * (1 if self.norm == "rms" else 2)

    # ---- counts -----------------------------------------------------------------------

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (two norms plus the projections), or the headers'
        figure for a family outside the table."""
        if self.counted_layer_parameters:
            return self.counted_layer_parameters
        qk = 2 * self.head_dim if self.qk_norm else 0
        return 2 * self.norm_parameters + qk + sum(lin.parameters for lin in self.layer_linears)

    @property
    def final_norm_parameters(self) -> int:
        """The norm after the last decoder layer (none when ``final_norm`` is false)."""
        if self.counted_final_norm:
            return self.counted_final_norm
        return self.norm_parameters if self.final_norm else 0

    @property
    def embedding_parameters(self) -> int:
        """Token embedding, learned positions and the OPT-style in/out projections."""
        total = self.vocab_size * self.token_embed_dim
        total += self.learned_positions * self.hidden_size
        if self.token_embed_dim != self.hidden_size:
            total += 2 * self.token_embed_dim * self.hidden_size  # project_in + project_out
        return total

    @property
    def lm_head_parameters(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.token_embed_dim

    @property
    def total_parameters(self) -> int:
        """Exact parameter count; a tied LM head is counted once, as PyTorch stores it once.
        The safetensors headers' count wins when the directory had them."""
        if self.counted_parameters:
            return self.counted_parameters
        return (
            self.embedding_parameters
            + self.num_layers * self.layer_parameters
            + self.final_norm_parameters
            + self.lm_head_parameters
        )

    @property
    def largest_layer_parameters(self) -> int:
        """The largest single module's parameters (DeepSpeed's ``largest_layer_params``)."""
        candidates = [lin.parameters for lin in self.layer_linears]
        candidates.append(self.vocab_size * self.token_embed_dim)
        candidates.append(self.learned_positions * self.hidden_size)
        return max(*candidates, self.largest_tensor)


# ---- reading config.json -------------------------------------------------------------------


def load_model_arch(
    source: Mapping[str, Any] | str | os.PathLike[str], name: str = ""
) -> ModelArch:
    """Read a ``config.json`` (a path to it, to the model directory, or the parsed dict)."""
    if isinstance(source, Mapping):
        return model_arch_from_config(source, origin="<dict>", name=name)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelConfigError(f"{path}: cannot read the model config: {err.strerror}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    file_name = path.parent.name if path.name == "config.json" else path.stem
    display = name or str(data.get("_name_or_path") or file_name)
    return model_arch_from_config(data, origin=str(path), name=display)


def _require_int(config: Mapping[str, Any], key: str, origin: str) -> int:
    if key not in config or config[key] is None:
        raise ModelConfigError(f"{origin}: missing required key {key!r}")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{origin}: key {key!r} must be a positive integer, got {value!r}")
    return value


def _optional_int(config: Mapping[str, Any], key: str, default: int, origin: str) -> int:
    if config.get(key) is None:
        return default
    return _require_int(config, key, origin)


def _bool(config: Mapping[str, Any], key: str, default: bool, origin: str) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelConfigError(f"{origin}: key {key!r} must be true or false, got {value!r}")
    return value


def model_arch_from_config(config: Mapping[str, Any], origin: str, name: str = "") -> ModelArch:
    """Build a :class:`ModelArch` from a parsed config; ``origin`` names the file in errors."""
    family = config.get("model_type")
    if not isinstance(family, str):
        raise ModelConfigError(f"{origin}: missing required key 'model_type'")
    display = name or str(config.get("_name_or_path") or family)
    if family not in SUPPORTED_FAMILIES:
        arch = _outside_table(config, family, origin, display)
    elif family == "gpt2":
        arch = _gpt2(config, origin, display)
    elif family == "gpt_neox":
        arch = _gpt_neox(config, origin, display)
    elif family == "opt":
        arch = _opt(config, origin, display)
    else:
        arch = _llama_like(config, family, origin, display)
    if arch.num_heads % arch.num_kv_heads:
        raise ModelConfigError(
            f"{origin}: num_attention_heads ({arch.num_heads}) is not a multiple of "
            f"num_key_value_heads ({arch.num_kv_heads})"
        )
    return arch


def _head_dim(config: Mapping[str, Any], hidden: int, heads: int, origin: str) -> int:
    if config.get("head_dim") is not None:
        return _require_int(config, "head_dim", origin)
    if hidden % heads:
        raise ModelConfigError(
            f"{origin}: hidden size {hidden} is not divisible by {heads} attention heads"
        )
    return hidden // heads


#: Families whose config leaves ``tie_word_embeddings`` out when it is true.
_TIED_BY_DEFAULT = frozenset({"gemma"})


def _outside_table(config: Mapping[str, Any], family: str, origin: str, name: str) -> ModelArch:
    """A family kubetune has no table entry for: the standard fields, Llama-like shapes."""
    missing = [key for key in STANDARD_FIELDS if config.get(key) is None]
    if missing:
        raise ModelConfigError(
            f"{origin}: model_type {family!r} is not in kubetune's table ("
            + ", ".join(SUPPORTED_FAMILIES)
            + ") and its config lacks the standard field(s) "
            + ", ".join(missing)
            + ", so its shapes cannot be read; a causal LM outside the table needs "
            + ", ".join(STANDARD_FIELDS)
        )
    arch = _llama_like(config, family, origin, name)
    return replace(arch, notes=(_OUTSIDE_NOTE.format(family=family), _NO_HEADERS_NOTE))


# The notes are short on purpose: they travel in the prepare pod's termination message with
# the rest of the plan (contract.TERMINATION_LIMIT_BYTES).
_OUTSIDE_NOTE = (
    "model_type {family!r} is outside kubetune's architecture table: shapes from the config's "
    "standard fields, activation memory as for a Llama-like layer"
)
_NO_HEADERS_NOTE = (
    "no safetensors headers were read (not a local model directory), so its parameter count, "
    "largest layer and LoRA targets are Llama-like assumptions too"
)


def linears_from_block(tensors: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[LinearShape, ...]:
    """The linear layers of a decoder block from its tensors (name inside the block, shape):
    every 2-D ``<module>.weight`` (``nn.Linear`` stores ``[out, in]``), with a bias where the
    block has ``<module>.bias``."""
    names = {name for name, _ in tensors}
    return tuple(
        LinearShape(
            name=name.removesuffix(".weight"),
            in_features=shape[1],
            out_features=shape[0],
            bias=name.removesuffix(".weight") + ".bias" in names,
        )
        for name, shape in tensors
        if name.endswith(".weight") and len(shape) == 2
    )


def with_weight_counts(arch: ModelArch, counts: WeightCounts) -> ModelArch:
    """The architecture with what the safetensors headers say: the exact parameter count
    (any family) and, for a family outside the table, its largest tensor, its first decoder
    layer's parameters and linear layers (which LoRA targets). A quantized checkpoint's
    integer tensors are not parameter counts, so its headers are not used."""
    if counts.non_float:
        return replace(
            arch,
            notes=(
                *arch.notes,
                f"the safetensors headers hold integer tensors ({counts.non_float[0]}...: a "
                "quantized checkpoint), so the parameter count comes from the config's shapes",
            ),
        )
    shaped = arch.total_parameters
    if arch.in_table:
        if counts.parameters == shaped:
            return arch
        note = (
            f"{counts.parameters:,} parameters from the safetensors headers, which the plan "
            f"uses; the config's shapes give {shaped:,}"
        )
        return replace(arch, counted_parameters=counts.parameters, notes=(*arch.notes, note))
    linears = linears_from_block(counts.first_layer_tensors)
    found = (
        f"{counts.parameters:,} parameters and block 0's {len(linears)} linear layers (the "
        "LoRA targets) from the safetensors headers"
        if linears
        else f"{counts.parameters:,} parameters from the safetensors headers, but no decoder "
        "block with 2-D weights in them: its layers and LoRA targets are Llama-like assumptions"
    )
    notes = tuple(n for n in arch.notes if n != _NO_HEADERS_NOTE)
    return replace(
        arch,
        counted_parameters=counts.parameters,
        largest_tensor=counts.largest_tensor,
        counted_layer_parameters=counts.first_layer if linears else 0,
        counted_final_norm=counts.final_norm if linears else 0,
        header_linears=linears,
        notes=(*notes, found),
    )


def _llama_like(config: Mapping[str, Any], family: str, origin: str, name: str) -> ModelArch:
    hidden = _require_int(config, "hidden_size", origin)
    heads = _require_int(config, "num_attention_heads", origin)
    attention_bias = _bool(config, "attention_bias", False, origin)
    tied_default = family in _TIED_BY_DEFAULT
    return ModelArch(
        name=name,
        family=family,
        hidden_size=hidden,
        intermediate_size=_require_int(config, "intermediate_size", origin),
        num_layers=_require_int(config, "num_hidden_layers", origin),
        num_heads=heads,
        num_kv_heads=_optional_int(config, "num_key_value_heads", heads, origin),
        head_dim=_head_dim(config, hidden, heads, origin),
        vocab_size=_require_int(config, "vocab_size", origin),
        max_positions=_require_int(config, "max_position_embeddings", origin),
        tie_word_embeddings=_bool(config, "tie_word_embeddings", tied_default, origin),
        gated_mlp=True,
        norm="rms",
        # Qwen2 always has q/k/v biases and no output bias; Llama has attention_bias.
        qkv_bias=True if family == "qwen2" else attention_bias,
        output_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=_bool(config, "mlp_bias", False, origin),
        qk_norm=family == "qwen3",
    )


def _gpt2(config: Mapping[str, Any], origin: str, name: str) -> ModelArch:
    hidden = _require_int(config, "n_embd", origin)
    heads = _require_int(config, "n_head", origin)
    positions = _require_int(config, "n_positions", origin)
    return ModelArch(
        name=name,
        family="gpt2",
        hidden_size=hidden,
        intermediate_size=_optional_int(config, "n_inner", 4 * hidden, origin),
        num_layers=_require_int(config, "n_layer", origin),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_head_dim(config, hidden, heads, origin),
        vocab_size=_require_int(config, "vocab_size", origin),
        max_positions=positions,
        tie_word_embeddings=_bool(config, "tie_word_embeddings", True, origin),
        gated_mlp=False,
        norm="layer",
        qkv_bias=True,
        output_bias=True,
        mlp_bias=True,
        learned_positions=positions,
    )


def _gpt_neox(config: Mapping[str, Any], origin: str, name: str) -> ModelArch:
    hidden = _require_int(config, "hidden_size", origin)
    heads = _require_int(config, "num_attention_heads", origin)
    bias = _bool(config, "attention_bias", True, origin)
    return ModelArch(
        name=name,
        family="gpt_neox",
        hidden_size=hidden,
        intermediate_size=_require_int(config, "intermediate_size", origin),
        num_layers=_require_int(config, "num_hidden_layers", origin),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_head_dim(config, hidden, heads, origin),
        vocab_size=_require_int(config, "vocab_size", origin),
        max_positions=_require_int(config, "max_position_embeddings", origin),
        tie_word_embeddings=_bool(config, "tie_word_embeddings", False, origin),
        gated_mlp=False,
        norm="layer",
        qkv_bias=bias,
        output_bias=bias,
        mlp_bias=True,
    )


def _opt(config: Mapping[str, Any], origin: str, name: str) -> ModelArch:
    hidden = _require_int(config, "hidden_size", origin)
    heads = _require_int(config, "num_attention_heads", origin)
    positions = _require_int(config, "max_position_embeddings", origin)
    bias = _bool(config, "enable_bias", True, origin)
    embed_dim = _optional_int(config, "word_embed_proj_dim", hidden, origin)
    pre_norm = _bool(config, "do_layer_norm_before", True, origin)
    remove_final = _bool(config, "_remove_final_layer_norm", False, origin)
    return ModelArch(
        name=name,
        family="opt",
        hidden_size=hidden,
        intermediate_size=_require_int(config, "ffn_dim", origin),
        num_layers=_require_int(config, "num_hidden_layers", origin),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_head_dim(config, hidden, heads, origin),
        vocab_size=_require_int(config, "vocab_size", origin),
        max_positions=positions,
        tie_word_embeddings=_bool(config, "tie_word_embeddings", True, origin),
        gated_mlp=False,
        norm="layer",
        qkv_bias=bias,
        output_bias=bias,
        mlp_bias=bias,
        # OPT's learned positions are offset by 2 rows (OPTLearnedPositionalEmbedding).
        learned_positions=positions + 2,
        embed_dim=0 if embed_dim == hidden else embed_dim,
        final_norm=pre_norm and not remove_final,
    )
