"""Self-rewrite and augmentation on the tiny local model (its text is gibberish; these tests
check the mechanics): accepted rewrites are less surprising to the base model than the
originals and the stats agree with an independent recomputation; the input is unchanged;
a strict overlap keeps the original. Augmentation runs the stated number of generations per
example, is deterministic for a seed, uses the model it is given (loaded from its own
directory), and never returns an original."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune.data import Example
from tests.tinymodel import random_rows, rows

pytestmark = pytest.mark.trainer

# Words the tiny model's (degenerate) greedy rewrites are made of: "499. thing 499. ..."
# An original with half its words among them keeps an overlap of 0.5 in a rewrite.
SHARED = ["499 thing cedar juniper.", "Thing 499 brook heath.", "499, thing: amber dune."]


def _load(path: Path) -> tuple[Any, Any]:
    from kubetune.trainer.remedies.rewrite import load_augmentation_model

    return load_augmentation_model(f"file://{path}")


def _examples() -> list[Example]:
    surprising = [
        Example(i + 1, r["prompt"], r["completion"]) for i, r in enumerate(random_rows(4, 7, 6))
    ]
    shared = [Example(10 + i, f"Define term {i}: ", t) for i, t in enumerate(SHARED)]
    text_row = [Example(20, "", "Term 5 refers to object 5. Name 5 is thing 5.")]
    return surprising + shared + text_row


def _perplexity(model: Any, tok: Any, ex: Example) -> float:
    """Independently: exp(mean NLL) of the target's tokens and EOS after BOS + prompt, one
    unpadded row at a time."""
    import torch

    prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([[tok.bos_token_id, *prompt, *target]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = 1 + len(prompt)
    nll = [-logp[start + j - 1, t].item() for j, t in enumerate(target)]
    return math.exp(sum(nll) / len(nll))


def test_rewrites_lower_the_base_models_perplexity(tiny_model: Path) -> None:
    from kubetune.trainer.remedies.rewrite import rewrite_examples, word_overlap

    model, tok = _load(tiny_model)
    examples = _examples()
    snapshot = [(e.line, e.prompt, e.target, e.messages) for e in examples]
    out, stats = rewrite_examples(
        model, tok, examples, "cpu", min_overlap=0.0, max_length_ratio=2.0, seed=0
    )
    # The input is untouched; the output keeps each example's line and prompt.
    assert [(e.line, e.prompt, e.target, e.messages) for e in examples] == snapshot
    assert [(e.line, e.prompt) for e in out] == [(e.line, e.prompt) for e in examples]
    accepted = [i for i, (a, b) in enumerate(zip(examples, out, strict=True)) if a != b]
    assert len(accepted) >= 4, stats
    assert stats["rewritten"] == len(accepted)
    assert stats["kept"] == len(examples) - len(accepted)
    assert sum(stats["reasons"].values()) == len(examples)
    assert stats["reasons"].get("accepted", 0) == len(accepted)

    before = [_perplexity(model, tok, e) for e in examples]
    after = [_perplexity(model, tok, e) for e in out]
    for i in accepted:
        assert out[i].target.strip()
        assert after[i] < before[i], (examples[i].target, out[i].target)
        n_orig = len(tok(examples[i].target, add_special_tokens=False)["input_ids"])
        assert len(tok(out[i].target, add_special_tokens=False)["input_ids"]) <= 2 * n_orig
    assert sum(after[i] for i in accepted) < sum(before[i] for i in accepted)
    assert stats["meanPerplexityBefore"] == pytest.approx(sum(before) / len(before), rel=1e-4)
    assert stats["meanPerplexityAfter"] == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert stats["meanPerplexityAfter"] < stats["meanPerplexityBefore"]
    # The "shared" originals kept some of their words in their rewrites.
    assert any(word_overlap(examples[i].target, out[i].target) >= 0.5 for i in accepted)


def test_a_strict_overlap_keeps_the_original(tiny_model: Path) -> None:
    from kubetune.trainer.remedies.rewrite import rewrite_examples, word_overlap

    model, tok = _load(tiny_model)
    examples = [Example(10 + i, f"Define term {i}: ", t) for i, t in enumerate(SHARED)]
    loose, loose_stats = rewrite_examples(
        model, tok, examples, "cpu", min_overlap=0.3, max_length_ratio=2.0, seed=0
    )
    changed = [i for i in range(len(examples)) if loose[i] != examples[i]]
    assert changed, loose_stats  # at 0.3 the rewrites (which drop words) are taken ...
    assert all(word_overlap(examples[i].target, loose[i].target) < 1.0 for i in changed)
    strict, stats = rewrite_examples(
        model, tok, examples, "cpu", min_overlap=1.0, max_length_ratio=2.0, seed=0
    )
    assert strict == examples  # ... at 1.0 they are not
    assert [e.target for e in strict] == SHARED
    assert stats["rewritten"] == 0
    assert stats["kept"] == len(examples)
    assert stats["reasons"]["lowOverlap"] >= len(changed)
    assert stats["meanPerplexityAfter"] == pytest.approx(stats["meanPerplexityBefore"])


def test_max_examples_and_chat_rows(tiny_model: Path) -> None:
    from kubetune.trainer.remedies.rewrite import rewrite_examples

    model, tok = _load(tiny_model)
    chat = Example(
        1,
        "user: Define term 1:\n",
        SHARED[0],
        (("user", "Define term 1:"), ("assistant", SHARED[0])),
    )
    examples = [chat, *_examples()]
    out, stats = rewrite_examples(
        model, tok, examples, "cpu", min_overlap=0.0, max_length_ratio=2.0, seed=0, max_examples=1
    )
    assert out[1:] == examples[1:]
    assert stats["tried"] == 1
    assert stats["reasons"]["overMaxExamples"] == len(examples) - 1
    assert stats["rewritten"] + stats["kept"] == len(examples)
    if out[0] != chat:
        assert out[0].messages[:-1] == chat.messages[:-1]
        assert out[0].messages[-1] == ("assistant", out[0].target)
    assert chat.messages[-1] == ("assistant", SHARED[0])


# ---- augmentation -------------------------------------------------------------------------------


def _augment(model: Any, tok: Any, examples: list[Example], seed: int, **kw: Any) -> Any:
    from kubetune.trainer.remedies.rewrite import augment_examples

    args: dict[str, Any] = {"paraphrases": 2, "back_translations": 1, "pivot_language": "French"}
    return augment_examples(model, tok, examples, "cpu", seed=seed, **{**args, **kw})


def _pc(n: int) -> list[Example]:
    return [Example(i + 1, r["prompt"], r["completion"]) for i, r in enumerate(rows(n))]


def test_augmentation_runs_the_stated_generations_and_returns_only_new_rows(
    tiny_model: Path,
) -> None:
    model, tok = _load(tiny_model)
    examples = _pc(5)
    calls: list[int] = []
    generate = model.generate

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(int(kw["input_ids"].shape[0]))
        return generate(*args, **kw)

    model.generate = spy
    new, stats = _augment(model, tok, examples, 0, paraphrases=3, back_translations=2)
    n, p, b = len(examples), 3, 2
    # One generation per paraphrase, two per back-translation (none of the pivots was empty
    # here, or the stats say so).
    assert stats["asked"] == n * (p + b)
    assert stats["paraphrases"]["asked"] == n * p
    assert stats["backTranslations"]["asked"] == n * b
    assert sum(calls) == stats["generations"]
    assert stats["generations"] == n * (p + b) + n * b - stats["dropped"].get("emptyPivot", 0)
    assert stats["produced"] == len(new)
    assert stats["produced"] + sum(stats["dropped"].values()) == stats["asked"]
    assert stats["paraphrases"]["produced"] + stats["backTranslations"]["produced"] == len(new)
    assert len(new) > 0
    # Per example at most p + b new rows, each with the example's prompt and a new target.
    originals = {" ".join(e.target.split()) for e in examples}
    for ex in examples:
        mine = [e for e in new if e.line == ex.line]
        assert len(mine) <= p + b
        assert all(e.prompt == ex.prompt for e in mine)
        assert len({e.target for e in mine}) == len(mine)  # no duplicates
    assert all(e.target.strip() for e in new)
    assert not {" ".join(e.target.split()) for e in new} & originals
    assert examples == _pc(5)  # the input is untouched


def test_augmentation_is_deterministic_for_a_seed_and_differs_across_seeds(
    tiny_model: Path,
) -> None:
    import torch

    model, tok = _load(tiny_model)
    examples = _pc(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, s1 = _augment(model, tok, examples, 7)
    # The caller's random state is left as it was.
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state does not matter
    again, s2 = _augment(model, tok, examples, 7)
    other, _ = _augment(model, tok, examples, 8)
    assert [e.target for e in first] == [e.target for e in again]
    assert s1 == s2
    assert [e.target for e in first] != [e.target for e in other]


def _second_model(tiny_model: Path, out: Path) -> Path:
    """Another tiny Llama (same tokenizer, other random weights) in its own directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    config = LlamaConfig.from_pretrained(tiny_model)
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_augmentation_uses_the_named_model(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    other_dir = _second_model(tiny_model, tmp_path / "other-model")
    base, tok = _load(tiny_model)
    other, other_tok = _load(other_dir)
    examples = _pc(3)
    from_base, _ = _augment(base, tok, examples, 3)
    from_other, stats = _augment(other, other_tok, examples, 3)
    assert [e.target for e in from_other] != [e.target for e in from_base]
    # The same rows again from the weights in that directory, loaded another way.
    direct = AutoModelForCausalLM.from_pretrained(other_dir)
    again, _ = _augment(direct, tok, examples, 3)
    assert [e.target for e in again] == [e.target for e in from_other]
    assert stats["produced"] == len(from_other)


def test_augmentation_drops_copies_of_the_original_and_repeats(tiny_model: Path) -> None:
    """A model that can only echo the original's response yields no new rows."""
    import torch

    _, tok = _load(tiny_model)
    examples = _pc(2)

    class Echo:
        training = False
        config = None

        def eval(self) -> None:
            pass

        def generate(self, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
            row = tok(" Term 0 means item 0. ", add_special_tokens=False)["input_ids"]
            tail = torch.tensor([row] * input_ids.shape[0])
            return torch.cat([input_ids, tail], dim=1)

    new, stats = _augment(Echo(), tok, examples, 0, paraphrases=3, back_translations=1)
    # Example 0: every output is its original. Example 1: the first is new, the rest repeats.
    assert [(e.line, e.target) for e in new] == [(2, "Term 0 means item 0.")]
    assert stats["dropped"] == {"sameAsOriginal": 4, "duplicate": 3}
    assert stats["produced"] + sum(stats["dropped"].values()) == stats["asked"] == 8


def test_load_augmentation_model_needs_a_model_directory(tmp_path: Path) -> None:
    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.remedies.rewrite import load_augmentation_model

    with pytest.raises(TrainerConfigError, match=r"config\.json"):
        load_augmentation_model(str(tmp_path))
