"""JSONL parsing and validation (formats, errors with source and line) and the dataset
summary (duplicates, leakage, over-long rows, token estimate)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.data import DataError, Example, parse_jsonl, summarize
from kubetune.data.stats import CHARS_PER_TOKEN, estimate_tokens

pytestmark = pytest.mark.unit

SRC = "data/train.jsonl"


def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---- parse_jsonl: formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt", "examples"),
    [
        (
            jsonl({"text": "first doc"}, {"text": "second doc"}),
            "Text",
            [Example(1, "", "first doc"), Example(2, "", "second doc")],
        ),
        (
            jsonl({"prompt": "Q1?", "completion": " A1."}, {"prompt": "", "completion": "A2"}),
            "PromptCompletion",
            [Example(1, "Q1?", " A1."), Example(2, "", "A2")],
        ),
        (
            jsonl(
                chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
                chat(("user", "2+2?"), ("assistant", "4")),
            ),
            "Chat",
            [
                Example(1, "system: Be brief.\nuser: Hi\n", "Hello!"),
                Example(2, "user: 2+2?\n", "4"),
            ],
        ),
        # A single assistant message is a valid chat row with an empty prompt.
        (jsonl(chat(("assistant", "alone"))), "Chat", [Example(1, "", "alone")]),
        (
            jsonl(chat(("user", "q"), ("tool", "t"), ("assistant", "a"))),
            "Chat",
            [Example(1, "user: q\ntool: t\n", "a")],
        ),
        # Extra fields are ignored; the format comes from the known ones.
        (
            jsonl({"text": "doc", "id": 7, "meta": {"x": 1}}),
            "Text",
            [Example(1, "", "doc")],
        ),
        # Windows line endings and no final newline.
        ('{"text": "a"}\r\n{"text": "b"}', "Text", [Example(1, "", "a"), Example(2, "", "b")]),
        # Non-ASCII text survives.
        (jsonl({"text": "Grüße, 世界"}), "Text", [Example(1, "", "Grüße, 世界")]),
    ],
)
def test_parse_formats(text: str, fmt: str, examples: list[Example]) -> None:
    assert parse_jsonl(text, SRC) == (fmt, examples)
    # Bytes are read as UTF-8 with the same result.
    assert parse_jsonl(text.encode("utf-8"), SRC) == (fmt, examples)


def test_example_text_is_prompt_then_target() -> None:
    _, [ex] = parse_jsonl(jsonl({"prompt": "P:", "completion": " C"}), SRC)
    assert ex.text == "P: C"


def test_blank_lines_are_skipped_and_line_numbers_stay_true() -> None:
    text = '\n   \n{"text": "a"}\n\n\t\n{"text": "b"}\n\n'
    fmt, examples = parse_jsonl(text, SRC)
    assert fmt == "Text"
    assert [e.line for e in examples] == [3, 6]
    bad = '\n\n{"text": "a"}\n\n{"text": 5}\n'
    with pytest.raises(DataError, match=r"line 5: field 'text' must be a string, not int"):
        parse_jsonl(bad, SRC)


@pytest.mark.parametrize(
    ("forced", "text", "examples"),
    [
        ("Text", jsonl({"text": "x"}), [Example(1, "", "x")]),
        ("PromptCompletion", jsonl({"prompt": "p", "completion": "c"}), [Example(1, "p", "c")]),
        ("Chat", jsonl(chat(("user", "u"), ("assistant", "a"))), [Example(1, "user: u\n", "a")]),
    ],
)
def test_forced_format_that_matches(forced: Any, text: str, examples: list[Example]) -> None:
    assert parse_jsonl(text, SRC, forced) == (forced, examples)


@pytest.mark.parametrize(
    ("forced", "text", "match"),
    [
        ("Chat", jsonl({"text": "x"}), r"line 1: this row is Text but the file started as Chat"),
        (
            "Text",
            jsonl({"prompt": "p", "completion": "c"}),
            r"line 1: this row is PromptCompletion but the file started as Text",
        ),
        (
            "PromptCompletion",
            jsonl({"other": 1}),
            r"line 1: this row is of no known format but the file started as PromptCompletion",
        ),
    ],
)
def test_forced_format_that_does_not_match(forced: Any, text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_jsonl(text, SRC, forced)


# ---- parse_jsonl: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # Mixed formats: the later row is named.
        (
            jsonl({"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}),
            r"line 3: this row is PromptCompletion but the file started as Text; "
            r"use one format per file",
        ),
        (
            jsonl({"prompt": "p", "completion": "c"}, chat(("assistant", "a"))),
            r"line 2: this row is Chat but the file started as PromptCompletion",
        ),
        (jsonl({"text": "a"}, {"foo": "b"}), r"line 2: this row is of no known format"),
        # Broken JSON and non-objects.
        ('{"text": "a"}\n{"text": "b"\n', r"line 2: not valid JSON \(.* at column \d+\)"),
        ("{'text': 'single quotes'}\n", r"line 1: not valid JSON"),
        ('{"text": "a"}\n[1, 2]\n', r"line 2: each line must be a JSON object, not list"),
        ('"just a string"\n', r"line 1: each line must be a JSON object, not str"),
        ("42\n", r"line 1: each line must be a JSON object, not int"),
        ("null\n", r"line 1: each line must be a JSON object, not NoneType"),
        # No recognisable format in the first row.
        (jsonl({"content": "x"}), r"line 1: cannot tell the format"),
        # Missing or wrong fields.
        (jsonl({"prompt": "p"}), r"line 1: missing field 'completion'"),
        (jsonl({"completion": "c"}), r"line 1: missing field 'prompt'"),
        (jsonl({"prompt": 1, "completion": "c"}), r"line 1: field 'prompt' must be a string"),
        (jsonl({"text": None}), r"line 1: field 'text' must be a string, not NoneType"),
        # Empty content.
        (jsonl({"text": "a"}, {"text": "   "}), r"line 2: field 'text' is empty"),
        (jsonl({"text": ""}), r"line 1: field 'text' is empty"),
        (
            jsonl({"prompt": "p", "completion": " \n"}),
            r"line 1: field 'completion' is empty; there is nothing to learn",
        ),
        # Chat structure.
        (jsonl({"messages": []}), r"line 1: 'messages' must be a non-empty list"),
        (jsonl({"messages": "hi"}), r"line 1: 'messages' must be a non-empty list"),
        (jsonl({"messages": ["hi"]}), r"line 1: messages\[0\] needs a string 'content'"),
        (
            jsonl({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
            r"line 1: messages\[0\] needs a string 'content'",
        ),
        (
            jsonl(chat(("user", "q"), ("bot", "a"))),
            r"line 1: messages\[1\]\.role must be one of \['assistant', 'system', 'tool', "
            r"'user'\], not 'bot'",
        ),
        (
            jsonl({"messages": [{"content": "q"}]}),
            r"line 1: messages\[0\]\.role must be one of .*, not None",
        ),
        (
            jsonl(chat(("user", "q"), ("assistant", "a")), chat(("assistant", "a"), ("user", "q"))),
            r"line 2: the last message must be the assistant's reply",
        ),
        (
            jsonl(chat(("system", "s"))),
            r"line 1: the last message must be the assistant's reply",
        ),
    ],
)
def test_parse_errors_name_source_and_line(text: str, match: str) -> None:
    with pytest.raises(DataError, match=r"^data/train\.jsonl " + match):
        parse_jsonl(text, SRC)


@pytest.mark.parametrize("text", ["", "\n", "  \n\n\t\n", b"", b"\n\n"])
def test_empty_dataset(text: str | bytes) -> None:
    with pytest.raises(DataError, match=r"^data/train\.jsonl: the dataset is empty"):
        parse_jsonl(text, SRC)


@pytest.mark.parametrize("forced", ["Text", "PromptCompletion", "Chat"])
def test_empty_dataset_with_a_forced_format(forced: Any) -> None:
    with pytest.raises(DataError, match="the dataset is empty"):
        parse_jsonl("\n", SRC, forced)


@pytest.mark.parametrize(
    ("data", "line", "byte"),
    [
        (b'{"text": "\xff"}\n', 1, 10),
        (b'{"text": "a"}\n{"text": "b"}\n{"text": "\xc3("}\n', 3, 38),
        (b'\n\n{"text": "a"}\n\xe2\x82\n', 4, 16),
    ],
)
def test_invalid_utf8_names_the_line(data: bytes, line: int, byte: int) -> None:
    with pytest.raises(DataError) as info:
        parse_jsonl(data, SRC)
    assert str(info.value) == (
        f"{SRC} line {line}: not valid UTF-8 (byte {byte}); save the file as UTF-8"
    )


def test_errors_are_value_errors() -> None:
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_inside_strings(sep: str) -> None:
    text = json.dumps({"text": f"a{sep}b"}, ensure_ascii=False) + "\n"
    text += json.dumps({"text": "c"}) + "\n"
    _, examples = parse_jsonl(text, SRC)
    assert examples == [Example(1, "", f"a{sep}b"), Example(2, "", "c")]


# ---- summarize --------------------------------------------------------------------------------


def examples(*texts: str) -> list[Example]:
    return [Example(i + 1, "", t) for i, t in enumerate(texts)]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 1), ("a", 1), ("abcd", 1), ("abcdef", 2), ("x" * 400, 100), ("x" * 4002, 1000)],
)
def test_token_estimate(text: str, tokens: int) -> None:
    assert CHARS_PER_TOKEN == 4.0
    assert estimate_tokens(text) == tokens


def test_summary_counts() -> None:
    train = examples("a" * 40, "b" * 80, "c" * 4)
    s = summarize(train, SRC, "Text")
    assert s.format == "Text"
    assert s.example_count == 3
    assert s.token_count == 10 + 20 + 1
    assert s.max_tokens == 20
    assert s.tokens_estimated is True
    assert s.validation_count == 0
    assert (s.duplicate_count, s.leakage_count, s.overlong_count) == (0, 0, 0)
    assert s.warnings == []


def test_summary_counts_prompt_and_target() -> None:
    train = [Example(1, "p" * 20, "t" * 20), Example(2, "", "u" * 8)]
    s = summarize(train, SRC, "PromptCompletion")
    assert s.token_count == 10 + 2
    assert s.max_tokens == 10


@pytest.mark.parametrize(
    ("texts", "duplicates"),
    [
        (["a", "b", "c"], 0),
        (["a", "b", "a"], 1),
        (["a", "a", "b", "a", "b", "c"], 3),
        (["x"], 0),
    ],
)
def test_duplicates(texts: list[str], duplicates: int) -> None:
    s = summarize(examples(*texts), SRC, "Text")
    assert s.duplicate_count == duplicates
    dup_warnings = [w for w in s.warnings if "duplicates" in w]
    if duplicates:
        assert dup_warnings == [
            f"{duplicates} of {len(texts)} training examples are exact duplicates; "
            "they are trained on more often than the rest"
        ]
    else:
        assert dup_warnings == []


def test_duplicates_compare_prompt_and_target_together() -> None:
    train = [Example(1, "Q: ", "yes"), Example(2, "Q: ", "no"), Example(3, "Q: ", "yes")]
    assert summarize(train, SRC, "PromptCompletion").duplicate_count == 1


@pytest.mark.parametrize("n", [2, 3, 50])
def test_all_duplicates_is_an_error(n: int) -> None:
    with pytest.raises(DataError, match=rf"^{SRC}: all {n} examples are the same text"):
        summarize(examples(*["same"] * n), SRC, "Text")


def test_leakage() -> None:
    train = examples("a", "b", "c", "d")
    val = [Example(1, "", "b"), Example(2, "", "z"), Example(3, "", "d")]
    s = summarize(train, SRC, "Text", val)
    assert s.validation_count == 3
    assert s.leakage_count == 2
    assert (
        "2 of 3 validation examples also occur in the training data; "
        "eval loss will look better than it is"
    ) in s.warnings


def test_no_leakage_without_overlap() -> None:
    s = summarize(examples("a", "b"), SRC, "Text", iter([Example(1, "", "c")]))
    assert s.leakage_count == 0
    assert s.validation_count == 1
    assert s.warnings == []


@pytest.mark.parametrize("val", [["a"], ["a", "b"], ["b", "b", "a"]])
def test_all_validation_leaked_is_an_error(val: list[str]) -> None:
    with pytest.raises(DataError, match=rf"^{SRC}: every validation example also occurs"):
        summarize(examples("a", "b", "c"), SRC, "Text", examples(*val))


@pytest.mark.parametrize(
    ("lengths", "max_seq", "overlong"),
    [
        ([64, 68, 200], None, 0),
        ([64, 68, 200], 16, 2),  # 16 tokens = 64 chars is not over; 17 and 50 are
        ([64, 68, 200], 50, 0),
        ([64, 68, 200], 49, 1),
        ([400, 400, 8], 1000, 0),
    ],
)
def test_overlong(lengths: list[int], max_seq: int | None, overlong: int) -> None:
    train = examples(*[chr(ord("a") + i) * n for i, n in enumerate(lengths)])
    s = summarize(train, SRC, "Text", (), max_seq)
    assert s.overlong_count == overlong
    long_warnings = [w for w in s.warnings if "longer than maxSeqLength" in w]
    if overlong:
        first = next(ex.line for ex in train if len(ex.text) / 4 > (max_seq or 0))
        assert long_warnings == [
            f"{SRC}: {overlong} examples are longer than maxSeqLength {max_seq} "
            f"(estimated; the first at line {first}) and will be truncated"
        ]
    else:
        assert long_warnings == []


def test_summary_of_parsed_chat() -> None:
    fmt, train = parse_jsonl(
        jsonl(
            chat(("user", "What is 2+2?"), ("assistant", "4")),
            chat(("user", "Capital of France?"), ("assistant", "Paris")),
            chat(("user", "What is 2+2?"), ("assistant", "4")),
        ),
        SRC,
    )
    s = summarize(train, SRC, fmt)
    assert s.format == "Chat"
    assert s.example_count == 3
    assert s.duplicate_count == 1
    assert s.token_count == sum(estimate_tokens(e.text) for e in train)
