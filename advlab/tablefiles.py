"""Reading a table folder's files: one scan for the loose files, each compacted file by its
list (`parts`), every file checked to belong (its key column, its trial) and cast to the
table's declared schema. store.py lists the files; this module reads them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from advlab import parts
from advlab.tables import schema

Note = Callable[[str, Any], None]  # (path, why): a file left out


def read_loose(
    fs: pafs.FileSystem, table: str, paths: list[str], declared: pa.Schema | None, note: Note
) -> list[pa.Table]:
    """Loose files in one dataset scan; one by one (to name the bad one) if that fails."""
    key = key_column(table)
    if not paths or declared is None or key is None:
        return read_each(fs, table, paths, declared, note)
    names = list(dict.fromkeys([*declared.names, key]))
    wide = pa.schema([schema(table).field(n) for n in names])
    try:
        found = ds.dataset(paths, schema=wide, format="parquet", filesystem=fs)
        data = found.to_table(columns=[*names, "__filename"])
    except (OSError, pa.ArrowException):
        return read_each(fs, table, paths, declared, note)
    bad = misfiled_files(key, data)
    if bad:
        mask = pc.invert(pc.is_in(data.column("__filename"), pa.array(sorted(bad))))
        data = data.filter(mask)
        return [data.select(declared.names), *read_each(fs, table, sorted(bad), declared, note)]
    return [data.select(declared.names)]


def read_each(
    fs: pafs.FileSystem, table: str, paths: list[str], declared: pa.Schema | None, note: Note
) -> list[pa.Table]:
    pieces = []
    for path in paths:
        try:
            found = pq.read_table(path, filesystem=fs)
            if (foreign := foreign_file(table, path, found)) is not None:
                raise pa.ArrowInvalid(foreign)
            pieces.append(found if declared is None else conform(found, declared))
        except (OSError, pa.ArrowException) as err:
            note(path, err)
    return pieces


def read_compacted(
    fs: pafs.FileSystem,
    table: str,
    found: parts.Compacted,
    keep: np.ndarray | None,
    declared: pa.Schema | None,
    note: Note,
) -> pa.Table | None:
    """A compacted file's rows (those `keep` marks, or all), checked against its list. Rows
    of one trial (a trial reading its own results) come from the row groups holding them."""
    try:
        if (key := key_column(table)) is not None:
            keys = pq.read_table(found.path, columns=[key], filesystem=fs).column(key)
            if (problem := parts.misplaced_rows(found, keys)) is not None:
                raise pa.ArrowInvalid(problem)
        if keep is None:
            data = pq.read_table(found.path, filesystem=fs)
        else:
            data = _marked_rows(pq.ParquetFile(found.path, filesystem=fs), keep)
    except (OSError, pa.ArrowException, KeyError) as err:
        note(found.path, err)
        return None
    return data if declared is None else conform(data, declared)


def _marked_rows(handle: pq.ParquetFile, keep: np.ndarray) -> pa.Table:
    """The rows `keep` marks, reading only the row groups that hold any."""
    sizes = [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)]
    bounds = np.cumsum([0, *sizes])
    groups = [i for i in range(len(sizes)) if keep[bounds[i] : bounds[i + 1]].any()]
    data = handle.read_row_groups(groups)
    marks = [keep[bounds[i] : bounds[i + 1]] for i in groups]
    return data.filter(pa.array(np.concatenate(marks) if marks else np.zeros(0, bool)))


def key_column(table: str) -> str | None:
    """The column every row of a table's files must hold: its trial's id (the transfer
    table: its target); None for a measure table not registered here."""
    try:
        names = schema(table).names
    except KeyError:
        return None
    return "trial_id" if "trial_id" in names else "target"


def misfiled_files(key: str | None, data: pa.Table) -> set[str]:
    """The files (`__filename`) among a scan's rows that are another trial's or table's: a
    row with no key, or of another trial than its file's name says."""
    if key is None or data.num_rows == 0:  # empty files hold nobody's rows
        return set()
    files = data.column("__filename").dictionary_encode().combine_chunks()
    owners = pa.array([parts.trial_of(parts.stem(f)) for f in files.dictionary.to_pylist()])
    expected = owners.take(files.indices)
    found = data.column(key).combine_chunks().cast(pa.string())
    wrong = pc.fill_null(pc.not_equal(found, expected), True)
    if key == "trial_id":
        wide = pc.equal(expected, parts.SWEEP_WIDE)
    else:  # the transfer table's files are named for no trial
        wide = pa.array([True] * len(found), type=pa.bool_())
    wrong = pc.or_(pc.and_(wrong, pc.invert(wide)), pc.is_null(found))
    return set(pc.unique(data.column("__filename").filter(wrong)).to_pylist())


def foreign_file(table: str, path: str, found: pa.Table) -> str | None:
    """Why a parquet file in a table's folder is none of that table's files: its key column is
    missing (another table's file, or someone else's), or a trial's file holds another
    trial's rows; None when it belongs."""
    key = key_column(table)
    if key is None:
        return None
    if key not in found.column_names:
        return f"not a {table} file: it has no {key} column"
    stem = parts.trial_of(parts.stem(path))
    if key == "trial_id" and stem != parts.SWEEP_WIDE and not parts.is_compacted(path):
        others = {t for t in found.column(key).to_pylist() if t != stem}
        if others:
            return f"holds rows of trial {sorted(map(str, others))[0]}, not of {stem}"
    return None


def conform(found: pa.Table, declared: pa.Schema) -> pa.Table:
    arrays = [
        found.column(f.name).cast(f.type)
        if f.name in found.column_names
        else pa.nulls(len(found), f.type)
        for f in declared
    ]
    return pa.Table.from_arrays(arrays, schema=declared)
