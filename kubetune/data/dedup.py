"""Duplicate rows: exact (the same normalised text) and near (MinHash LSH, `datasketch`),
grouped so that a group is removed as one, kept on one side of the validation split, and
looked for across the split (leakage).

- Normalised text: Unicode NFKC, case-folded, every run of whitespace one space, trimmed;
  the prompt and the target normalised apart (a row is the pair, so moving a word across the
  boundary makes another row).
- Near: the set of character 5-grams of the normalised prompt and target; candidate pairs
  from MinHash LSH (128 permutations, a fixed seed, so the same rows give the same result
  on every machine), each confirmed by the exact Jaccard similarity of the two sets, at least
  `threshold`. LSH can miss a pair near the threshold (a false negative, with a probability
  of a few percent at the threshold and falling fast above it); it never reports one below it.
- Groups: the connected rows (exact or near), each represented by its first row in the pool's
  order. Removing duplicates keeps the representative: the first occurrence.

Pure given the rows; `datasketch` is imported only when near duplicates are looked for.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from kubetune.data.stats import Example

#: MinHash permutations (datasketch's default) and the seed of its hash functions.
NUM_PERM = 128
MINHASH_SEED = 1
SHINGLE = 5
#: The default similarity of a near duplicate (spec.dataset.deduplicate.threshold).
DEFAULT_THRESHOLD = 0.9
#: How many examples a report names (the plan travels in a 4 KiB termination message).
MAX_EXAMPLES = 3

Kind = Literal["exact", "near"]


@dataclass(frozen=True)
class DedupSettings:
    """spec.dataset.deduplicate: remove exact / near duplicates (False: keep them, count and
    warn), and the similarity from which two rows are near duplicates."""

    exact: bool = True
    near: bool = True
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(
                f"spec.dataset.deduplicate.threshold must be in (0, 1], not {self.threshold}"
            )


@dataclass(frozen=True)
class Match:
    """Row `row` duplicates row `of` (indexes into the rows looked at), exactly or with
    Jaccard similarity `similarity`."""

    row: int
    of: int
    kind: Kind
    similarity: float = 1.0


@dataclass(frozen=True)
class Groups:
    """Per row: the first row of its exact class, and of its group (exact or near), and the
    match that put a row into its group (none for representatives)."""

    exact_of: list[int]
    group_of: list[int]
    matches: list[Match]

    def duplicates(self) -> list[Match]:
        """Every row that is not its group's representative, by row."""
        return sorted(self.matches, key=lambda m: m.row)

    def count(self, kind: Kind) -> int:
        return sum(1 for m in self.matches if m.kind == kind)

    def kept(self, settings: DedupSettings) -> list[int]:
        """The rows left when the kinds `settings` removes are removed."""
        keep: list[int] = []
        for i, (exact, group) in enumerate(zip(self.exact_of, self.group_of, strict=True)):
            if settings.exact and exact != i:
                continue
            if settings.near and group != exact:
                continue
            keep.append(i)
        return keep


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def row_key(example: Example) -> tuple[str, str]:
    return normalise(example.prompt), normalise(example.target)


def shingles(example: Example) -> set[bytes]:
    """The character 5-grams of the normalised prompt and target (a text shorter than 5
    characters is its own shingle); the two parts are marked apart."""
    out: set[bytes] = set()
    for mark, part in zip(("p", "t"), row_key(example), strict=True):
        if not part:
            continue
        if len(part) <= SHINGLE:
            out.add(f"{mark}{part}".encode())
            continue
        out.update(f"{mark}{part[i : i + SHINGLE]}".encode() for i in range(len(part) - 4))
    return out


def jaccard(a: set[bytes], b: set[bytes]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class Hasher:
    """Each row's shingles and MinHash, computed once (in bulk) and kept by the row's key,
    so the duplicate search and the leakage search hash a row once."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], set[bytes]] = {}
        self._hashes: dict[tuple[str, str], Any] = {}

    def shingles(self, example: Example) -> set[bytes]:
        key = row_key(example)
        if key not in self._sets:
            self._sets[key] = shingles(example)
        return self._sets[key]

    def minhashes(self, examples: Sequence[Example]) -> list[Any]:
        from datasketch import MinHash

        missing = list(dict.fromkeys(k for k in map(row_key, examples) if k not in self._hashes))
        if missing:
            sets = (sorted(self._sets.get(k) or shingles(Example(0, *k))) for k in missing)
            made = MinHash.bulk(sets, num_perm=NUM_PERM, seed=MINHASH_SEED)
            self._hashes.update(zip(missing, made, strict=True))
        return [self._hashes[row_key(ex)] for ex in examples]


@cache
def _bands(threshold: float) -> tuple[int, int]:
    """datasketch's bands and rows for `threshold` (its search integrates the collision
    curve with scipy, about 0.1 s: done once per threshold)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return int(lsh.b), int(lsh.r)


def _band_ids(hashes: Sequence[Any], threshold: float) -> Any:
    """Per row and band, an integer naming the band's hash values (equal integers: equal
    values): the buckets of datasketch's MinHashLSH with the bands and rows it picks for
    `threshold`. Two rows are LSH candidates when any band's integers agree. Computed for
    all rows at once with numpy, instead of one dictionary insert per row and band (the
    same candidates, several times faster on thousands of rows)."""
    import numpy as np

    bands, rows = _bands(threshold)
    values = np.stack([np.asarray(mh.hashvalues, dtype=np.uint64) for mh in hashes])
    ids = np.empty((len(hashes), bands), dtype=np.int64)
    for k in range(bands):
        part = np.ascontiguousarray(values[:, k * rows : (k + 1) * rows])
        keys = part.view(np.dtype((np.void, part.dtype.itemsize * rows))).ravel()
        ids[:, k] = np.unique(keys, return_inverse=True)[1].ravel()
    return ids


def _shared_buckets(ids: Any) -> dict[int, set[int]]:
    """For each row that shares a bucket (in any band) with another row: those rows."""
    import numpy as np

    out: dict[int, set[int]] = {}
    for k in range(ids.shape[1]):
        col = ids[:, k]
        order = np.argsort(col, kind="stable")
        ranked = col[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        ends = np.r_[starts[1:], len(col)]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if end - start < 2:
                continue
            members = [int(x) for x in order[start:end]]
            for x in members:
                out.setdefault(x, set()).update(members)
    return out


def group_rows(
    examples: Sequence[Example], threshold: float | None, hasher: Hasher | None = None
) -> Groups:
    """The exact classes and, unless `threshold` is None, the near-duplicate groups of
    `examples` (their order decides the representatives)."""
    first: dict[tuple[str, str], int] = {}
    exact_of = [first.setdefault(row_key(ex), i) for i, ex in enumerate(examples)]
    matches = [Match(i, e, "exact") for i, e in enumerate(exact_of) if e != i]
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, e in enumerate(exact_of):
        parent[i] = e
    reps = [i for i, e in enumerate(exact_of) if e == i]
    near_link: dict[int, Match] = {}
    if threshold is not None and len(reps) > 1:
        hasher = hasher or Hasher()
        sets = {i: hasher.shingles(examples[i]) for i in reps}
        shared = _shared_buckets(
            _band_ids(hasher.minhashes([examples[i] for i in reps]), threshold)
        )
        for pos, i in enumerate(reps):
            best: Match | None = None
            # The earlier representatives in a bucket with this one (LSH's candidates).
            for j in sorted(reps[q] for q in shared.get(pos, ()) if q < pos):
                sim = jaccard(sets[i], sets[j])
                if sim >= threshold and (best is None or sim > best.similarity):
                    best = Match(i, j, "near", sim)
            if best is not None:
                a, b = find(i), find(best.of)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                    near_link[i] = best
    group_of = [find(i) for i in range(len(examples))]
    # Each representative is compared with the earlier ones only, so a joined one has its link.
    matches += [near_link[i] for i in reps if group_of[i] != i]
    return Groups(exact_of, group_of, matches)


def cross_matches(
    rows: Sequence[Example],
    against: Sequence[Example],
    threshold: float | None,
    hasher: Hasher | None = None,
) -> list[Match]:
    """Each row of `rows` that duplicates a row of `against` (exactly, else nearly when
    `threshold` is set): `Match.row` indexes `rows`, `Match.of` indexes `against`."""
    index: dict[tuple[str, str], int] = {}
    for j, ex in enumerate(against):
        index.setdefault(row_key(ex), j)
    out: list[Match] = []
    rest: list[int] = []
    for i, ex in enumerate(rows):
        same = index.get(row_key(ex))
        if same is not None:
            out.append(Match(i, same, "exact"))
        else:
            rest.append(i)
    if threshold is None or not rest or not against:
        return out
    hasher = hasher or Hasher()
    theirs = [hasher.shingles(ex) for ex in against]
    mine = [hasher.shingles(rows[i]) for i in rest]
    # One band index over both sides: `against` first (0 .. n-1), then the rows looked up.
    n = len(against)
    hashes = [*hasher.minhashes(against), *hasher.minhashes([rows[i] for i in rest])]
    shared = _shared_buckets(_band_ids(hashes, threshold))
    for pos, (i, s) in enumerate(zip(rest, mine, strict=True)):
        best: Match | None = None
        for j in sorted(q for q in shared.get(n + pos, ()) if q < n):
            sim = jaccard(s, theirs[j])
            if sim >= threshold and (best is None or sim > best.similarity):
                best = Match(i, j, "near", sim)
        if best is not None:
            out.append(best)
    return sorted(out, key=lambda m: m.row)
