"""The built-in base models: tokenizer, pretraining, and the build-once cache (with a tiny
recipe so the whole file runs in well under a minute on 2 CPU cores)."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer import basemodel

pytestmark = pytest.mark.trainer

TINY = replace(
    basemodel.BUILTIN_MODELS["tiny-llama-en"],
    name="tiny-test",
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    vocab_size=320,
    max_positions=64,
    steps=25,
    seq_len=32,
    batch_size=4,
    warmup_steps=3,
    expected_seconds=2,
)
TINY_URI = basemodel.BUILTIN_PREFIX + TINY.name
SAMPLE = "The river winds slowly across the flat land toward the sea."


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(basemodel.BUILTIN_MODELS, TINY.name, TINY)


def test_tokenizer_round_trip_and_special_tokens() -> None:
    tok = basemodel.build_tokenizer(basemodel.corpus_text("general-en.txt"), 600)
    assert len(tok) <= 600
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE
    # Byte-level: text the corpus never had still round-trips.
    odd = "Zyx café 42 ✓"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tok.convert_ids_to_tokens(list(range(4))) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok(SAMPLE)["input_ids"] == ids  # adds no special tokens by itself


def test_chat_template() -> None:
    tok = basemodel.build_tokenizer(basemodel.corpus_text("general-en.txt"), 600)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Water falling from clouds."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.</s>\n<|user|>\nWhat is rain?</s>\n"
        "<|assistant|>\nWater falling from clouds.</s>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|user|>\nWhat is rain?</s>\n<|assistant|>\n")
    # The role markers are single tokens.
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for marker in basemodel.ROLE_TOKENS:
        assert tok.convert_tokens_to_ids(marker) in ids


def test_pretrain_lowers_the_loss_and_is_deterministic(tmp_path: Path) -> None:
    first = basemodel.pretrain(tmp_path / "a", steps=25, seed=3, recipe=TINY, log=lambda _: None)
    assert first["last_loss"] < first["first_loss"] - 0.5, first
    assert first["heldout_loss"] < first["first_loss"], first
    again = basemodel.pretrain(tmp_path / "b", steps=25, seed=3, recipe=TINY, log=lambda _: None)
    assert again["last_loss"] == first["last_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    other = basemodel.pretrain(tmp_path / "c", steps=25, seed=4, recipe=TINY, log=lambda _: None)
    assert other["last_loss"] != first["last_loss"]


@pytest.mark.usefixtures("tiny_registered")
def test_resolve_builds_once_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stale = tmp_path / f".tiny-test-{basemodel.recipe_hash(TINY)}.tmp-dead"
    stale.mkdir(parents=True)
    messages: list[str] = []
    path = basemodel.resolve_model(TINY_URI, cache_dir=tmp_path, log=messages.append)
    assert path.parent == tmp_path
    assert path.name == f"tiny-test-{basemodel.recipe_hash(TINY)}"
    assert any("building the built-in base model tiny-test once" in m for m in messages)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    meta = json.loads((path / basemodel.RECIPE_FILE).read_text())
    assert meta["metrics"]["last_loss"] < meta["metrics"]["first_loss"]

    # The second call reuses the directory: nothing is rebuilt or rewritten.
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args: Any, **kwargs: Any) -> dict[str, float]:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(basemodel, "pretrain", no_rebuild)
    assert basemodel.resolve_model(TINY_URI, cache_dir=tmp_path, log=messages.append) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings
    assert tok.eos_token == "</s>"
    assert tok.chat_template
    ids = tok("The river", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    # The torch-free config a planner reads agrees with the built config.json.
    built = json.loads((path / "config.json").read_text())
    for key, value in basemodel.builtin_model_config(TINY_URI).items():
        if key != "torch_dtype":
            assert built[key] == value, key


def test_recipe_hash_tracks_every_setting() -> None:
    base = basemodel.recipe_hash(TINY)
    assert basemodel.recipe_hash(replace(TINY, steps=26)) != base
    assert basemodel.recipe_hash(replace(TINY, hidden_size=48)) != base
    assert basemodel.recipe_hash(replace(TINY, seed=1)) != base
    assert basemodel.recipe_hash(replace(TINY, expected_seconds=99)) == base


def test_ids_and_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert basemodel.is_builtin("hf://kubetune/tiny-llama-en")
    assert not basemodel.is_builtin("hf://Qwen/Qwen2-0.5B")
    with pytest.raises(basemodel.UnknownBuiltinModel, match="tiny-llama-en"):
        basemodel.resolve_model("hf://kubetune/no-such-model", cache_dir=tmp_path)
    monkeypatch.setenv("KUBETUNE_MODEL_CACHE", str(tmp_path / "models"))
    assert basemodel.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("KUBETUNE_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert basemodel.default_cache_dir() == tmp_path / "xdg" / "kubetune" / "models"


def _resolve_in_child(cache_dir: str, builds: str, result: str, barrier: Any) -> None:
    """One torchrun-like rank: register the tiny recipe, count builds, resolve."""
    basemodel.BUILTIN_MODELS[TINY.name] = TINY
    real_pretrain = basemodel.pretrain

    def counting(*args: Any, **kwargs: Any) -> dict[str, float]:
        with open(builds, "a") as fh:
            fh.write("build\n")
        return real_pretrain(*args, **kwargs)

    setattr(basemodel, "pretrain", counting)  # noqa: B010
    barrier.wait(timeout=60)
    path = basemodel.resolve_model(TINY_URI, cache_dir=Path(cache_dir), log=lambda _: None)
    Path(result).write_text(str(path))


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    cache, builds = tmp_path / "cache", tmp_path / "builds.txt"
    procs = [
        ctx.Process(
            target=_resolve_in_child,
            args=(str(cache), str(builds), str(tmp_path / f"result-{i}"), barrier),
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = {(tmp_path / f"result-{i}").read_text() for i in range(2)}
    assert len(results) == 1
    assert builds.read_text().splitlines() == ["build"]
    assert (Path(results.pop()) / basemodel.RECIPE_FILE).is_file()
