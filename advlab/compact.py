"""Compaction: a table folder's loose per-trial and per-run files merged into one file.

Each compaction of a table writes one new compacted file (`parts` names it and says which
rows readers take) holding the current rows of every loose file and of every older compacted
file that holds rows no longer current, then removes the files it merged. The order makes a
crash harmless: the new file is written whole under a temporary name and renamed, and until
the old files are gone advlab's readers take each stem's rows once by the rule in `parts`
(a loose file and its compacted copy are the same rows). Readers that glob the folder
(pandas, polars, DuckDB) see the merged rows twice only between the rename and the last
removal; the next compaction (`advlab compact`, or any sweep's end) finishes the job. Running
it again with nothing loose changes nothing. A sweep that grows or reruns a trial writes
loose files as before; they win over compacted copies until the next compaction merges them.

Run it only while no trial of the sweep runs (`advlab sweep` does, at its end, holding the
sweep's lock; `advlab compact` takes the same lock): a loose file rewritten while it is being
merged is kept, never removed, but a trial reading as files are removed could miss them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from advlab import parts
from advlab.store import SweepStore
from advlab.tablefiles import key_column, misfiled_files
from advlab.tables import schema
from advlab.text import count, one_line

# At a sweep's end, compaction runs once its tables hold this many loose files (about 18
# trials): a small sweep keeps one readable file per trial and run, a large one a few files.
AUTO_MIN_FILES = 200
# The transfer stage keeps one file per shard and resumes by their names (advlab.transfer): its
# tables hold about one file per trial and are left to it.
SHARDED = ("transfer", "transfer_examples")
ROW_GROUP = 8192  # rows are sorted by trial, so a one-trial read skips the other row groups


@dataclass
class Compaction:
    """What one table's compaction did: files merged into one new file, rows it holds."""

    table: str
    merged: int
    rows: int
    skipped: list[str]


def compact_sweep(sweep_dir: str) -> list[Compaction]:
    """Compact every table of the sweep at `sweep_dir`, holding the sweep's lock."""
    store = SweepStore.from_dir(sweep_dir)
    with store.sweep_lock():
        return compact_store(store)


def compact_store(store: SweepStore) -> list[Compaction]:
    """Compact every table whose schema is known here (a plug-in's table this process cannot
    import stays as it is), skipping tables with nothing to do."""
    done = []
    for table in _compactable(store):
        try:
            schema(table)
        except KeyError:
            continue
        outcome = compact_table(store, table)
        if outcome is not None:
            done.append(outcome)
    return done


def _compactable(store: SweepStore) -> list[str]:
    return [t for t in store.tables() if t not in SHARDED]


def summary_line(done: list[Compaction]) -> str:
    """One line: how many files were merged into how many, or that there was nothing to do."""
    if not done:
        return "advlab: compact: nothing to merge (every table is one file per compaction)"
    merged = sum(d.merged for d in done)
    tables = count(len(done), "table")
    line = f"advlab: compacted {count(merged, 'parquet file')} into one per table ({tables})"
    skipped = [s for d in done for s in d.skipped]
    return line + (f"; left {len(skipped)} unreadable in place" if skipped else "")


def compact_after_sweep(store: SweepStore) -> str | None:
    """The end of a sweep: compact once it holds AUTO_MIN_FILES loose files, or once it was
    compacted before (so a rerun's rows, read twice by globbing readers while loose, are
    merged), and say so. A failure here loses nothing (the loose files stay and read as
    before), so it is said in one line, not raised. None when there was nothing to do."""
    try:
        files = [p for t in _compactable(store) for p in store.trial_files(t)]
        loose = sum(not parts.is_compacted(p) for p in files)
        if loose < AUTO_MIN_FILES and loose == len(files):
            return None
        if not loose:
            return None
        return summary_line(compact_store(store))
    except (OSError, pa.ArrowException) as err:
        why = one_line(err, 200)
        return f"advlab: compaction failed ({why}); results stand; run `advlab compact {store.uri}`"


def compact_table(store: SweepStore, table: str) -> Compaction | None:
    """Merge the table's loose files and stale compacted files into one new compacted file,
    then remove them; None when there is nothing to merge (idempotent)."""
    files = _listing(store, table)
    loose = [p for p in files if not parts.is_compacted(p) and parts.stem(p) != parts.SWEEP_WIDE]
    indexes, skipped = _indexes(store, [p for p in files if parts.is_compacted(p)])
    stale = parts.stale(indexes, parts.plan(loose, indexes))
    if not loose and not stale:
        return None
    merged, unread = _read_loose(store, table, loose)
    rows = [merged, *(_current_rows(store, table, c, loose, indexes) for c in stale)]
    data = pa.concat_tables([r for r in rows if r is not None])
    ordered, stems = _sorted_by_stem(data)
    generation = 1 + max((c.generation for c in indexes), default=0)
    name = parts.name(generation, uuid.uuid4().hex[:8])
    ordered = ordered.replace_schema_metadata(parts.metadata(stems))
    # Its list beside it too, written first: if the file is damaged later, `check_files`
    # knows whose rows went with it (a truncated file's footer, where the list is, is lost).
    listing = parts.listing(store.path(table, f"{name}.parquet")).rsplit("/", 1)[1]
    store.write_file(table, listing, parts.metadata(stems)[parts.META_KEY])
    store.write_table(table, name, ordered, row_group_size=ROW_GROUP)
    done = [p for p in loose if p not in unread]
    _remove(store, table, done, files, [c.path for c in stale])
    return Compaction(table, len(done) + len(stale), ordered.num_rows, skipped + unread)


def _listing(store: SweepStore, table: str) -> dict[str, pafs.FileInfo]:
    """The table's files with their size and time, to tell a file rewritten since."""
    paths = store.trial_files(table)
    return {i.path: i for i in store.fs.get_file_info(paths)}


def _indexes(store: SweepStore, paths: list[str]) -> tuple[list[parts.Compacted], list[str]]:
    found, skipped = [], []
    for path in paths:
        try:
            found.append(parts.read_index(store.fs, path))
        except (OSError, pa.ArrowException, ValueError):
            skipped.append(path)  # damaged: left in place for check_files to move aside
    return found, skipped


def _read_loose(store: SweepStore, table: str, paths: list[str]) -> tuple[pa.Table, list[str]]:
    """The loose files' rows in the table's schema with a `__stem` column. Files that do not
    read, or hold another trial's rows, are left out (and in place, for `check_files`)."""
    try:
        data = _scan(store, table, paths)
        unread = sorted(misfiled_files(key_column(table), data))
    except (OSError, pa.ArrowException):
        pieces, unread = [], []
        for path in paths:
            try:
                piece = _scan(store, table, [path])
                if misfiled_files(key_column(table), piece):
                    raise pa.ArrowInvalid("another trial's rows")
                pieces.append(piece)
            except (OSError, pa.ArrowException):
                unread.append(path)
        data = pa.concat_tables(pieces) if pieces else _scan(store, table, [])
    if unread:
        data = data.filter(pc.invert(pc.is_in(data.column("__filename"), pa.array(unread))))
    files = data.column("__filename").combine_chunks().dictionary_encode()
    stems = pa.array([parts.stem(f) for f in files.dictionary.to_pylist()], pa.string())
    return data.drop_columns("__filename").append_column(
        "__stem", stems.take(files.indices)
    ), unread


def _scan(store: SweepStore, table: str, paths: list[str]) -> pa.Table:
    """Files read in the table's declared schema (a column a file lacks is null)."""
    declared = schema(table)
    found = ds.dataset(paths, schema=declared, format="parquet", filesystem=store.fs)
    return found.to_table(columns=[*declared.names, "__filename"])


def _with_stems(data: pa.Table, stems: list[str]) -> pa.Table:
    return data.append_column("__stem", pa.array(stems, pa.string()))


def _current_rows(
    store: SweepStore,
    table: str,
    found: parts.Compacted,
    loose: list[str],
    indexes: list[parts.Compacted],
) -> pa.Table | None:
    """A stale compacted file's rows that are still current, with their stems."""
    keep = next((m for c, m in parts.plan(loose, indexes).partial if c.path == found.path), None)
    if keep is None:
        return None
    data = _scan(store, table, [found.path]).drop_columns("__filename")
    names = [s for s, n in found.stems for _ in range(n)]
    return _with_stems(data, names).filter(pa.array(keep))


def _sorted_by_stem(data: pa.Table) -> tuple[pa.Table, list[tuple[str, int]]]:
    """Rows grouped by stem in stem order (a stable sort keeps each file's own row order),
    with the (stem, rows) list that `parts` reads back."""
    order = pc.sort_indices(data, sort_keys=[("__stem", "ascending")])
    ordered = data.take(order)
    counts = pc.value_counts(ordered.column("__stem").combine_chunks())
    found = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    stems = sorted(zip(*found, strict=True))
    return ordered.drop_columns("__stem"), [(s, int(n)) for s, n in stems]


def _remove(
    store: SweepStore,
    table: str,
    loose: list[str],
    seen: dict[str, pafs.FileInfo],
    stale: list[str],
) -> None:
    """Remove what the new file holds: loose files unchanged since they were read (one
    rewritten meanwhile is newer, so it stays and wins), then the stale compacted files."""
    now = {i.path: i for i in store.fs.get_file_info(loose)}
    for path in loose:
        before, after = seen[path], now[path]
        if after.type == pafs.FileType.File and (after.mtime_ns, after.size) == (
            before.mtime_ns,
            before.size,
        ):
            _delete(store, path)
    for path in stale:
        _delete(store, path)
    kept = {parts.listing(p) for p in store.trial_files(table) if parts.is_compacted(p)}
    for path in store.files(table, ".json"):  # lists of files gone (or never renamed in)
        if path.rsplit("/", 1)[1].startswith("." + parts.PREFIX) and path not in kept:
            _delete(store, path)


def _delete(store: SweepStore, path: str) -> None:
    store.fs.delete_file(path)
