"""Architecture parsing and exact parameter counts against the published counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.planning import (
    ModelConfigError,
    bundled_architectures,
    load_model_arch,
    model_arch_from_config,
)

pytestmark = pytest.mark.unit

# Published parameter counts (model cards / `model.num_parameters()` of the HF checkpoints).
PUBLISHED = [
    ("gpt2", "gpt2", 124_439_808),
    ("opt-125m", "opt", 125_239_296),
    ("pythia-160m", "gpt_neox", 162_322_944),
    ("opt-350m", "opt", 331_196_416),
    ("qwen2-0.5b", "qwen2", 494_032_768),
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
        ('{"model_type": "t5"}', "unsupported model_type 't5'"),
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
