"""Which rows of a table folder are current: the one rule advlab's readers and compaction trust.

A table folder holds loose files, one per trial or run (`<trial>.parquet`,
`<trial>.<part>.parquet`; their name without `.parquet` is their *stem*), and compacted files
(`compacted-<generation>-<nonce>.parquet`) that each hold many stems' rows, sorted by stem,
with the list of stems and their row counts in the file's parquet metadata. A stem's current
rows are its loose file's when there is one (a rerun after compaction wrote it; or a
compaction stopped before removing what it merged, when both copies are the same rows), else
those of the newest compacted file that holds it. An empty loose file is how a run's rows are
removed once they may live in a compacted file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PREFIX = "compacted-"
META_KEY = b"advlab.compacted"
SWEEP_WIDE = "all"  # the stem of a sweep-wide file (transfer, pareto): never compacted


def stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".parquet")


def is_compacted(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(PREFIX)


def generation(path: str) -> int:
    return int(stem(path).removeprefix(PREFIX).split("-", 1)[0])


def name(generation_: int, nonce: str) -> str:
    """A compacted file's stem: generations sort as numbers and as text alike."""
    return f"{PREFIX}{generation_:08d}-{nonce}"


def listing(path: str) -> str:
    """Where a compacted file's list is kept beside it: a hidden name, which every reader of
    the folder passes over (pandas reads every file of a folder but hidden ones)."""
    folder, _, base = path.rpartition("/")
    return f"{folder}/.{base.removesuffix('.parquet')}.json"


def trial_of(stem_: str) -> str:
    return stem_.split(".", 1)[0]


def of_trial(trial_id: str, part: str | None = None) -> Callable[[str], bool]:
    """Stems of one trial: every one of its files, or the file of run `part` only."""
    if part is not None:
        return lambda s: s == f"{trial_id}.{part}"
    return lambda s: trial_of(s) == trial_id


@dataclass(frozen=True)
class Compacted:
    """A compacted file and what it holds: (stem, rows) in row order."""

    path: str
    stems: tuple[tuple[str, int], ...]

    @property
    def generation(self) -> int:
        return generation(self.path)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.stems)


def metadata(stems: list[tuple[str, int]]) -> dict[bytes, bytes]:
    return {META_KEY: json.dumps([list(s) for s in stems]).encode()}


def read_index(fs: pafs.FileSystem, path: str) -> Compacted:
    """A compacted file's list of stems, from its footer (the rows are not read). Raises
    OSError or ArrowException for a damaged file, ArrowInvalid for one that is not ours."""
    found = pq.read_metadata(path, filesystem=fs)
    raw = (found.metadata or {}).get(META_KEY)
    if raw is None:
        raise pa.ArrowInvalid("named like a compacted file but holds no list of its stems")
    stems = tuple((str(s), int(n)) for s, n in json.loads(raw))
    if sum(n for _, n in stems) != found.num_rows:
        raise pa.ArrowInvalid(f"lists {sum(n for _, n in stems)} rows but holds {found.num_rows}")
    return Compacted(path, stems)


@dataclass
class Plan:
    """What to read: loose files whole, compacted files whole or in part (a row mask)."""

    loose: list[str]
    whole: list[Compacted]
    partial: list[tuple[Compacted, np.ndarray]]


def plan(
    loose: list[str], compacted: list[Compacted], wanted: Callable[[str], bool] | None = None
) -> Plan:
    """The current rows by the rule above, of the stems `wanted` accepts (all by default)."""
    loose_stems = {stem(p) for p in loose}
    owner: dict[str, str] = {}
    for found in sorted(compacted, key=lambda c: c.generation):
        owner |= {s: found.path for s, _ in found.stems}
    whole, partial = [], []
    for found in compacted:
        keep = [
            s not in loose_stems and owner[s] == found.path and (wanted is None or wanted(s))
            for s, _ in found.stems
        ]
        if all(keep) and found.stems:
            whole.append(found)
        elif any(keep):
            counts = [n for _, n in found.stems]
            partial.append((found, np.repeat(np.array(keep, bool), counts)))
    chosen = [p for p in loose if wanted is None or wanted(stem(p))]
    return Plan(chosen, whole, partial)


def stale(compacted: list[Compacted], current: Plan) -> list[Compacted]:
    """Compacted files holding rows that are no longer current: compaction rewrites them."""
    whole = {c.path for c in current.whole}
    return [c for c in compacted if c.path not in whole]


def misplaced_rows(found: Compacted, trial_ids: pa.ChunkedArray) -> str | None:
    """Why a compacted file's rows do not match its list (a row of another trial than its
    stem's), or None."""
    expected = np.repeat([trial_of(s) for s, _ in found.stems], [n for _, n in found.stems])
    actual = np.asarray(trial_ids.to_pylist(), dtype=object)
    if len(actual) != len(expected):
        return f"holds {len(actual)} rows, lists {len(expected)}"
    wrong = np.flatnonzero(actual != expected.astype(object))
    if len(wrong):
        return f"row {int(wrong[0])} is of trial {actual[wrong[0]]}, listed as {expected[wrong[0]]}"
    return None
