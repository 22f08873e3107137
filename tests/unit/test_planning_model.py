"""Architecture parsing and exact parameter counts against the published counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune.planning import (
    ModelConfigError,
    bundled_architectures,
    load_model_arch,
    model_arch_from_config,
)
from kubetune.planning.methods import lora_target_modules
from kubetune.planning.model import with_weight_counts
from kubetune.planning.weights import WeightCounts, WeightsHeaderError, read_weight_counts

pytestmark = pytest.mark.unit

# Published parameter counts (model cards / `model.num_parameters()` of the HF checkpoints).
PUBLISHED = [
    ("gpt2", "gpt2", 124_439_808),
    ("opt-125m", "opt", 125_239_296),
    ("pythia-160m", "gpt_neox", 162_322_944),
    ("opt-350m", "opt", 331_196_416),
    ("qwen2-0.5b", "qwen2", 494_032_768),
    ("qwen3-0.6b", "qwen3", 596_049_920),
    ("gemma-2b", "gemma", 2_506_172_416),
    ("phi-3-mini-4k", "phi3", 3_821_079_552),
    ("pythia-1b", "gpt_neox", 1_011_781_632),
    ("tinyllama-1.1b", "llama", 1_100_048_384),
    ("llama-2-7b", "llama", 6_738_415_616),
    ("mistral-7b", "mistral", 7_241_732_096),
    ("qwen2-7b", "qwen2", 7_615_616_512),
    ("llama-3-8b", "llama", 8_030_261_248),
    ("llama-2-13b", "llama", 13_015_864_320),
    ("llama-2-70b", "llama", 68_976_648_192),
    ("llama-3-70b", "llama", 70_553_706_496),
]


def test_every_bundled_architecture_has_a_published_count() -> None:
    assert set(bundled_architectures()) == {name for name, _, _ in PUBLISHED}


@pytest.mark.parametrize(("name", "family", "published"), PUBLISHED)
def test_parameter_count_matches_published(name: str, family: str, published: int) -> None:
    arch = load_model_arch(bundled_architectures()[name])
    assert arch.family == family
    assert abs(arch.total_parameters - published) / published < 0.01
    # The count is exact from the shapes, so in practice it is equal.
    assert arch.total_parameters == published


LARGEST = [
    ("gpt2", 50257 * 768),  # wte (tied with the LM head, counted once)
    ("llama-2-7b", 32000 * 4096),  # embed_tokens / lm_head
    ("llama-3-70b", 128256 * 8192),  # the embedding is larger than an MLP projection
    ("opt-350m", 50272 * 512),  # OPT-350m embeds at 512 and projects in/out
]


@pytest.mark.parametrize(("name", "largest"), LARGEST)
def test_largest_layer_is_the_largest_single_module(name: str, largest: int) -> None:
    assert load_model_arch(bundled_architectures()[name]).largest_layer_parameters == largest


@pytest.mark.parametrize(
    ("name", "kv_heads", "tied"),
    [("llama-3-8b", 8, False), ("qwen2-0.5b", 2, True), ("llama-2-7b", 32, False)],
)
def test_gqa_and_tying_are_read(name: str, kv_heads: int, tied: bool) -> None:
    arch = load_model_arch(bundled_architectures()[name])
    assert arch.num_kv_heads == kv_heads
    assert arch.tie_word_embeddings is tied


def test_name_comes_from_the_config() -> None:
    arch = load_model_arch(bundled_architectures()["mistral-7b"])
    assert arch.name == "mistralai/Mistral-7B-v0.1"
    assert arch.max_positions == 32768


def test_a_model_directory_is_accepted(tmp_path: Path) -> None:
    src = bundled_architectures()["gpt2"].read_text()
    (tmp_path / "config.json").write_text(src)
    assert load_model_arch(tmp_path).total_parameters == 124_439_808


def test_dict_input_and_tied_head_untied() -> None:
    config = json.loads(bundled_architectures()["tinyllama-1.1b"].read_text())
    untied = model_arch_from_config(config, origin="test")
    tied = model_arch_from_config({**config, "tie_word_embeddings": True}, origin="test")
    assert untied.total_parameters - tied.total_parameters == 32000 * 2048


def test_attention_bias_adds_qkvo_biases() -> None:
    config = json.loads(bundled_architectures()["llama-2-7b"].read_text())
    biased = model_arch_from_config({**config, "attention_bias": True}, origin="test")
    plain = model_arch_from_config(config, origin="test")
    assert biased.total_parameters - plain.total_parameters == 32 * 4 * 4096


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("hidden_size", "missing required key 'hidden_size'"),
        ("num_hidden_layers", "missing required key 'num_hidden_layers'"),
        ("vocab_size", "missing required key 'vocab_size'"),
        ("model_type", "missing required key 'model_type'"),
    ],
)
def test_missing_key_names_the_key_and_the_file(tmp_path: Path, drop: str, message: str) -> None:
    config = json.loads(bundled_architectures()["llama-2-7b"].read_text())
    del config[drop]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as err:
        load_model_arch(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model_type": "t5"}', "model_type 't5' is not in kubetune's table.*hidden_size"),
        (
            '{"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": "twelve",'
            ' "vocab_size": 10, "n_positions": 8}',
            "'n_layer' must be a positive integer",
        ),
        (
            '{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 6,'
            ' "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10,'
            ' "max_position_embeddings": 8}',
            "not divisible",
        ),
    ],
)
def test_bad_configs_raise_model_config_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ModelConfigError, match=message):
        load_model_arch(path)


def test_missing_file_is_a_model_config_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_arch(tmp_path / "absent.json")
    assert issubclass(ModelConfigError, ValueError)


# ---- families outside the table, safetensors headers ---------------------------------------


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file as the format lays it out (header only; no tensor bytes needed)."""
    import struct

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


OUTSIDE = {
    "model_type": "newfamily",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 100,
    "max_position_embeddings": 32,
}


def test_a_family_outside_the_table_is_planned_from_standard_fields() -> None:
    arch = model_arch_from_config(OUTSIDE, origin="test")
    assert arch.family == "newfamily"
    assert arch.layer_linears[0].name == "q_proj"
    assert "outside kubetune's architecture table" in arch.notes[0]
    assert lora_target_modules(arch) == lora_target_modules(
        model_arch_from_config({**OUTSIDE, "model_type": "llama"}, origin="test")
    )


def test_a_family_outside_the_table_without_standard_fields_is_refused() -> None:
    config = {k: v for k, v in OUTSIDE.items() if k != "intermediate_size"}
    with pytest.raises(ModelConfigError, match=r"lacks the standard field.*intermediate_size"):
        model_arch_from_config(config, origin="cfg.json")


def _olmo_like_block(i: int) -> dict[str, list[int]]:
    """One decoder layer as an OLMo-2-like checkpoint names it: q/k/v/o without biases but
    q/k norms, a gated MLP, norms after attention and MLP (not the Llama layout)."""
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": [64, 64],
        p + "self_attn.k_proj.weight": [32, 64],
        p + "self_attn.v_proj.weight": [32, 64],
        p + "self_attn.o_proj.weight": [64, 64],
        p + "self_attn.o_proj.bias": [64],
        p + "self_attn.q_norm.weight": [64],
        p + "self_attn.k_norm.weight": [32],
        p + "mlp.gate_proj.weight": [128, 64],
        p + "mlp.up_proj.weight": [128, 64],
        p + "mlp.down_proj.weight": [64, 128],
        p + "post_attention_layernorm.weight": [64],
        p + "post_feedforward_layernorm.weight": [64],
    }


def _sharded(tmp_path: Path, shards: list[dict[str, list[int]]]) -> None:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shapes in zip(names, shards, strict=True):
        _safetensors(tmp_path / name, shapes)
    weight_map = {t: name for name, shapes in zip(names, shards, strict=True) for t in shapes}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_safetensors_headers_give_the_exact_counts_and_layer_linears(tmp_path: Path) -> None:
    config = {**OUTSIDE, "num_key_value_heads": 2}
    embed = {"model.embed_tokens.weight": [100, 64], "model.norm.weight": [64]}
    _sharded(
        tmp_path,
        [{**embed, **_olmo_like_block(0)}, {**_olmo_like_block(1), "lm_head.weight": [100, 64]}],
    )
    # Not the model's weights: transformers reads only the index's shards.
    _safetensors(tmp_path / "consolidated.safetensors", {"x": [1000, 1000]})
    counts = read_weight_counts(tmp_path)
    assert counts is not None
    layer = 64 * 64 * 2 + 32 * 64 * 2 + 64 + 64 + 32 + 3 * 128 * 64 + 2 * 64
    assert counts.parameters == 100 * 64 * 2 + 64 + 2 * layer
    assert counts.largest_tensor == 128 * 64
    assert counts.first_layer == layer
    assert "consolidated.safetensors" not in counts.files
    (tmp_path / "model-00002-of-00002.safetensors").rename(tmp_path / "moved")
    assert read_weight_counts(tmp_path) is None  # an index without its shards: nothing to count
    (tmp_path / "moved").rename(tmp_path / "model-00002-of-00002.safetensors")
    arch = with_weight_counts(model_arch_from_config(config, origin="test"), counts)
    assert arch.total_parameters == counts.parameters
    assert arch.layer_parameters == layer
    names = [lin.name for lin in arch.layer_linears]
    assert names == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    o_proj = arch.layer_linears[names.index("self_attn.o_proj")]
    assert (o_proj.in_features, o_proj.out_features, o_proj.bias) == (64, 64, True)
    assert set(lora_target_modules(arch)) == {n.rsplit(".", 1)[-1] for n in names}
    # The largest single module: the MLP's projections, 128 x 64 (the embedding is 100 x 64).
    assert arch.largest_layer_parameters == 128 * 64
    assert "no safetensors headers were read" not in " ".join(arch.notes)
    assert arch.notes[-1] == (
        f"{counts.parameters:,} parameters and block 0's 7 linear layers (the LoRA targets) "
        "from the safetensors headers"
    )


def test_a_family_outside_the_table_without_headers_says_what_it_assumed() -> None:
    arch = model_arch_from_config(OUTSIDE, origin="test")
    assert any("no safetensors headers were read" in n for n in arch.notes)


def test_a_known_family_keeps_its_shapes_when_the_headers_agree() -> None:
    arch = load_model_arch(bundled_architectures()["gpt2"])
    counts = WeightCounts(parameters=arch.total_parameters, largest_tensor=1, files=("m",))
    assert with_weight_counts(arch, counts) == arch
    more = WeightCounts(parameters=arch.total_parameters + 5, largest_tensor=1, files=("m",))
    counted = with_weight_counts(arch, more)
    assert counted.total_parameters == arch.total_parameters + 5
    assert counted.layer_linears == arch.layer_linears
    assert "from the safetensors headers, which the plan uses" in counted.notes[-1]


def test_a_quantized_checkpoint_keeps_the_shapes_count(tmp_path: Path) -> None:
    import struct

    header = {
        "model.layers.0.mlp.up_proj.qweight": {
            "dtype": "I32",
            "shape": [8, 128],
            "data_offsets": [0, 4096],
        }
    }
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    counts = read_weight_counts(tmp_path)
    assert counts is not None
    assert counts.non_float == ("model.layers.0.mlp.up_proj.qweight",)
    arch = load_model_arch(bundled_architectures()["qwen2-0.5b"])
    kept = with_weight_counts(arch, counts)
    assert kept.total_parameters == arch.total_parameters
    assert "quantized checkpoint" in kept.notes[-1]


def test_no_safetensors_is_no_counts_and_a_bad_header_names_the_file(tmp_path: Path) -> None:
    assert read_weight_counts(tmp_path) is None
    (tmp_path / "other.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert read_weight_counts(tmp_path) is None  # transformers would not load it either
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(WeightsHeaderError, match=r"model\.safetensors.*not JSON"):
        read_weight_counts(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x50\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WeightsHeaderError, match="cut short"):
        read_weight_counts(tmp_path)
    raw = json.dumps({"t": {"dtype": "BF16", "shape": ["a"]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(WeightsHeaderError, match=r"model\.safetensors: tensor 't' has no shape"):
        read_weight_counts(tmp_path)


def test_buffers_stored_in_old_checkpoints_are_not_counted(tmp_path: Path) -> None:
    block = {
        "h.0.attn.c_attn.weight": [64, 192],
        "h.0.attn.c_attn.bias": [192],
        "h.0.attn.bias": [1, 1, 128, 128],  # GPT-2's causal mask, a buffer
        "h.0.attn.masked_bias": [],
        "h.0.attn.rotary_emb.inv_freq": [16],
    }
    _safetensors(tmp_path / "model.safetensors", block)
    counts = read_weight_counts(tmp_path)
    assert counts is not None
    assert counts.parameters == 64 * 192 + 192


def test_a_guessed_layout_lets_the_trainer_match_the_requested_lora_targets() -> None:
    from kubetune.planning.methods import lora_targets

    arch = model_arch_from_config(OUTSIDE, origin="test")  # no headers: Llama-like guess
    assert lora_targets(arch, ["c_fc", "c_proj"]) == ("c_fc", "c_proj")
