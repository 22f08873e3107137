"""Fuzz the data loader (kubetune.data.parse_jsonl and summarize) with hypothesis: any bytes
or text give examples or a DataError whose message starts with the source and names a line
that exists; never another exception, never an empty result.

`KUBETUNE_FUZZ_EXAMPLES` sets the examples per property (see test_fuzz_api.py)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.data import DataError, parse_jsonl, summarize

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOURCE = "configmap://d/train.jsonl"

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["user", "assistant", "system", "tool", "", " "])
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": SCALARS}
)
ROW = st.one_of(
    st.fixed_dictionaries({"text": SCALARS}),
    st.fixed_dictionaries({"prompt": SCALARS, "completion": SCALARS}),
    st.fixed_dictionaries({"prompt": SCALARS}),
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "x"]), JSONISH),
    JSONISH,
)
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\n\n", "\u2028", " \n", "\n\ufeff"])


def _check(data: str | bytes, fmt: Any = None) -> None:
    lines = (data.decode("utf-8", "replace") if isinstance(data, bytes) else data).split("\n")
    try:
        found, examples = parse_jsonl(data, SOURCE, fmt)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(SOURCE), message
        m = re.match(re.escape(SOURCE) + r" line (\d+):", message)
        if m:
            assert 1 <= int(m.group(1)) <= len(lines), message
        return
    assert examples
    assert found in ("Text", "PromptCompletion", "Chat")
    for ex in examples:
        assert 1 <= ex.line <= len(lines)
        assert isinstance(ex.prompt, str)
        assert isinstance(ex.target, str)
        assert ex.target.strip()
    try:
        summary = summarize(examples, SOURCE, found, examples[:1], 64)
    except DataError as exc:
        error = str(exc)
    else:
        assert summary.example_count == len(examples)
        assert summary.max_tokens >= 1
        return
    assert error.startswith(SOURCE)


@FUZZ
@given(st.lists(ROW, max_size=8), LINE_ENDS)
def test_rows_of_any_shape_parse_or_raise_a_data_error(rows: list[Any], end: str) -> None:
    text = end.join(json.dumps(r, ensure_ascii=False) for r in rows)
    _check(text)
    _check(text.encode("utf-8"))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_a_data_error(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.text(max_size=300), st.sampled_from([None, "Text", "PromptCompletion", "Chat"]))
def test_arbitrary_text_parse_or_raise_a_data_error(text: str, fmt: Any) -> None:
    _check(text, fmt)


@FUZZ
@given(st.lists(ROW, min_size=1, max_size=6), st.binary(min_size=1, max_size=4))
def test_bad_bytes_in_good_rows_name_the_line(rows: list[Any], junk: bytes) -> None:
    body = "\n".join(json.dumps(r) for r in rows).encode()
    _check(body + b"\n" + junk)
    _check(junk + b"\n" + body)


@pytest.mark.parametrize("reply", ["", "  ", "\n"])
def test_a_chat_row_with_an_empty_reply_is_a_data_error(reply: str) -> None:
    # Regression found by fuzzing: it was accepted with nothing to learn (Text and
    # PromptCompletion rows with an empty target were already refused).
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
    with pytest.raises(DataError, match=r"line 2: the assistant's reply \(the last message\)"):
        parse_jsonl(
            '{"messages": [{"role": "assistant", "content": "ok"}]}\n' + json.dumps(row), SOURCE
        )


@pytest.mark.parametrize("depth", [1, 100, 100_000])
def test_deeply_nested_json_is_a_data_error_not_a_crash(depth: int) -> None:
    # Regression found by fuzzing: json.loads raised RecursionError, not a DataError.
    _check("[" * depth + "]" * depth)
    _check('{"text": "a"}\n{"text": ' + "[" * depth + "]" * depth + "}")
    if depth == 100_000:
        with pytest.raises(DataError, match=r"line 2: JSON nested too deeply"):
            parse_jsonl('{"text": "a"}\n' + "[" * depth + "]" * depth, SOURCE)


# ---- the same through the datasets library (kubetune.data.formats) ------------------------------

FUZZ_FILES = settings(
    max_examples=max(10, int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "150")) // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _check_file(data: bytes, source: str, unit: str, count: int) -> None:
    """Examples, or a DataError that starts with the source and names a row or line that
    exists (`count` of them); never another exception."""
    from kubetune.data.formats import read_dataset

    try:
        found, examples = read_dataset(data, source)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(source), message
        m = re.match(re.escape(source) + r" (line|row) (\d+):", message)
        if m:
            assert 1 <= int(m.group(2)) <= count, message
        return
    assert examples
    assert found in ("Text", "PromptCompletion", "Chat")
    for ex in examples:
        assert ex.unit == unit
        assert 1 <= ex.line <= count
        assert ex.target.strip()


@FUZZ_FILES
@given(st.lists(ROW, max_size=6), LINE_ENDS)
def test_jsonl_files_read_or_raise_a_data_error(rows: list[Any], end: str) -> None:
    text = end.join(json.dumps(r, ensure_ascii=False) for r in rows)
    _check_file(text.encode(), "configmap://d/train.jsonl", "line", text.count("\n") + 1)


@FUZZ_FILES
@given(st.binary(max_size=200), st.sampled_from(["jsonl", "json", "csv", "txt"]))
def test_arbitrary_bytes_in_any_text_format_raise_a_data_error(data: bytes, ext: str) -> None:
    # Plain text is read with universal newlines: a lone "\r" ends a line too.
    lines = data.count(b"\n") + (data.count(b"\r") if ext in ("txt", "csv") else 0) + 1
    _check_file(data, f"d.{ext}", "row" if ext == "json" else "line", lines)


@FUZZ_FILES
@given(st.lists(ROW, max_size=6))
def test_json_arrays_read_or_raise_a_data_error(rows: list[Any]) -> None:
    text = json.dumps(rows, ensure_ascii=False, indent=1)
    # Errors of the json module name a line; rows are counted from 1.
    _check_file(text.encode(), "d.json", "row", max(len(rows), text.count("\n") + 1))


CELL = st.text(max_size=12) | st.sampled_from(["", " ", "NA", "null", "007", "1e5", '"', "\n"])


@FUZZ_FILES
@given(
    st.lists(st.sampled_from(["prompt", "completion", "text", "x"]), min_size=1, max_size=3),
    st.lists(st.lists(CELL, min_size=3, max_size=3), max_size=5),
)
def test_csv_files_read_or_raise_a_data_error(header: list[str], cells: list[list[str]]) -> None:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([row[: len(header)] for row in cells])
    text = out.getvalue()
    _check_file(text.encode(), "d.csv", "line", text.count("\n") + 1)
