"""Dataset reading and validation that needs no torch: formats, errors with line numbers,
and the statistics the planner uses."""

from kubetune.data.stats import (
    DataError,
    DatasetSummary,
    Example,
    detect_format,
    holdout_count,
    parse_jsonl,
    summarize,
)

__all__ = [
    "DataError",
    "DatasetSummary",
    "Example",
    "detect_format",
    "holdout_count",
    "parse_jsonl",
    "summarize",
]
