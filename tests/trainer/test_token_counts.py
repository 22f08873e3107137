"""The planner's token counts (kubetune.data.tokens, the `tokenizers` library and jinja2, no
transformers) against what the trainer encodes with transformers' own tokenizer and chat
template: equal for every row, so the planned sequence length is the trainer's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.data import Example, parse_jsonl
from kubetune.data.tokens import load_tokenizer
from kubetune.trainer.data import TokenizedDataset, drop_overlong, encoded_length

pytestmark = pytest.mark.trainer

ROWS = [
    {"prompt": "Define term 3: ", "completion": "Term 3 means item 3."},
    {"prompt": "", "completion": "Only a completion, with ünïcode and 漢字."},
    {"text": "Plain text row.\nWith a second line and  double  spaces."},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What does term 7 mean?"},
            {"role": "assistant", "content": "Item 7."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi </s> <|assistant|> in the text"},
            {"role": "assistant", "content": "Special tokens in content stay special."},
        ]
    },
]


def examples() -> list[Example]:
    out: list[Example] = []
    for i, row in enumerate(ROWS, start=1):
        _, [ex] = parse_jsonl(json.dumps(row), "rows.jsonl")
        out.append(Example(i, ex.prompt, ex.target, ex.messages))
    return out


def gpt2_like(out: Path) -> Path:
    """A byte-level BPE tokenizer saved by transformers, without a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [json.dumps(r) for r in ROWS] * 5,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return out


def builtin() -> Path:
    from kubetune.trainer.basemodel import resolve_model

    return Path(resolve_model("hf://kubetune/tiny-llama-en"))


@pytest.mark.parametrize("which", ["builtin-with-chat-template", "gpt2-like-without"])
def test_planner_counts_equal_the_trainers_encoding(which: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = builtin() if which.startswith("builtin") else gpt2_like(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(directory)
    planner, why = load_tokenizer(directory)
    assert planner is not None, why
    assert (planner.chat_template is not None) == (hf.chat_template is not None)
    rows = examples()
    assert planner.example_lengths(rows, "rows.jsonl") == [encoded_length(e, hf) for e in rows]


def test_drop_overlong_and_truncation(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(builtin())
    rows = examples()
    lengths = [encoded_length(e, hf) for e in rows]
    limit = sorted(lengths)[2]
    kept, dropped = drop_overlong(rows, hf, limit)
    assert [e.line for e in kept] == [
        e.line for e, n in zip(rows, lengths, strict=True) if n <= limit
    ]
    assert len(dropped) == sum(n > limit for n in lengths) > 0
    truncated = TokenizedDataset(rows, hf, limit)
    assert max(len(r["input_ids"]) for r in truncated.rows) == limit
