"""Parse JSONL training data, check it, and measure what the planner needs.

Formats (one JSON object per line):
- Text: {"text": "..."}
- PromptCompletion: {"prompt": "...", "completion": "..."}
- Chat: {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}

Every error names the source and the line. Token counts are estimated from characters
(about 4 per token for English BPE vocabularies) when no tokenizer is at hand; the summary
says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["Text", "PromptCompletion", "Chat"]
CHARS_PER_TOKEN = 4.0
_ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    """Bad training data; the message names the source and line and says what to do."""


@dataclass(frozen=True)
class Example:
    """One training example: what the model sees (`prompt`) and what it learns (`target`)."""

    line: int
    prompt: str
    target: str
    # Chat rows keep their messages so the trainer can render them with the tokenizer's
    # chat template; `prompt` is a plain "role: content" rendering for tokenizers without.
    messages: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    #: What `line` counts: "line" (JSONL, CSV, text) or "row" (JSON arrays, Parquet).
    unit: str = field(default="line", compare=False)

    @property
    def where(self) -> str:
        """Its place in the file, as errors name it: "line 3", "row 7"."""
        return f"{self.unit} {self.line}"

    @property
    def text(self) -> str:
        return self.prompt + self.target


@dataclass(frozen=True)
class DatasetSummary:
    format: Format
    example_count: int
    token_count: int
    max_tokens: int
    tokens_estimated: bool
    validation_count: int = 0
    duplicate_count: int = 0
    leakage_count: int = 0
    overlong_count: int = 0
    warnings: list[str] = field(default_factory=list)
    duplicate_warnings: list[str] = field(default_factory=list)


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def _format_of(obj: dict[str, Any]) -> Format | None:
    if "messages" in obj:
        return "Chat"
    if "prompt" in obj or "completion" in obj:
        return "PromptCompletion"
    if "text" in obj:
        return "Text"
    return None


def detect_format(
    rows: list[tuple[int, dict[str, Any]]], source: str, unit: str = "line"
) -> Format:
    """The format of the first row; later rows must match it."""
    if not rows:
        raise DataError(f"{source}: the dataset is empty; it needs at least one JSON line")
    line, first = rows[0]
    fmt = _format_of(first)
    if fmt is None:
        raise DataError(
            f"{source} {unit} {line}: cannot tell the format; expected a 'text' field, "
            "'prompt' and 'completion' fields, or a 'messages' list"
        )
    return fmt


def _str_field(obj: dict[str, Any], key: str, source: str, line: int, unit: str) -> str:
    if key not in obj:
        raise DataError(f"{source} {unit} {line}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(
            f"{source} {unit} {line}: field '{key}' must be a string, not {type(value).__name__}"
        )
    return value


def _example(
    obj: dict[str, Any], fmt: Format, source: str, line: int, unit: str = "line"
) -> Example:
    found = _format_of(obj)
    if found != fmt:
        raise DataError(
            f"{source} {unit} {line}: this row is {found or 'of no known format'} but the "
            f"file started as {fmt}; use one format per file"
        )
    if fmt == "Text":
        text = _str_field(obj, "text", source, line, unit)
        if not text.strip():
            raise DataError(f"{source} {unit} {line}: field 'text' is empty")
        return Example(line, "", text, unit=unit)
    if fmt == "PromptCompletion":
        prompt = _str_field(obj, "prompt", source, line, unit)
        completion = _str_field(obj, "completion", source, line, unit)
        if not completion.strip():
            raise DataError(
                f"{source} {unit} {line}: field 'completion' is empty; "
                "there is nothing to learn from this row"
            )
        return Example(line, prompt, completion, unit=unit)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source} {unit} {line}: 'messages' must be a non-empty list")
    parts: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{source} {unit} {line}: messages[{i}] needs a string 'content'")
        if m.get("role") not in _ROLES:
            raise DataError(
                f"{source} {unit} {line}: messages[{i}].role must be one of "
                f"{sorted(_ROLES)}, not {m.get('role')!r}"
            )
        parts.append(f"{m['role']}: {m['content']}\n")
    if messages[-1].get("role") != "assistant":
        raise DataError(
            f"{source} {unit} {line}: the last message must be the assistant's "
            "reply (that is what the model learns)"
        )
    if not messages[-1]["content"].strip():  # found by fuzzing
        raise DataError(
            f"{source} {unit} {line}: the assistant's reply (the last message) is empty; "
            "there is nothing to learn from this row"
        )
    return Example(
        line,
        "".join(parts[:-1]),
        messages[-1]["content"],
        tuple((m["role"], m["content"]) for m in messages),
        unit,
    )


def decode_utf8(data: str | bytes, source: str) -> str:
    """The text of a file; bytes that are not UTF-8 are a DataError naming the line."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{source} line {line}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
        ) from exc


def jsonl_rows(text: str | bytes, source: str) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL text with their line numbers (blank lines skipped);
    raises DataError naming the first bad line."""
    text = decode_utf8(text, source)
    rows: list[tuple[int, dict[str, Any]]] = []
    # Split on "\n" only: JSON strings may hold U+2028/U+2029/U+0085 unescaped, which
    # str.splitlines() would treat as line breaks.
    for n, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source} line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        except RecursionError:  # found by fuzzing: `[[[[...` thousands deep
            raise DataError(f"{source} line {n}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{source} line {n}: each line must be a JSON object, not {type(obj).__name__}"
            )
        rows.append((n, obj))
    return rows


def examples_from_rows(
    rows: list[tuple[int, dict[str, Any]]],
    source: str,
    fmt: Format | None = None,
    unit: str = "line",
) -> tuple[Format, list[Example]]:
    """The format (`fmt`, or detected from the first row) and the examples of rows
    numbered as their errors name them: `unit` "line" (text formats) or "row" (tables)."""
    fmt = fmt or detect_format(rows, source, unit)
    if not rows:
        raise DataError(f"{source}: the dataset is empty; it needs at least one JSON line")
    return fmt, [_example(obj, fmt, source, n, unit) for n, obj in rows]


def parse_jsonl(
    text: str | bytes, source: str, fmt: Format | None = None
) -> tuple[Format, list[Example]]:
    """Parse JSONL into its format and examples; raises DataError naming `source` and the
    line. `fmt` forces a format instead of detecting it from the first row."""
    return examples_from_rows(jsonl_rows(text, source), source, fmt)


def holdout_count(examples: int, fraction: float) -> int:
    """How many examples `spec.dataset.validationSplit` holds out: `round(n x fraction)`,
    at least one and never all of them (none of a single example). The planner and the
    trainer both use it, so the plan counts the steps the trainer runs."""
    if examples < 2:
        return 0
    return min(examples - 1, max(1, round(examples * fraction)))


def overlong_warning(
    source: str, count: int, max_seq_length: int, first_at: str, estimated: bool = True
) -> str:
    how = "estimated; " if estimated else ""
    return (
        f"{source}: {count} examples are longer than maxSeqLength {max_seq_length} "
        f"({how}the first at {first_at}) and will be truncated"
    )


def leakage_warning(count: int, total: int) -> str:
    return (
        f"{count} of {total} validation examples also occur in the "
        "training data; eval loss will look better than it is"
    )


def plan_warnings(summary: DatasetSummary) -> list[str]:
    """The data warnings the planner does not make itself (it reports duplicates)."""
    return [w for w in summary.warnings if w not in summary.duplicate_warnings]


def summarize(
    train: list[Example],
    source: str,
    fmt: Format,
    validation: Iterable[Example] = (),
    max_seq_length: int | None = None,
    lengths: Sequence[int] | None = None,
) -> DatasetSummary:
    """Counts, tokens, duplicates, train/validation leakage and rows over `max_seq_length`.

    `lengths` are the examples' token counts from the model's tokenizer
    (`kubetune.data.tokens`); without them the counts are estimated from the text."""
    seen: set[str] = set()
    duplicates = 0
    for ex in train:
        if ex.text in seen:
            duplicates += 1
        seen.add(ex.text)
    if duplicates == len(train) - 1 and len(train) > 1:
        raise DataError(
            f"{source}: all {len(train)} examples are the same text; "
            "there is nothing to learn beyond one example"
        )
    val = list(validation)
    leakage = sum(1 for ex in val if ex.text in seen)
    if val and leakage == len(val):
        raise DataError(
            f"{source}: every validation example also occurs in the training "
            "data, so evaluation would measure memorisation; use held-out data"
        )
    estimated = lengths is None
    tokens = [estimate_tokens(ex.text) for ex in train] if lengths is None else list(lengths)
    if len(tokens) != len(train):
        raise ValueError(f"{len(tokens)} token counts for {len(train)} examples")
    limit = max_seq_length or 0
    overlong_at = [ex.where for ex, t in zip(train, tokens, strict=True) if limit and t > limit]
    overlong = len(overlong_at)
    first_overlong = overlong_at[0] if overlong_at else ""
    warnings: list[str] = []
    duplicate_warnings = (
        [
            f"{duplicates} of {len(train)} training examples are exact duplicates; "
            "they are trained on more often than the rest"
        ]
        if duplicates
        else []
    )
    warnings += duplicate_warnings
    if leakage:
        warnings.append(leakage_warning(leakage, len(val)))
    if overlong:
        warnings.append(
            overlong_warning(source, overlong, max_seq_length or 0, first_overlong, estimated)
        )
    return DatasetSummary(
        format=fmt,
        example_count=len(train),
        token_count=sum(tokens),
        max_tokens=max(tokens),
        tokens_estimated=estimated,
        validation_count=len(val),
        duplicate_count=duplicates,
        leakage_count=leakage,
        overlong_count=overlong,
        warnings=warnings,
        duplicate_warnings=duplicate_warnings,
    )
