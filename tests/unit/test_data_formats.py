"""Data files through the Hugging Face datasets library (kubetune.data.formats): JSONL, JSON
arrays, CSV, Parquet and plain text, the column mapping, and errors naming the source and
the row (line for text formats, row for JSON arrays and Parquet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.data import DataError
from kubetune.data.formats import file_format_of, read_dataset
from kubetune.planning.job import build_plan, known_model_config
from kubetune.trainer.data import read_examples, spec_data_options
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

ROWS = [
    {"prompt": "Q1: 007?", "completion": "A, with a comma"},
    {"prompt": "Q2\nspans lines", "completion": 'A2 "quoted"'},
    {"prompt": "Q3", "completion": "A3 ünïcode"},
]
QWEN = known_model_config("hf://Qwen/Qwen2-0.5B")
GPU = (24.0, "GPU memory 24 GiB from a test")


def csv_text(
    rows: list[dict[str, str]], columns: tuple[str, ...] = ("prompt", "completion")
) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("t.jsonl", [1, 3, 4]),  # a blank line 2
        ("t.json", [1, 2, 3]),  # rows
        ("t.csv", [2, 3, 5]),  # the header is line 1; row 2's prompt spans lines 3-4
        ("t.parquet", [1, 2, 3]),  # rows
    ],
)
def test_every_table_format_gives_the_same_examples(
    tmp_path: Path, name: str, lines: list[int]
) -> None:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        rows = [json.dumps(r) for r in ROWS]
        write(path, rows[0] + "\n\n" + rows[1] + "\n" + rows[2] + "\n")
    elif name.endswith(".json"):
        write(path, json.dumps(ROWS, indent=2))
    elif name.endswith(".csv"):
        write(path, csv_text(ROWS))
    else:
        parquet(path, ROWS)
    fmt, examples = read_dataset(path, name)
    assert fmt == "PromptCompletion"
    assert [(e.prompt, e.target) for e in examples] == [
        (r["prompt"], r["completion"]) for r in ROWS
    ]
    assert [e.line for e in examples] == lines
    # From bytes (a ConfigMap's text) the same, parquet included.
    assert read_dataset(path.read_bytes(), name) == (fmt, examples)


def test_plain_text_is_one_text_example_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "First line.\n\n  \nSecond line.\r\nThird.")
    fmt, examples = read_dataset(path, "notes.txt")
    assert fmt == "Text"
    assert [(e.line, e.target) for e in examples] == [
        (1, "First line."),
        (4, "Second line."),
        (5, "Third."),
    ]
    with pytest.raises(DataError, match=r"^notes\.txt: a plain text file holds Text rows"):
        read_dataset(path, "notes.txt", fmt="PromptCompletion")


def test_file_format_by_extension_or_setting() -> None:
    assert file_format_of("configmap://cm/train.csv") == "CSV"
    assert file_format_of("/data/x.PARQUET") == "Parquet"
    assert file_format_of("/data/x.ndjson") == "JSONL"
    assert file_format_of("configmap://cm/train") == "JSONL"  # no extension: as before
    assert file_format_of("/data/x.csv", "JSONL") == "JSONL"
    assert file_format_of("/data/x", "Auto") == "JSONL"


def test_a_set_file_format_wins_over_the_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "data.dat", csv_text(ROWS))
    _, examples = read_dataset(path, "data.dat", "CSV")
    assert len(examples) == 3


# ---- the column mapping -------------------------------------------------------------------------


def test_columns_map_other_names_and_a_system_prompt(tmp_path: Path) -> None:
    rows = [
        {"question": "Q1", "answer": "A1", "sys": "Be brief.", "prompt": "ignored"},
        {"question": "Q2", "answer": "A2", "sys": "", "prompt": "ignored"},
    ]
    path = write(tmp_path / "t.csv", csv_text(rows, ("question", "answer", "sys", "prompt")))
    mapping = {"prompt": "question", "completion": "answer", "system": "sys"}
    fmt, examples = read_dataset(path, "t.csv", columns=mapping)
    assert fmt == "PromptCompletion"
    assert [(e.prompt, e.target) for e in examples] == [("Be brief.\nQ1", "A1"), ("Q2", "A2")]


def test_columns_map_a_chat_column_with_a_system_column(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"conversation": chat, "persona": "You are terse."}]
    path = parquet(tmp_path / "chat.parquet", rows)
    fmt, [example] = read_dataset(
        path, "chat.parquet", columns={"messages": "conversation", "system": "persona"}
    )
    assert fmt == "Chat"
    assert example.messages == (
        ("system", "You are terse."),
        ("user", "hi"),
        ("assistant", "hello"),
    )


def test_a_mapped_column_that_no_row_has(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", json.dumps({"q": "a", "completion": "b"}) + "\n")
    with pytest.raises(
        DataError, match=r"^t\.jsonl: spec\.dataset\.columns\.prompt names the column 'question'"
    ):
        read_dataset(path, "t.jsonl", columns={"prompt": "question"})


# ---- errors name the source and the row ---------------------------------------------------------


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"^t\.jsonl line 3: not valid JSON"):
        read_dataset(path, "t.jsonl")
    path = write(
        tmp_path / "u.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n',
    )
    with pytest.raises(DataError, match=r"^u\.jsonl line 2: field 'completion' must be a string"):
        read_dataset(path, "u.jsonl")
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"^u\.jsonl line 2: not valid UTF-8"):
        read_dataset(path, "u.jsonl")


def test_jsonl_columns_of_mixed_types_still_read(tmp_path: Path) -> None:
    text = '{"text": "a", "meta": 1}\n{"text": "b", "meta": "x"}\n'
    _, examples = read_dataset(write(tmp_path / "t.jsonl", text), "t.jsonl")
    assert [e.target for e in examples] == ["a", "b"]


def test_csv_errors_name_the_line_a_record_starts_on(tmp_path: Path) -> None:
    rows = [*ROWS, {"prompt": "Q4", "completion": ""}]
    path = write(tmp_path / "t.csv", csv_text(rows))
    with pytest.raises(DataError, match=r"^t\.csv line 6: field 'completion' is empty"):
        read_dataset(path, "t.csv")
    path = write(tmp_path / "h.csv", "question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"^h\.csv line 2: cannot tell the format"):
        read_dataset(path, "h.csv")


def test_parquet_and_json_errors_name_the_row(tmp_path: Path) -> None:
    rows = [*ROWS, {"prompt": "Q4", "completion": " "}]
    with pytest.raises(DataError, match=r"^t\.parquet row 4: field 'completion' is empty"):
        read_dataset(parquet(tmp_path / "t.parquet", rows), "t.parquet")
    with pytest.raises(DataError, match=r"^t\.json row 4: field 'completion' is empty"):
        read_dataset(write(tmp_path / "t.json", json.dumps(rows)), "t.json")
    bad = write(tmp_path / "bad.json", '[{"text": "a"},\n {"text": ]')
    with pytest.raises(DataError, match=r"^bad\.json line 2: not valid JSON"):
        read_dataset(bad, "bad.json")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"^bad\.parquet: not a readable Parquet file"):
        read_dataset(tmp_path / "bad.parquet", "bad.parquet")


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv", "e.txt"])
def test_an_empty_file_says_so(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=rf"^{name}: the dataset is empty"):
        read_dataset(write(tmp_path / name, "\n"), name)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope.csv", "nope.csv")


# ---- the plan and the trainer read the same -----------------------------------------------------


def job_spec(**dataset: Any) -> Any:
    base = {
        "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
        "dataset": {"uri": "configmap://data/train.csv", **dataset},
    }
    return spec_from(base, "demo", "ns")


def test_the_plan_reads_a_csv_configmap_with_a_mapping(tmp_path: Path) -> None:
    assert QWEN is not None
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(20)]
    spec = job_spec(columns={"prompt": "q", "completion": "a"})
    plan = build_plan(
        spec, csv_text(rows, ("q", "a")), "configmap://data/train.csv", QWEN, "q", GPU
    )
    assert plan.dataset_format == "PromptCompletion"
    assert plan.example_count == 18
    # The trainer reads the mounted file with the spec's options to the same examples.
    path = write(tmp_path / "train.csv", csv_text(rows, ("q", "a")))
    forced, ff, columns = spec_data_options(spec.to_manifest())
    fmt, examples = read_examples(str(path), forced, ff, columns)
    assert (fmt, len(examples)) == ("PromptCompletion", 20)
    assert examples[3].prompt == "Question 3?"


def test_the_plan_names_a_bad_parquet_row(tmp_path: Path) -> None:
    assert QWEN is not None
    rows = [{"text": f"row {i}"} for i in range(5)] + [{"text": ""}]
    data = parquet(tmp_path / "t.parquet", rows).read_bytes()
    spec = job_spec(uri="file:///data/t.parquet")
    with pytest.raises(DataError, match=r"^/data/t\.parquet row 6: field 'text' is empty"):
        build_plan(spec, data, "/data/t.parquet", QWEN, "q", GPU)


def test_kubetune_validate_fails_on_a_missing_dataset(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kubetune.cli import main

    job = tmp_path / "job.yaml"
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
            "dataset": {"uri": f"file://{tmp_path}/missing.csv"},
        },
    }
    job.write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code != 0
    assert f"{tmp_path}/missing.csv does not exist" in result.output
    write(tmp_path / "missing.csv", csv_text(ROWS))
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "3 PromptCompletion examples" in result.output


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("n.jsonl", "null", r"^n\.jsonl line 1: each line must be a JSON object, not NoneType"),
        ("n.jsonl", 'null\n{"text": "a"}', r"^n\.jsonl line 1: each line must be a JSON object"),
        ("n.json", "null", r"^n\.json: a JSON file holds an array of objects"),
        ("n.json", '[null, {"text": "a"}]', r"^n\.json row 1: each element of the array must be"),
    ],
)
def test_a_first_null_is_a_data_error_not_a_crash(
    tmp_path: Path, name: str, data: str, message: str
) -> None:
    # Regression found by fuzzing: pyarrow 26's JSON reader (under datasets) crashes the
    # process with a segmentation fault when the first JSON value is null.
    with pytest.raises(DataError, match=message):
        read_dataset(write(tmp_path / name, data), name)


def test_a_parquet_file_in_a_configmaps_binary_data(tmp_path: Path) -> None:
    """kubetune plan reads binaryData from the job file, as the operator reads it through the
    API (and a pod from the mounted ConfigMap)."""
    import base64

    import yaml
    from click.testing import CliRunner

    from kubetune.cli import main

    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(12)]
    data = parquet(tmp_path / "t.parquet", rows).read_bytes()
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "faq"},
            "binaryData": {"train.parquet": base64.b64encode(data).decode()},
        },
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
                "dataset": {"uri": "configmap://faq/train.parquet", "validationSplit": 0.25},
                "planOnly": True,
            },
        },
    ]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(main, ["plan", str(job), "-o", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert (plan["exampleCount"], plan["datasetFormat"]) == (9, "PromptCompletion")
