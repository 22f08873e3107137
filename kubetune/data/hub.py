"""Dataset repositories on the Hugging Face hub: `hf://datasets/org/name` (or `hf://org/name`)
with a configuration, a split and a revision (spec.dataset.hub).

The repository's data files (Parquet, the common case; JSONL, JSON, CSV, text) and its dataset
card are fetched with `huggingface_hub.snapshot_download` into the hub cache (HF_HUB_CACHE;
with HF_HUB_OFFLINE=1 a filled cache is read without a network), then the snapshot directory
is read by `datasets.load_dataset`, which resolves the configuration and the split from the
card's `configs` metadata or the file names (`data/train-*.parquet`, `validation.jsonl`, ...)
as it does on the hub. Every row becomes an Example as a file's row does; errors name the
source ("hf://datasets/acme/support (train)") and the row, counted from 1.

Loading scripts are not run (datasets 4 and later do not run them either).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from kubetune.contract import secret_value
from kubetune.data.formats import COLUMN_ROLES, _mapped, _present, _quiet_datasets
from kubetune.data.stats import DataError, Example, Format, examples_from_rows

#: The files fetched from a dataset repository: its card and the data files datasets reads.
DATA_PATTERNS = (
    "README.md",
    "*.parquet",
    "*.jsonl",
    "*.jsonl.gz",
    "*.json",
    "*.csv",
    "*.tsv",
    "*.txt",
    "*.arrow",
)
_REPO = re.compile(r"^hf://(?:datasets/)?(?P<repo>[A-Za-z0-9][-\w.]*/[A-Za-z0-9][-\w.]*)/?$")


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the hub, as spec.dataset.uri (or sources[i].uri) and its hub fields name
    it."""

    uri: str
    split: str = "train"
    config: str | None = None
    revision: str | None = None

    @property
    def repo(self) -> str:
        return hub_repo(self.uri)

    @property
    def source(self) -> str:
        """Its name in messages: the URI and what was read of it."""
        parts = [p for p in (self.config, self.split) if p]
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.uri}{at} ({', '.join(parts)})"


def is_hub_repo(uri: str) -> bool:
    """Whether `uri` names a whole dataset repository (hf://datasets/org/name, hf://org/name),
    not one file in it."""
    return _REPO.match(uri) is not None


def hub_repo(uri: str) -> str:
    """`org/name` of `hf://datasets/org/name` or `hf://org/name`."""
    match = _REPO.match(uri)
    if match is None:
        raise DataError(f"{uri}: a hub dataset is hf://datasets/org/name")
    return match["repo"]


def hub_dataset(uri: str, hub: Mapping[str, Any] | None, split: str | None = None) -> HubDataset:
    """The HubDataset of a URI and its spec's `hub` fields (plain JSON); `split` instead of
    the fields' (a validationUri reads the split "validation")."""
    hub = hub or {}
    return HubDataset(
        uri=uri,
        split=split or str(hub.get("split") or "train"),
        config=hub.get("config") or None,
        revision=hub.get("revision") or None,
    )


def snapshot(ref: HubDataset) -> str:
    """The repository's snapshot directory in the hub cache (fetched unless offline)."""
    from huggingface_hub import snapshot_download

    try:
        return str(
            snapshot_download(
                ref.repo,
                repo_type="dataset",
                revision=ref.revision,
                allow_patterns=list(DATA_PATTERNS),
                token=secret_value("HF_TOKEN"),
            )
        )
    except Exception as exc:  # the hub's or the cache's refusal, named with the source
        raise DataError(
            f"{ref.source}: cannot fetch the dataset repository {ref.repo} "
            f"({type(exc).__name__}: {exc}); check the name, the revision and the hub token, "
            "or fill the hub cache for HF_HUB_OFFLINE=1"
        ) from exc


def load_rows(ref: HubDataset, directory: str) -> list[dict[str, Any]]:
    """The rows of the config and split, read by `datasets` from the snapshot directory."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="kubetune-ds-") as c:
        try:
            table = datasets.load_dataset(
                directory, ref.config, split=ref.split, keep_in_memory=True, cache_dir=c
            )
        except ValueError as exc:  # an unknown config or split: datasets names the choices
            raise DataError(
                f"{ref.source}: {str(exc).rstrip('.')}; set spec.dataset.hub.config or .split"
            ) from exc
        except Exception as exc:
            raise DataError(
                f"{ref.source}: datasets cannot read the repository's data files "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return cast(list[dict[str, Any]], table.to_list())


def read_hub_dataset(
    ref: HubDataset, fmt: Format | None = None, columns: Mapping[str, str] | None = None
) -> tuple[Format, list[Example]]:
    """The row format and examples of a hub dataset's config and split; DataError names the
    source and the row (counted from 1)."""
    mapping = {k: v for k, v in (columns or {}).items() if v}
    unknown = sorted(set(mapping) - set(COLUMN_ROLES))
    if unknown:
        raise DataError(f"spec.dataset.columns: unknown role(s) {unknown}; use {COLUMN_ROLES}")
    rows = [(i, _present(row)) for i, row in enumerate(load_rows(ref, snapshot(ref)), start=1)]
    if not rows:
        raise DataError(f"{ref.source}: the split is empty")
    if mapping:
        rows = _mapped(rows, ref.source, "row", mapping)
    return examples_from_rows(rows, ref.source, fmt, "row")
