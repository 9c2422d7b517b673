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
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

TABLES = ("trials", "epochs", "examples", "curves", "properties", "transfer")

EPOCHS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("train_error", pa.float64()),
        ("test_error", pa.float64()),
        ("seconds", pa.float64()),
        ("adv_grad_evals", pa.int64()),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("attack", pa.string()),
        ("budget", pa.float64()),  # NaN for minimisation attacks, which run once for all budgets
        ("example", pa.int64()),  # position among the attacked examples
        ("dataset_index", pa.int64()),  # index into the test set
        ("label", pa.int64()),
        ("target", pa.int64()),  # -1 when untargeted
        ("clean_pred", pa.int64()),
        ("adv_pred", pa.int64()),
        ("success", pa.bool_()),
        ("dist_rms", pa.float64()),
        ("dist_l2", pa.float64()),
        ("dist_linf", pa.float64()),
        ("grad_evals", pa.int64()),
        ("x_adv", pa.list_(pa.float32())),  # the adversarial image, flattened C*H*W
    ]
)

CURVES_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("attack", pa.string()),
        ("norm", pa.string()),
        ("budget", pa.float64()),
        ("n", pa.int64()),  # attacked examples (all correctly classified when clean)
        ("success_rate", pa.float64()),
        ("robust_error", pa.float64()),  # over every test example scanned to find the n
    ]
)

PROPERTIES_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("analysis", pa.string()),  # lipschitz, unit_analysis, density
        ("layer", pa.string()),  # a layer name, "network" for the whole net, or an attack name
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

TRANSFER_SCHEMA = pa.schema(
    [
        ("source_trial", pa.string()),
        ("attack", pa.string()),
        ("budget", pa.float64()),  # NaN for minimisation attacks
        ("kind", pa.string()),  # adversarial, noise, amplified@<rms>
        ("rms", pa.float64()),  # mean per-pixel rms of the perturbation applied
        ("target", pa.string()),  # a trial id, or a control's name (trained on the source's data)
        ("target_kind", pa.string()),  # trial or control
        ("n", pa.int64()),
        ("error_adv", pa.float64()),
        ("error_clean", pa.float64()),
    ]
)

SCHEMAS = {
    "epochs": EPOCHS_SCHEMA,
    "examples": EXAMPLES_SCHEMA,
    "curves": CURVES_SCHEMA,
    "properties": PROPERTIES_SCHEMA,
    "transfer": TRANSFER_SCHEMA,
}


def resolve_storage(storage: str) -> str:
    """Make a local storage path absolute (trials run in other working directories)."""
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


class SweepStore:
    """The results of one sweep: <storage>/<sweep>/<table>/<trial_id>.parquet."""

    def __init__(self, storage: str, sweep: str):
        self.uri = f"{resolve_storage(storage)}/{sweep}"
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)

    @classmethod
    def from_dir(cls, sweep_dir: str) -> SweepStore:
        """Open <storage>/<sweep> given as one path or URI (what `advlab report` takes)."""
        storage, _, sweep = resolve_storage(sweep_dir).rstrip("/").rpartition("/")
        return cls(storage, sweep)

    @property
    def sweep(self) -> str:
        return self.uri.rsplit("/", 1)[1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p for p in parts if p)])

    def local_path(self, *parts: str) -> str | None:
        """A path usable by non-arrow writers (W&B), or None for remote storage."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.path(*parts)
        return None

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
        path = self.path("models", f"{key}.pt")
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as source:
            # weights_only: a results folder is data, and must never run code when loaded.
            return torch.load(io.BytesIO(source.read()), map_location="cpu", weights_only=True)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise work on one name across processes (local storage; a no-op for URIs, where
        concurrent trials may both do the work, with the same result)."""
        local = self.local_path("models")
        if local is None:
            yield
            return
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, f".{name}.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_rows(self, table: str, trial_id: str, rows: list[dict[str, Any]]) -> None:
        schema = SCHEMAS.get(table)
        if schema is None:
            data = pa.Table.from_pylist(rows)
        else:
            data = pa.Table.from_pylist(rows, schema=schema)
        self.write_table(table, trial_id, data)

    def trial_files(self, table: str) -> list[str]:
        selector = pafs.FileSelector(self.path(table), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    def read(self, table: str) -> pd.DataFrame:
        """Every trial's rows of one table (empty frame if none)."""
        frames = [pq.read_table(p, filesystem=self.fs).to_pandas() for p in self.trial_files(table)]
        if not frames:
            schema = SCHEMAS.get(table)
            return schema.empty_table().to_pandas() if schema is not None else pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    def finished_trial_ids(self) -> set[str]:
        return {p.rsplit("/", 1)[1].removesuffix(".parquet") for p in self.trial_files("trials")}

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        self._write_atomic("", name, json.dumps(payload, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict[str, Any] | None:
        if self.fs.get_file_info(self.path(name)).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path(name)) as source:
            return json.loads(source.read().decode())
