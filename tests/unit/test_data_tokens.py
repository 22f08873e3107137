"""Token counts with the model's own tokenizer (kubetune.data.tokens) and what the plan makes
of them: tokenizer.json files built here with the `tokenizers` library, counts checked
against the tokenizer's own output (and, for a word-level vocabulary, against word counts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.data import DataError, Example, parse_jsonl, summarize
from kubetune.data.tokens import (
    find_tokenizer,
    load_tokenizer,
    model_directory,
    render_chat_template,
)
from kubetune.planning.job import build_plan, known_model_config
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QWEN = known_model_config("hf://Qwen/Qwen2-0.5B")
GPU = (24.0, "GPU memory 24 GiB from a test")


def word_level(out: Path, words: list[str], **config: Any) -> Path:
    """A tokenizer with one token per whitespace-separated word (and per special token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", **config})
    )
    return out


def bpe(out: Path, corpus: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on `corpus`, as tests/tinymodel.py builds one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
            | {"chat_template": TEMPLATE}
        )
    )
    return tok


WORDS = [
    "what",
    "is",
    "two",
    "and",
    "plus",
    "four",
    "the",
    "answer",
    "capital",
    "of",
    "france",
    "paris",
]


def test_a_word_level_tokenizer_counts_bos_prompt_completion_and_eos(tmp_path: Path) -> None:
    tokenizer, why = load_tokenizer(word_level(tmp_path, WORDS))
    assert tokenizer is not None, why
    rows = [
        Example(1, "what is two plus two", "four"),  # 1 + 5 + 1 + 1
        Example(2, "", "the answer is four and paris"),  # 1 + 0 + 6 + 1
        Example(3, "", "four four"),  # 1 + 0 + 2 + 1
    ]
    assert tokenizer.example_lengths(rows, "t.jsonl") == [8, 8, 4]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_bpe_counts_are_the_tokenizers_own(tmp_path: Path) -> None:
    corpus = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(200)]
    tok = bpe(tmp_path, corpus)
    tokenizer, _ = find_tokenizer(f"file://{tmp_path}")
    assert tokenizer is not None
    rows = [Example(i + 1, f"Question {i}: what is {i} plus {i}?", f" {2 * i}.") for i in range(9)]
    rows.append(Example(10, "", "Zebra ünïcode 漢字 text the BPE never saw"))

    def own(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids) if text else 0

    expected = [1 + own(ex.prompt) + own(ex.target) + 1 for ex in rows]
    assert tokenizer.example_lengths(rows, "t.jsonl") == expected
    assert expected[-1] > round(len(rows[-1].text) / 4)  # the estimate is off here


def test_chat_rows_go_through_the_chat_template(tmp_path: Path) -> None:
    tok = bpe(tmp_path, ["hello there how are you fine thanks"] * 20)
    tokenizer, _ = load_tokenizer(tmp_path)
    assert tokenizer is not None
    assert tokenizer.chat_template == TEMPLATE
    line = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"},
            ]
        }
    )
    _, [ex] = parse_jsonl(line, "c.jsonl")
    rendered = tokenizer.prompt_text(ex, "c.jsonl")
    assert rendered == "<|system|>\nbe brief</s>\n<|user|>\nhow are you</s>\n<|assistant|>\n"
    prompt_ids = tok.encode(rendered, add_special_tokens=False).ids
    assert prompt_ids.count(tok.token_to_id("<|user|>")) == 1  # special tokens stay whole
    target = len(tok.encode("fine thanks", add_special_tokens=False).ids)
    # No BOS: the template places its own special tokens.
    assert tokenizer.example_lengths([ex], "c.jsonl") == [len(prompt_ids) + target + 1]


def test_chat_template_file_wins_and_named_templates(tmp_path: Path) -> None:
    directory = word_level(tmp_path, WORDS, chat_template=[{"name": "default", "template": "D"}])
    tokenizer, _ = load_tokenizer(directory)
    assert tokenizer is not None
    assert tokenizer.chat_template == "D"
    (directory / "chat_template.jinja").write_text("J")
    tokenizer, _ = load_tokenizer(directory)
    assert tokenizer is not None
    assert tokenizer.chat_template == "J"


def test_a_template_that_refuses_a_conversation_names_the_row() -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"^c\.jsonl line 3: the model's chat template refuses"):
        render_chat_template(template, [{"role": "system", "content": "x"}], {}, "c.jsonl line 3")


def test_template_helpers_render_as_transformers_does() -> None:
    template = (
        "{% for m in messages %}{{ m | tojson }}{% if loop.first %}{% continue %}{% endif %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}\n{% endfor %}"
    )
    msgs = [{"role": "user", "content": "<b>"}, {"role": "user", "content": "é"}]
    # What transformers' render_jinja_template returns for it (trim_blocks eats the "\n").
    assert render_chat_template(template, msgs, {}, "w") == (
        '{"role": "user", "content": "<b>"}{"role": "user", "content": "é"}[é]'
    )


@pytest.mark.parametrize(
    ("files", "reason"),
    [({}, "no tokenizer.json"), ({"tokenizer.json": "{not json"}, "cannot be read")],
)
def test_no_usable_tokenizer_says_why(tmp_path: Path, files: dict[str, str], reason: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    tokenizer, why = find_tokenizer(str(tmp_path))
    assert tokenizer is None
    assert reason in why


def test_model_directory() -> None:
    assert model_directory("hf://org/name") is None
    assert model_directory("configmap://cm/config.json") is None
    assert model_directory("file:///no/such/dir") is None


def test_summary_with_tokenizer_lengths() -> None:
    train = [Example(1, "", "a"), Example(2, "", "b")]
    s = summarize(train, "t", "Text", (), 10, [3, 12])
    assert (s.token_count, s.max_tokens, s.tokens_estimated, s.overlong_count) == (15, 12, False, 1)
    assert "(the first at line 2)" in s.warnings[0]
    with pytest.raises(ValueError, match="1 token counts for 2 examples"):
        summarize(train, "t", "Text", (), None, [3])


# ---- the plan ---------------------------------------------------------------------------------


def spec(**dataset: Any) -> Any:
    # `rows` repeat (a small vocabulary): kept, as these tests count tokens, not duplicates.
    keep = {"deduplicate": {"exact": False, "near": False}}
    base = {
        "model": {"uri": "file:///models/m"},
        "dataset": {"uri": "file:///data/train.jsonl", **keep, **dataset},
    }
    return spec_from(base, "demo", "ns")


def rows(n: int, words: int = 3) -> str:
    out = [
        {
            "prompt": "what is",
            "completion": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)),
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in out)


def test_the_plan_counts_with_the_model_tokenizer(tmp_path: Path) -> None:
    assert QWEN is not None
    model = word_level(tmp_path / "m", WORDS)
    text = rows(20)
    plan = build_plan(spec(validationSplit=0.5), text, "t.jsonl", QWEN, str(model), GPU)
    # Each row: BOS + 2 + 3 + EOS = 7 tokens; half of the 20 rows are trained on.
    assert (plan.token_count, plan.token_count_estimated, plan.example_count) == (70, False, 10)
    assert plan.decision("data.tokens") is not None
    assert not any("estimated" in w for w in plan.warnings)
    estimated = build_plan(spec(validationSplit=0.5), text, "t.jsonl", QWEN, "hf://x/y", GPU)
    assert estimated.token_count_estimated is True
    assert estimated.decision("data.tokens") is None
    assert any("estimated from the text (the model is not local)" in w for w in estimated.warnings)
    via = build_plan(spec(), text, "t.jsonl", QWEN, "hf://x/y", GPU, tokenizer_source=str(model))
    assert via.token_count_estimated is False


def test_overlong_rows_are_counted_and_named_or_dropped(tmp_path: Path) -> None:
    assert QWEN is not None
    model = str(word_level(tmp_path / "m", WORDS))
    text = rows(10) + rows(2, words=30)  # lines 11 and 12: 34 tokens > maxSeqLength 16
    truncated = build_plan(spec(maxSeqLength=16), text, "t.jsonl", QWEN, model, GPU)
    assert truncated.hyperparameters.sequence_length == 16
    [warning] = [w for w in truncated.warnings if "longer than the planned" in w]
    assert warning.startswith("2 of 11 training examples are longer than the planned sequence ")
    assert "t.jsonl line 11, 34 tokens: 'what is" in warning
    # The tokens the trainer trains on: the long rows truncated to 16 (one row held out).
    assert truncated.token_count in (9 * 7 + 2 * 16, 10 * 7 + 16)
    dropped = build_plan(
        spec(maxSeqLength=16, overlongRows="Drop"), text, "t.jsonl", QWEN, model, GPU
    )
    decision = dropped.decision("data.overlong")
    assert decision is not None
    assert decision.value == "2"
    assert "t.jsonl line 11" in decision.sentence
    assert decision.sentence in dropped.warnings
    assert dropped.example_count == 9  # 10 kept, 1 held out
    assert not any("longer than the planned" in w for w in dropped.warnings)


def test_drop_refuses_when_nothing_is_left(tmp_path: Path) -> None:
    assert QWEN is not None
    model = str(word_level(tmp_path / "m", WORDS))
    with pytest.raises(DataError, match=r"^t\.jsonl: all 3 examples are longer than"):
        build_plan(
            spec(maxSeqLength=16, overlongRows="Drop"), rows(3, 30), "t.jsonl", QWEN, model, GPU
        )


def test_kubetune_plan_reads_a_local_model_tokenizer(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kubetune.cli import main

    assert QWEN is not None
    model = word_level(tmp_path / "model", WORDS)
    (model / "config.json").write_text(json.dumps(QWEN))
    data = tmp_path / "train.jsonl"
    data.write_text(rows(20))
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "t"},
                "spec": {
                    "model": {"uri": f"file://{model}"},
                    "dataset": {"uri": f"file://{data}"},
                    "planOnly": True,
                },
            }
        )
    )
    result = CliRunner().invoke(main, ["plan", str(job), "-o", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["tokenCountEstimated"] is False
    assert "no tokenizer was available" not in result.output
    assert plan["tokenCount"] == 7 * plan["exampleCount"]
    table = CliRunner().invoke(main, ["plan", str(job)]).output
    assert f"{plan['tokenCount']:,} tokens (model tokenizer)" in table
    (model / "tokenizer.json").unlink()
    table = CliRunner().invoke(main, ["plan", str(job)]).output
    assert "tokens (estimated: characters / 4)" in table
    assert "estimated from the text (no tokenizer.json in the model)" in table
