"""Parquet results under <storage>/<sweep>/: the only module that knows the file layout.

Every table is a folder of per-trial files named by trial id. A file is written to a temporary
name and then renamed, so readers never see half a file and a retried trial replaces its own
files instead of adding duplicates. The trials row is written last: its presence marks a trial
complete. Storage may be a local path or a URI that pyarrow.fs understands (s3://, gs://):
every file operation goes through one pyarrow.fs filesystem (`filesystem`), the one Ray Tune
takes for its checkpoints too, so local paths and object storage behave alike. On object
storage a file is written as one whole object (a PUT, or a multipart upload, appears whole or
not at all), never appended to or renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from advlab import parts, wandb_staging
from advlab.filesystems import check_reachable, filesystem, is_object_store
from advlab.measures import registry as measures
from advlab.model_store import FOLDER as MODELS
from advlab.model_store import ModelStore
from advlab.tablefiles import foreign_file, key_column, read_compacted, read_loose
from advlab.tables import SCHEMAS, schema, table
from advlab.text import one_line

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
        self.fs, self.root = filesystem(self.uri)
        self._staging: str | None = None  # W&B's local folder on remote storage, this store's
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

    def check_reachable(self) -> None:
        """Remote storage answers and holds the bucket, or BadStorage in one line."""
        check_reachable(self.fs, self.root, self.uri)

    def tune_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """Ray Tune's storage_path and storage_filesystem for its experiment state and
        checkpoints: this store's own filesystem object on remote storage (so Tune reaches the
        same endpoint), a plain local path otherwise."""
        if self.is_remote:
            return self.ray_dir_path(), self.fs
        return self.path("ray"), None

    def wandb_dir(self) -> str:
        """Where W&B writes its offline runs: the sweep folder itself, or for remote storage a
        local staging folder of this store alone (a trial's, the driver's), which `sync_wandb`
        copies up. Folders a killed process left (a trial that reruns, so a new W&B run
        replaces its part-run, as `track.drop_earlier_runs` does on local storage) go first."""
        if not self.is_remote:
            return self.path()
        if self._staging is None:
            self._staging = wandb_staging.staging_dir(self.sweep)
        return self._staging

    def sync_wandb(self) -> None:
        """Copy the offline runs W&B finished in the staging folder up to <uri>/wandb (remote
        storage), each file one whole object, then remove them here: they outlive the node
        that wrote them, and no results stay on it. A no-op on local storage, written in place.
        W&B's own links (latest-run, debug logs) are not uploaded."""
        if not self.is_remote or self._staging is None:
            return
        wandb_staging.upload_runs(self._staging, self._write_atomic)
        self._staging = None

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

    def write_table(
        self, table: str, trial_id: str, data: pa.Table, row_group_size: int | None = None
    ) -> None:
        sink = io.BytesIO()
        pq.write_table(data, sink, row_group_size=row_group_size)
        self._write_atomic(table, f"{trial_id}.parquet", sink.getvalue())

    def _write_atomic(self, folder: str, name: str, payload: bytes) -> None:
        """Write to a hidden temporary name, then rename: readers never see half a file. On
        object storage the object itself is written whole (a rename there is a copy)."""
        if is_object_store(self.fs):  # one upload: the object appears whole, or not at all
            with self.fs.open_output_stream(self.path(folder, name)) as out:
                out.write(payload)
            return
        self.fs.create_dir(self.path(folder), recursive=True)
        temp = self.path(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(temp) as out:
            out.write(payload)
        self.fs.move(temp, self.path(folder, name))

    @property
    def models(self) -> ModelStore:
        """The storage root's model store, shared by every sweep under it (`model_store`)."""
        base = self.root.rsplit("/", 1)[0]
        return ModelStore(
            self.fs, f"{base}/{MODELS}", self.path("models"), self.read_only, self.damaged
        )

    def save_model(self, key: str, state: dict[str, Any]) -> None:
        """Trained weights and training history under <storage>/.models/<training key>.pt."""
        self.models.save(key, state)

    def load_model(self, key: str) -> dict[str, Any] | None:
        """A cached trained model, or None when there is none or its file is damaged (then it
        is moved aside and the model is trained again)."""
        return self.models.load(key)

    def quarantine(
        self, path: str, err: BaseException | str, then: str = "its work runs again"
    ) -> str:
        """Move a damaged file out of the way, to damaged/ (kept for a look, never read), and
        note why and what follows; returns the line that says so."""
        relative = self._relative(path)
        stamp = uuid.uuid4().hex[:8]
        target = self.path("damaged", f"{relative}.{stamp}")
        if not is_object_store(self.fs):
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self.fs.move(path, target)
        why = one_line(err, 120)
        line = f"{relative} is damaged ({why}); moved to damaged/, {then}"
        self.damaged.append(line)
        return line

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Serialise training of one key across processes and sweeps (see `model_store`)."""
        return self.models.lock(key)

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
        """The shared store's file of a model: its local path, or its URI on remote storage."""
        if self.is_remote:
            return f"{self.storage}/{MODELS}/{key}.pt"
        return self.models.path(key)

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

    def write_part(self, name: str, trial_id: str, part: str, data: pa.Table | None) -> None:
        """One run's file of a table, replaced; None removes its rows (a rerun that left no
        rows must not leave the earlier run's rows behind): its file goes, or, where a
        compacted file may hold them, an empty file stands in its place (`parts`)."""
        if data is not None:
            self.write_table(name, f"{trial_id}.{part}", data)
            return
        files = self.trial_files(name)
        if any(map(parts.is_compacted, files)):
            self.write_table(name, f"{trial_id}.{part}", schema(name).empty_table())
            return
        path = self.path(name, f"{trial_id}.{part}.parquet")
        if path in files:
            self.fs.delete_file(path)

    def read_trial(self, name: str, trial_id: str, part: str | None = None) -> pd.DataFrame:
        """One trial's current rows of a table (every part, or run `part`'s only), empty with
        the table's columns if none; loose or compacted alike."""
        return self.read(name, wanted=parts.of_trial(trial_id, part))

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
        self,
        table: str,
        columns: list[str] | None = None,
        wanted: Callable[[str], bool] | None = None,
    ) -> pd.DataFrame:
        """The current rows of one table (of the files whose stem `wanted` accepts), cast to
        the table's declared schema (a column a file lacks reads as null; integers and
        booleans as pandas' nullable types, so a null stays null). Loose files read in one
        pass, compacted ones by the rule in `parts`. A damaged file, or one of another table
        or trial (`foreign_file`), is left out and noted in `damaged` (`check_files` moves
        such files away before a sweep resumes). A table whose measure is not registered
        here reads with each file's own schema."""
        declared = _declared(table, columns)
        files = self.trial_files(table)
        loose = [p for p in files if not parts.is_compacted(p)]
        chosen = parts.plan(loose, self._indexes(table, files), wanted)
        pieces = read_loose(self.fs, table, chosen.loose, declared, self._note)
        for found, keep in [(c, None) for c in chosen.whole] + chosen.partial:
            piece = read_compacted(self.fs, table, found, keep, declared, self._note)
            pieces += [] if piece is None else [piece]
        if pieces:
            merged = pa.concat_tables(pieces, promote_options="permissive")
        else:
            merged = (declared or pa.schema([])).empty_table()
        return merged.to_pandas(types_mapper=_nullable_types)

    def _indexes(self, table: str, files: list[str]) -> list[parts.Compacted]:
        found = []
        for path in filter(parts.is_compacted, files):
            try:
                found.append(parts.read_index(self.fs, path))
            except (OSError, pa.ArrowException, ValueError) as err:
                self._note(path, err)
        return found

    def _note(self, path: str, err: BaseException | str) -> None:
        self.damaged.append(f"{self._relative(path)} ({' '.join(str(err).split())[:120]})")

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
        why = one_line(err, 120)
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
                problem = self._file_problem(kind, path)
                if problem is None:
                    continue
                held = self._stems_held(path) if parts.is_compacted(path) else [parts.stem(path)]
                lines.append(self.quarantine(path, problem))
                for stem in held:
                    self._remove_siblings(kind, stem)
        return lines + self._check_models() + self._check_checkpoints()

    def _file_problem(self, kind: str, path: str) -> str | None:
        """Why a results file cannot be read as one of this table's, or None."""
        try:
            keys = pq.read_schema(path, filesystem=self.fs).names
            found = pq.read_table(path, columns=_keys(kind, keys), filesystem=self.fs)
            if parts.is_compacted(path) and (key := key_column(kind)) is not None:
                problem = parts.misplaced_rows(parts.read_index(self.fs, path), found.column(key))
            else:
                problem = foreign_file(kind, path, found)
        except (OSError, pa.ArrowException, KeyError, ValueError) as err:
            return str(err)
        return problem

    def _stems_held(self, path: str) -> list[str]:
        """What a compacted file holds, from the list written beside it (its own footer may
        be what is damaged)."""
        beside = parts.listing(path)
        try:
            with self.fs.open_input_stream(beside) as source:
                return [str(s) for s, _ in json.loads(source.read().decode())]
        except (OSError, ValueError, TypeError):
            return []

    def _check_models(self) -> list[str]:
        """This sweep's models (shared or in its older folder) that do not open: moved aside,
        and the trials trained with them rerun."""
        lines = []
        trials = self.read("trials", ["trial_id", "training_key"])
        models = self.models
        for path in models.files(set(trials["training_key"].dropna())):
            problem = torch_file_problem(self.fs, path)
            if problem is None:
                continue
            key = path.rsplit("/", 1)[1].removesuffix(".pt")
            lines.append(models.set_aside(path, problem, "the trials trained with it retrain"))
            for trial_id in trials.loc[trials["training_key"] == key, "trial_id"]:
                self.remove_rows("trials", trial_id, f"its model {key}.pt is damaged")
        return lines

    def remove_rows(self, table: str, stem: str, why: str) -> None:
        """Take one file's rows out of a table so their work reruns: a loose file moves to
        damaged/; rows a compacted file may hold are hidden by an empty file (`parts`)."""
        path = self.path(table, f"{stem}.parquet")
        files = self.trial_files(table)
        if path in files:
            self.quarantine(path, why, "its work runs again")
        if any(map(parts.is_compacted, files)):
            self.write_table(table, stem, schema(table).empty_table())

    def _check_checkpoints(self) -> list[str]:
        return [
            self.quarantine(path, problem, "its trial restarts without it")
            for path in self.checkpoint_files()
            if (problem := torch_file_problem(self.fs, path)) is not None
        ]

    def write_file(self, folder: str, name: str, payload: bytes) -> None:
        """Any file of the sweep folder, written atomically (a compacted file's list)."""
        self._write_atomic(folder, name, payload)

    def files(self, folder: str, suffix: str) -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (NotADirectoryError, OSError):
            return []
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def _remove_siblings(self, kind: str, stem: str) -> None:
        """The rows that go with a damaged file's: its own (an older compacted copy must not
        come back), an attack or measure run's other parts, a trial file's trial row."""
        trial_id, _, part = stem.partition(".")
        why = f"goes with the damaged {kind}/{stem}.parquet"
        self.remove_rows(kind, stem, why)
        for other in self.tables():
            if part and other != kind:  # an attack run: all its parts
                self.remove_rows(other, stem, why)
            elif other == "trials" and kind != "trials" and not part:  # a trial file: its row
                self.remove_rows("trials", trial_id, why)


# Errors of storage itself, not of the work: said as what is wrong with the storage.
def _keys(table: str, present: list[str]) -> list[str]:
    key = key_column(table)
    return [key] if key is not None and key in present else []


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


def _declared(table: str, columns: list[str] | None) -> pa.Schema | None:
    try:
        declared = schema(table)
    except KeyError:
        return None
    return declared if columns is None else pa.schema([declared.field(c) for c in columns])


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
    fs, base = filesystem(root)
    check_reachable(fs, base, root)
    if fs.get_file_info(base).type == pafs.FileType.File:
        raise NotADirectoryError(f"{storage} is not a folder; give the storage root of sweeps")
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            store = SweepStore(root, info.base_name, read_only=True)
            if fs.get_file_info(store.path(MANIFEST)).type == pafs.FileType.File:
                found.append(store)
    return sorted(found, key=lambda store: store.sweep)
