"""Training data files read through the Hugging Face `datasets` library: JSONL, JSON arrays,
CSV, Parquet and plain text, a column mapping onto the fields kubetune trains on, and
errors that name the source and the row.

`datasets` (its packaged `json`, `csv`, `parquet` and `text` builders, kept in memory, with
a throw-away cache directory: nothing is written under ~/.cache) reads the file into a table;
each row then becomes an Example as a JSONL line does (`kubetune.data.stats`). Rows are
numbered as errors name them:

- JSONL and plain text: the line in the file (blank lines are skipped);
- CSV: the line the record starts on (the header is line 1);
- JSON arrays and Parquet: the row, counted from 1.

When `datasets` cannot read a JSONL file (a bad line, bytes that are not UTF-8, rows whose
columns arrow cannot put in one table), the file is read line by line with the standard json
module to name the line and the reason, as before; a JSON array that does not parse is named by
the json module's line and column. Two checks come before pyarrow sees a file, because its
JSON reader (pyarrow 26) crashes the process with a segmentation fault when the first JSON
value is `null`: every JSONL line must start as an object, and every element of a JSON array
must be one (found by fuzzing, tests/unit/test_fuzz_data.py).

`datasets` is imported only here and only when a file is read; it does not import torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

from kubetune.data.stats import (
    DataError,
    Example,
    Format,
    decode_utf8,
    examples_from_rows,
    jsonl_rows,
)

FileFormat = Literal["JSONL", "JSON", "CSV", "Parquet", "Text"]
FILE_FORMATS: tuple[FileFormat, ...] = ("JSONL", "JSON", "CSV", "Parquet", "Text")
#: By the file's extension; anything else (or none, as a ConfigMap key may have) is JSONL.
EXTENSIONS: dict[str, FileFormat] = {
    ".jsonl": "JSONL",
    ".ndjson": "JSONL",
    ".json": "JSON",
    ".csv": "CSV",
    ".parquet": "Parquet",
    ".txt": "Text",
    ".text": "Text",
    ".md": "Text",
}
SUFFIX: dict[FileFormat, str] = {
    "JSONL": ".jsonl",
    "JSON": ".json",
    "CSV": ".csv",
    "Parquet": ".parquet",
    "Text": ".txt",
}
_BUILDER: dict[FileFormat, str] = {
    "JSONL": "json",
    "JSON": "json",
    "CSV": "csv",
    "Parquet": "parquet",
    "Text": "text",
}
#: The fields a column mapping can name (spec.dataset.columns).
COLUMN_ROLES = ("prompt", "completion", "messages", "text", "system")
_CANONICAL = ("prompt", "completion", "messages", "text")


def file_format_of(source: str, requested: str | None = None) -> FileFormat:
    """`requested` (spec.dataset.fileFormat) unless Auto, else by the extension."""
    if requested and requested != "Auto":
        if requested not in FILE_FORMATS:
            raise DataError(f"{source}: unknown file format {requested!r}")
        return requested
    name = source.rstrip("/").rsplit("/", 1)[-1]
    suffix = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""
    return EXTENSIONS.get(suffix, "JSONL")


def read_dataset(
    data: str | bytes | Path,
    source: str,
    file_format: str | None = None,
    fmt: Format | None = None,
    columns: Mapping[str, str] | None = None,
) -> tuple[Format, list[Example]]:
    """The row format and examples of a data file (a path, or its bytes as a ConfigMap
    holds them), read with `datasets`; raises DataError naming `source` and the row."""
    ff = file_format_of(source, file_format)
    mapping = {k: v for k, v in (columns or {}).items() if v}
    unknown = sorted(set(mapping) - set(COLUMN_ROLES))
    if unknown:
        raise DataError(f"spec.dataset.columns: unknown role(s) {unknown}; use {COLUMN_ROLES}")
    if ff == "Text":
        if fmt not in (None, "Text"):
            raise DataError(
                f"{source}: a plain text file holds Text rows (one per line), not {fmt}; "
                "set spec.dataset.format to Auto or Text, or use JSONL, JSON, CSV or Parquet"
            )
        if mapping:
            raise DataError(
                f"{source}: spec.dataset.columns does not apply to a plain text file "
                "(each line is one Text row)"
            )
    with _local_file(data, ff) as path:
        rows, unit = _rows(path, source, ff)
    if mapping:
        rows = _mapped(rows, source, unit, mapping)
    return examples_from_rows(rows, source, fmt, unit)


# ---- reading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_file(data: str | bytes | Path, ff: FileFormat) -> Iterator[Path]:
    if isinstance(data, Path):
        if not data.exists():
            raise DataError(f"{data}: the dataset file does not exist")
        if data.is_dir():
            raise DataError(f"{data} is a directory; point the URI at a data file")
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-data-") as tmp:
        path = Path(tmp) / f"data{SUFFIX[ff]}"
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        yield path


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """`datasets` without its progress bars and its log lines (the errors it logs before
    raising are reported by us, with the row)."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars = not datasets.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 1)
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


class _Unreadable(Exception):
    """`datasets` could not read the file; the cause is its own error."""


def _load(path: Path, ff: FileFormat, **options: Any) -> list[dict[str, Any]]:
    """The file's rows as `datasets` reads them; raises _Unreadable from whatever the
    libraries raise on input they cannot read (found by fuzzing: DatasetGenerationError,
    pyarrow's ArrowInvalid, ValueError, StopIteration for an empty file, KeyError for an
    empty column name). Only library code runs inside the `try`."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="kubetune-ds-") as c:
        try:
            table = datasets.load_dataset(
                _BUILDER[ff],
                data_files=str(path),
                split="train",
                keep_in_memory=True,
                cache_dir=c,
                **options,
            )
            return cast(list[dict[str, Any]], table.to_list())
        except Exception as exc:
            raise _Unreadable(str(exc)) from exc


def _cause(exc: BaseException) -> str:
    """The library's own reason, not the wrapper's "An error occurred while generating"."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__ or exc
    return str(exc).strip() or type(exc).__name__


def _rows(path: Path, source: str, ff: FileFormat) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    if ff == "JSONL":
        return _jsonl(path, source), "line"
    if ff == "JSON":
        return _json(path, source)
    if ff == "CSV":
        return _csv(path, source), "line"
    if ff == "Parquet":
        try:
            table = _load(path, ff)
        except _Unreadable as exc:
            raise DataError(f"{source}: not a readable Parquet file ({_cause(exc)})") from exc
        return [(i, row) for i, row in enumerate(table, start=1)], "row"
    return _text(path, source), "line"


def _jsonl(path: Path, source: str) -> list[tuple[int, dict[str, Any]]]:
    raw = path.read_bytes()
    text = decode_utf8(raw, source)
    if not text.strip():
        raise DataError(f"{source}: the dataset is empty; it needs at least one JSON line")
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not all(line.lstrip(" \t\ufeff").startswith("{") for _, line in numbered):
        # A line that is no JSON object: named by the line-by-line reader. (It never reaches
        # pyarrow's JSON reader, which crashes the process on a first value `null`.)
        return jsonl_rows(text, source)
    try:
        table = _load(path, "JSONL")
    except _Unreadable:
        # Name the line and the reason (or read the rows arrow could not put in one table).
        return jsonl_rows(text, source)
    if len(numbered) != len(table):
        return jsonl_rows(text, source)
    return [(n, _present(row)) for (n, _), row in zip(numbered, table, strict=True)]


def _json(path: Path, source: str) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """A JSON array of objects (rows counted from 1), or JSON lines in a .json file."""
    text = decode_utf8(path.read_bytes(), source)
    if not text.strip():
        raise DataError(f"{source}: the dataset is empty; it needs a JSON array of objects")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as bad:
        if bad.msg == "Extra data":  # more than one value: JSON lines
            return _jsonl(path, source), "line"
        raise DataError(
            f"{source} line {bad.lineno}: not valid JSON ({bad.msg} at column {bad.colno})"
        ) from bad
    except RecursionError:
        raise DataError(f"{source}: JSON nested too deeply") from None
    if not isinstance(value, list):
        raise DataError(
            f"{source}: a JSON file holds an array of objects (or JSON lines), not "
            f"{type(value).__name__}"
        )
    if not value:
        raise DataError(f"{source}: the dataset is empty; it needs a JSON array of objects")
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            # Checked before pyarrow sees it (a first element `null` crashes its reader).
            raise DataError(
                f"{source} row {i}: each element of the array must be a JSON object, not "
                f"{type(item).__name__}"
            )
    try:
        table = _load(path, "JSON")
    except _Unreadable as exc:
        raise DataError(f"{source}: not a JSON array of objects ({_cause(exc)})") from exc
    if len(table) != len(value):
        raise DataError(
            f"{source}: datasets read {len(table)} rows of the {len(value)} in the array"
        )
    return [(i, _present(row)) for i, row in enumerate(table, start=1)], "row"


def _csv(path: Path, source: str) -> list[tuple[int, dict[str, Any]]]:
    text = decode_utf8(path.read_bytes(), source)
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), None)
    except csv.Error as exc:
        raise DataError(f"{source} line 1: not a readable CSV header ({exc})") from exc
    if not header:
        raise DataError(f"{source}: the dataset is empty; a CSV file needs a header line")
    from datasets import Features, Value

    try:
        # Every column as text, empty cells as "" (not NaN): "007" stays "007".
        table = _load(
            path,
            "CSV",
            features=Features({name: Value("string") for name in header}),
            keep_default_na=False,
            na_filter=False,
        )
    except _Unreadable as exc:
        raise DataError(f"{source}: not a readable CSV file ({_cause(exc)})") from exc
    try:
        starts = _csv_record_lines(text)
    except csv.Error:  # pandas read what the csv module does not: count records instead
        starts = []
    if len(starts) != len(table):
        starts = list(range(2, len(table) + 2))
    return [(n, _present(row)) for n, row in zip(starts, table, strict=True)]


def _csv_record_lines(text: str) -> list[int]:
    """The line each CSV record after the header starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    starts: list[int] = []
    end = 0
    for i, record in enumerate(reader):
        start = end + 1
        end = reader.line_num
        if i and record:  # a blank line is no record (pandas skips it too)
            starts.append(start)
    return starts


def _text(path: Path, source: str) -> list[tuple[int, dict[str, Any]]]:
    decode_utf8(path.read_bytes(), source)
    try:
        table = _load(path, "Text")
    except _Unreadable as exc:
        raise DataError(f"{source}: not a readable text file ({_cause(exc)})") from exc
    return [
        (n, {"text": row["text"]})
        for n, row in enumerate(table, start=1)
        if isinstance(row.get("text"), str) and row["text"].strip()
    ]


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A table row without the cells that are null: a column another row has (arrow fills
    it with null) is a field this row lacks, as in its JSON line."""
    return {k: v for k, v in row.items() if v is not None}


# ---- the column mapping -------------------------------------------------------------------------


def _mapped(
    rows: list[tuple[int, dict[str, Any]]], source: str, unit: str, mapping: dict[str, str]
) -> list[tuple[int, dict[str, Any]]]:
    """Rows with the mapped columns under kubetune's names; `system` becomes the first
    message of a chat row or the start of a prompt."""
    if rows:
        present = set().union(*(row for _, row in rows))
        missing = {role: col for role, col in mapping.items() if col not in present}
        if missing:
            role, col = next(iter(missing.items()))
            raise DataError(
                f"{source}: spec.dataset.columns.{role} names the column {col!r}, which no "
                f"row has; the columns are {sorted(present)}"
            )
    out: list[tuple[int, dict[str, Any]]] = []
    for n, row in rows:
        new = {k: v for k, v in row.items() if k not in _CANONICAL or k not in mapping}
        for role, col in mapping.items():
            if role in _CANONICAL:
                new.pop(col, None)
                if col in row:
                    new[role] = row[col]
        if "system" in mapping:
            new.pop(mapping["system"], None)
            _add_system(new, row.get(mapping["system"]), source, unit, n)
        out.append((n, new))
    return out


def _add_system(row: dict[str, Any], system: object, source: str, unit: str, n: int) -> None:
    if system is None or system == "":
        return
    if not isinstance(system, str):
        raise DataError(
            f"{source} {unit} {n}: the system column must hold a string, not "
            f"{type(system).__name__}"
        )
    messages = row.get("messages")
    if isinstance(messages, list):
        first = messages[0] if messages else None
        if not (isinstance(first, dict) and first.get("role") == "system"):
            row["messages"] = [{"role": "system", "content": system}, *messages]
    elif isinstance(row.get("prompt"), str):
        row["prompt"] = f"{system}\n{row['prompt']}"
    else:
        raise DataError(
            f"{source} {unit} {n}: spec.dataset.columns.system applies to chat and "
            "prompt/completion rows; this row has neither messages nor a prompt"
        )
