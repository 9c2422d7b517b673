"""Parquet results under <storage>/<sweep>/: the only module that knows the file layout.

Every table is a folder of per-trial files named by trial id. A file is written to a temporary
name and then renamed, so readers never see half a file and a retried trial replaces its own
files instead of adding duplicates. The trials row is written last: its presence marks a trial
complete. Storage may be a local path or a URI that pyarrow.fs understands (s3://, gs://).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from advlab.measures import registry as measures
from advlab.tables import SCHEMAS, schema, table

TABLES = tuple(SCHEMAS)  # the core tables; measure tables are folders beside them
MANIFEST = "sweep.json"
TRANSFER_RECORD = "transfer.json"  # the transfer stage's sources, targets and failures
CHECKPOINT = "training.pt"  # a Tune checkpoint's training state, inside its folder
SEARCH_DB = "optuna.db"  # an Optuna search's study, beside the tables


class SweepBusy(RuntimeError):
    """Another advlab sweep holds this sweep folder."""

    def __init__(self, uri: str, holder: str) -> None:
        super().__init__(
            f"{uri} is in use by another advlab sweep ({holder or 'pid unknown'}); wait for it "
            "to finish, or pass --storage to run this one elsewhere"
        )


def resolve_storage(storage: str) -> str:
    """Make a local storage path absolute (trials run in other working directories)."""
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


class SweepStore:
    """The results of one sweep: <storage>/<sweep>/<table>/<trial_id>.parquet."""

    def __init__(self, storage: str, sweep: str, read_only: bool = False):
        self.uri = f"{resolve_storage(storage)}/{sweep}"
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.damaged: list[str] = []  # notes on files found damaged and skipped or moved
        # Readers (ls, load, report, checks before a run) never move or write a file: a
        # damaged one is skipped and noted in `damaged`, on read-only storage too.
        self.read_only = read_only

    @classmethod
    def from_dir(cls, sweep_dir: str, read_only: bool = False) -> SweepStore:
        """Open <storage>/<sweep> given as one path or URI (what `advlab report` takes)."""
        storage, _, sweep = resolve_storage(sweep_dir).rstrip("/").rpartition("/")
        return cls(storage, sweep, read_only)

    def reader(self) -> SweepStore:
        """The same sweep folder, opened read-only (see `read_only`)."""
        return SweepStore(self.storage, self.sweep, read_only=True)

    @property
    def sweep(self) -> str:
        return self.uri.rsplit("/", 1)[1]

    @property
    def storage(self) -> str:
        """The storage root that holds this sweep's folder (a path or URI)."""
        return self.uri.rsplit("/", 1)[0]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p for p in parts if p)])

    @property
    def is_remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    def ray_dir(self) -> str:
        """Ray Tune's own experiment state (a URI for remote storage, which Tune syncs to)."""
        return f"{self.uri}/ray" if self.is_remote else self.path("ray")

    def wandb_dir(self) -> str:
        """Where W&B writes its offline runs: the sweep folder itself, or for remote storage a
        local staging folder that `sync_wandb` copies up."""
        if not self.is_remote:
            return self.path()
        return os.path.join(tempfile.gettempdir(), "advlab-wandb", _safe(self.uri))

    def sync_wandb(self) -> None:
        """Copy the local staging folder's offline runs up to <uri>/wandb (remote storage), so
        they outlive the node that wrote them; a no-op on local storage, written in place."""
        local = os.path.join(self.wandb_dir(), "wandb")
        if not self.is_remote or not os.path.isdir(local):
            return
        pafs.copy_files(
            local,
            self.path("wandb"),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def wandb_runs(self) -> str:
        """The offline runs, as a glob for `wandb sync`."""
        return f"{self.uri}/wandb/offline-run-*"

    def latest_checkpoint(self, trial_id: str) -> dict[str, Any] | None:
        """The furthest training checkpoint any earlier Tune run left for this trial (Tune
        keeps them under ray/<run>/<trial id>/checkpoint_*/training.pt), or None. One that
        does not load is passed over (`check_files` moves such files aside before a sweep)."""
        best: dict[str, Any] | None = None
        for path in self.checkpoint_files(trial_id):
            try:
                with self.fs.open_input_stream(path) as source:
                    state = torch.load(
                        io.BytesIO(source.read()), map_location="cpu", weights_only=True
                    )
                steps = len(state["history"])
            except Exception as err:  # truncated, empty, not ours: never resume from it
                self.damaged.append(f"{self._relative(path)} ({' '.join(str(err).split())[:120]})")
                continue
            if best is None or steps > len(best["history"]):
                best = state
        return best

    def checkpoint_files(self, trial_id: str | None = None) -> list[str]:
        """The training checkpoints earlier Tune runs left (of one trial, or of all)."""
        selector = pafs.FileSelector(self.ray_dir_path(), recursive=True, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            parts = info.path.rsplit("/", 3)
            if len(parts) < 4 or parts[-1] != CHECKPOINT or info.type != pafs.FileType.File:
                continue
            if trial_id is None or parts[-3] == trial_id:
                found.append(info.path)
        return sorted(found)

    def tune_configs(self) -> list[dict[str, Any]]:
        """The config of every Tune trial any run of this sweep started (params.json)."""
        selector = pafs.FileSelector(self.ray_dir_path(), recursive=True, allow_not_found=True)
        configs = []
        for info in self.fs.get_file_info(selector):
            if info.path.endswith("/params.json"):
                with self.fs.open_input_stream(info.path) as source:
                    configs.append(json.loads(source.read().decode()))
        return configs

    def ray_dir_path(self) -> str:
        return self.path("ray")

    def files_dir(self, trial_id: str, measure: str) -> str | None:
        """A folder for the files one measure run writes (unit analysis' PNG images):
        files/<measure>/<trial>. Local storage only."""
        return None if self.is_remote else self.path("files", measure, trial_id)

    def shared_dir(self, measure: str) -> str | None:
        """A folder one measure's runs share across the sweep's trials (a model fitted to the
        training data alone, fitted once): files/<measure>/shared. Local storage only."""
        return None if self.is_remote else self.path("files", measure, "shared")

    def search_db(self) -> str:
        """The SQLite URL of an Optuna search's study (local storage)."""
        return f"sqlite:///{self.path(SEARCH_DB)}"

    def write_table(self, table: str, trial_id: str, data: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(data, sink)
        self._write_atomic(table, f"{trial_id}.parquet", sink.getvalue())

    def _write_atomic(self, folder: str, name: str, payload: bytes) -> None:
        """Write to a hidden temporary name, then rename: readers never see half a file."""
        self.fs.create_dir(self.path(folder), recursive=True)
        temp = self.path(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(temp) as out:
            out.write(payload)
        self.fs.move(temp, self.path(folder, name))

    def save_model(self, key: str, state: dict[str, Any]) -> None:
        """Trained weights and training history under models/<training key>.pt."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write_atomic("models", f"{key}.pt", buffer.getvalue())

    def load_model(self, key: str) -> dict[str, Any] | None:
        """A cached trained model, or None when there is none or its file is damaged (then it
        is moved to damaged/ and the model is trained again)."""
        path = self.path("models", f"{key}.pt")
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(path) as source:
                # weights_only: a results folder is data, and must never run code when loaded.
                return torch.load(io.BytesIO(source.read()), map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, or not a torch file: damage, whatever the kind
            self.set_aside(path, err)
            return None

    def quarantine(
        self, path: str, err: BaseException | str, then: str = "its work runs again"
    ) -> str:
        """Move a damaged file out of the way, to damaged/ (kept for a look, never read), and
        note why and what follows; returns the line that says so."""
        relative = self._relative(path)
        stamp = uuid.uuid4().hex[:8]
        target = self.path("damaged", f"{relative}.{stamp}")
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self.fs.move(path, target)
        why = " ".join(str(err).split())[:120]
        line = f"{relative} is damaged ({why}); moved to damaged/, {then}"
        self.damaged.append(line)
        return line

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise work on one name across processes (local storage; a no-op for URIs, where
        concurrent trials may both do the work, with the same result)."""
        if self.is_remote:
            yield
            return
        local = self.path("models")
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, f".{name}.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def sweep_lock(self) -> Iterator[None]:
        """Hold the sweep folder for one `advlab sweep` at a time: a second one on the same
        folder would run every unfinished trial again beside the first. Local storage only
        (object stores have no locks; there, run one sweep per folder)."""
        if self.is_remote:
            yield
            return
        os.makedirs(self.path(), exist_ok=True)
        with open(self.path(".sweep.lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise SweepBusy(self.uri, handle.read().strip()) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def locator(self, *parts: str) -> str:
        """A file's local path, or its URI on remote storage (what W&B artifacts point at)."""
        return f"{self.uri}/{'/'.join(parts)}" if self.is_remote else self.path(*parts)

    def model_file(self, key: str) -> str:
        return self.locator("models", f"{key}.pt")

    def result_files(self) -> list[tuple[str, str]]:
        """Every parquet file of every table and sweep.json: (name inside the sweep folder,
        local path or URI)."""
        files = [
            (f"{name}/{os.path.basename(path)}", self.locator(name, os.path.basename(path)))
            for name in self.tables()
            for path in self.trial_files(name)
        ]
        if self.fs.get_file_info(self.path(MANIFEST)).type != pafs.FileType.NotFound:
            files.append((MANIFEST, self.locator(MANIFEST)))
        return files

    def write_rows(
        self, name: str, trial_id: str, rows: list[dict[str, Any]], part: str = ""
    ) -> None:
        """A trial's rows of one table, in that table's declared schema; `part` names one of
        several files of the trial (an attack run: `<trial_id>.<attack>.parquet`)."""
        self.write_table(name, f"{trial_id}.{part}" if part else trial_id, table(name, rows))

    def trial_parts(self, name: str, trial_id: str, part: str | None = None) -> list[str]:
        """The files one trial wrote to a table: its own, then one per attack or measure run
        (only the file of run `part` when given)."""
        if part is not None:
            path = self.path(name, f"{trial_id}.{part}.parquet")
            return [path] if self.fs.get_file_info(path).type == pafs.FileType.File else []
        return [
            path
            for path in self.trial_files(name)
            if path.rsplit("/", 1)[1].split(".", 1)[0] == trial_id
        ]

    def write_part(self, name: str, trial_id: str, part: str, data: pa.Table | None) -> None:
        """One run's file of a table, replaced; None removes it (a rerun that left no rows
        must not leave the earlier run's rows behind)."""
        if data is not None:
            self.write_table(name, f"{trial_id}.{part}", data)
            return
        for path in self.trial_parts(name, trial_id, part):
            self.fs.delete_file(path)

    def read_trial(self, name: str, trial_id: str) -> pd.DataFrame:
        """One trial's rows of a table (every part), empty with the table's columns if none."""
        return self.read(name, paths=self.trial_parts(name, trial_id))

    def trial_files(self, table: str) -> list[str]:
        """The table's parquet files (none when its folder is missing or is no folder)."""
        selector = pafs.FileSelector(self.path(table), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (NotADirectoryError, OSError):  # something else stands where the folder goes
            return []
        found = [i for i in infos if i.path.endswith(".parquet")]
        for info in found:  # a FIFO or folder named like a file: reading it would block
            note = f"{self._relative(info.path)} (not a regular file), left in place"
            if info.type != pafs.FileType.File and note not in self.damaged:
                self.damaged.append(note)
        return sorted(i.path for i in found if i.type == pafs.FileType.File)

    def read(
        self, table: str, columns: list[str] | None = None, paths: list[str] | None = None
    ) -> pd.DataFrame:
        """Every file of one table (or `paths` of it), each cast to the table's declared schema
        (a column a file lacks reads as null; integers and booleans as pandas' nullable types,
        so a null stays null). A damaged file, or one of another table or trial (`foreign_file`),
        is left out and noted in `damaged`
        (`check_files` moves such files away before a sweep resumes). A table whose measure is
        not registered here reads with each file's own schema."""
        declared = _declared(table, columns)
        parts = []
        for path in self.trial_files(table) if paths is None else paths:
            try:
                found = pq.read_table(path, filesystem=self.fs)
                if (foreign := foreign_file(table, path, found)) is not None:
                    raise pa.ArrowInvalid(foreign)
                parts.append(found if declared is None else _conform(found, declared))
            except (OSError, pa.ArrowException) as err:
                self.damaged.append(f"{self._relative(path)} ({' '.join(str(err).split())[:120]})")
        if parts:
            merged = pa.concat_tables(parts, promote_options="permissive")
        else:
            merged = (declared or pa.schema([])).empty_table()
        return merged.to_pandas(types_mapper=_nullable_types)

    def tables(self) -> list[str]:
        """The tables this sweep holds: the core ones, then every other folder of parquet
        files (measure tables), in name order."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        folders = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        extra = [f for f in folders if f not in measures.RESERVED and self.trial_files(f)]
        return [*TABLES, *extra]

    def read_manifest(self) -> dict[str, Any] | None:
        """sweep.json: the sweep's versions and trials (advlab.manifest), None if not yet run."""
        return self.read_json(MANIFEST)

    def write_manifest(self, payload: dict[str, Any]) -> None:
        self.write_json(MANIFEST, payload)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        self._write_atomic("", name, json.dumps(payload, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON record, or None when absent or damaged (then moved to damaged/, unless this
        store only reads: then noted in `damaged`)."""
        path = self.path(name)
        kind = self.fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            return None
        if kind != pafs.FileType.File:  # a FIFO would block the read
            self.set_aside(path, "not a regular file")
            return None
        try:
            with self.fs.open_input_stream(path) as source:
                found = json.loads(source.read().decode())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            self.set_aside(path, err)
            return None
        if not isinstance(found, dict):
            self.set_aside(path, "not a JSON object")
            return None
        return found

    def set_aside(self, path: str, err: BaseException | str) -> None:
        """A damaged file found while reading: moved to damaged/ by a store that writes (its
        work runs again), only noted by one that reads."""
        if not self.read_only:
            self.quarantine(path, err)
            return
        why = " ".join(str(err).split())[:120]
        self.damaged.append(f"{self._relative(path)} ({why}), left in place")

    def _relative(self, path: str) -> str:
        """A path inside the sweep folder, as messages name it."""
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    def check_files(self) -> list[str]:
        """Before a sweep resumes: move every damaged file aside to damaged/ so its work runs
        again: results files (a damaged attack-run file takes that run's other files with it,
        its results must come as a set; a damaged trial file takes the trial's row, so the
        trial reruns), cached models (the trials trained with one rerun and retrain it: a
        model that does not load is never trusted) and training checkpoints (the trial
        restarts from an earlier one, or from scratch)."""
        lines = []
        for kind in self.tables():
            for path in self.trial_files(kind):
                if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                    continue  # moved already, with a sibling
                try:
                    keys = pq.read_schema(path, filesystem=self.fs).names
                    found = pq.read_table(path, columns=_keys(kind, keys), filesystem=self.fs)
                    if (foreign := foreign_file(kind, path, found)) is not None:
                        raise pa.ArrowInvalid(foreign)
                except (OSError, pa.ArrowException) as err:
                    lines.append(self.quarantine(path, err))
                    self._quarantine_siblings(kind, path.rsplit("/", 1)[1])
        return lines + self._check_models() + self._check_checkpoints()

    def _check_models(self) -> list[str]:
        lines = []
        for path in self._files("models", ".pt"):
            problem = torch_file_problem(self.fs, path)
            if problem is None:
                continue
            key = path.rsplit("/", 1)[1].removesuffix(".pt")
            lines.append(self.quarantine(path, problem, "the trials trained with it retrain"))
            trials = self.read("trials", ["trial_id", "training_key"])
            for trial_id in trials.loc[trials["training_key"] == key, "trial_id"]:
                row = self.path("trials", f"{trial_id}.parquet")
                if self.fs.get_file_info(row).type == pafs.FileType.File:
                    self.quarantine(row, f"its model {key}.pt is damaged", "the trial reruns")
        return lines

    def _check_checkpoints(self) -> list[str]:
        return [
            self.quarantine(path, problem, "its trial restarts without it")
            for path in self.checkpoint_files()
            if (problem := torch_file_problem(self.fs, path)) is not None
        ]

    def _files(self, folder: str, suffix: str) -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (NotADirectoryError, OSError):
            return []
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def _quarantine_siblings(self, kind: str, name: str) -> None:
        stem = name.removesuffix(".parquet")
        trial_id, _, part = stem.partition(".")
        for other in self.tables():
            if part:  # an attack run: all its parts
                siblings = [self.path(other, name)]
            elif other == "trials" and kind != "trials":  # a trial file: its row
                siblings = [self.path("trials", f"{trial_id}.parquet")]
            else:
                siblings = []
            for sibling in siblings:
                if self.fs.get_file_info(sibling).type != pafs.FileType.NotFound:
                    self.quarantine(sibling, f"goes with the damaged {kind}/{name}")


# Errors of storage itself, not of the work: said as what is wrong with the storage.
def _key(table: str) -> str | None:
    """The column every row of a table's files must hold: its trial's id (the transfer
    table: its target); None for a measure table not registered here."""
    try:
        names = schema(table).names
    except KeyError:
        return None
    return "trial_id" if "trial_id" in names else "target"


def _keys(table: str, present: list[str]) -> list[str]:
    key = _key(table)
    return [key] if key is not None and key in present else []


def foreign_file(table: str, path: str, found: pa.Table) -> str | None:
    """Why a parquet file in a table's folder is none of that table's files: its key column is
    missing (another table's file, or someone else's), or a trial's file holds another
    trial's rows; None when it belongs."""
    key = _key(table)
    if key is None:
        return None
    if key not in found.column_names:
        return f"not a {table} file: it has no {key} column"
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    if key == "trial_id" and stem != "all":
        others = {t for t in found.column(key).to_pylist() if t != stem}
        if others:
            return f"holds rows of trial {sorted(map(str, others))[0]}, not of {stem}"
    return None


def torch_file_problem(fs: pafs.FileSystem, path: str) -> str | None:
    """Why a file torch.save wrote cannot be loaded (empty, truncated, not a zip archive), or
    None. Reads the archive's directory only (at its end), not the weights."""
    try:
        with fs.open_input_file(path) as handle:
            if handle.size() == 0:
                return "an empty file"
            with zipfile.ZipFile(handle) as archive:  # type: ignore[arg-type]
                archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return f"not a complete torch file: {err}"
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _declared(table: str, columns: list[str] | None) -> pa.Schema | None:
    try:
        declared = schema(table)
    except KeyError:
        return None
    return declared if columns is None else pa.schema([declared.field(c) for c in columns])


def _conform(found: pa.Table, declared: pa.Schema) -> pa.Table:
    arrays = [
        found.column(f.name).cast(f.type)
        if f.name in found.column_names
        else pa.nulls(len(found), f.type)
        for f in declared
    ]
    return pa.Table.from_arrays(arrays, schema=declared)


def _nullable_types(kind: pa.DataType) -> Any:
    if pa.types.is_integer(kind):
        return pd.Int64Dtype()
    if pa.types.is_boolean(kind):
        return pd.BooleanDtype()
    return None


def list_sweeps(storage: str) -> list[SweepStore]:
    """Every sweep folder under a storage root (one with a sweep.json), in name order, opened
    read-only (listing changes nothing)."""
    root = resolve_storage(storage)
    fs, base = pafs.FileSystem.from_uri(root)
    if fs.get_file_info(base).type == pafs.FileType.File:
        raise NotADirectoryError(f"{storage} is not a folder; give the storage root of sweeps")
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            store = SweepStore(root, info.base_name, read_only=True)
            if fs.get_file_info(store.path(MANIFEST)).type == pafs.FileType.File:
                found.append(store)
    return sorted(found, key=lambda store: store.sweep)
