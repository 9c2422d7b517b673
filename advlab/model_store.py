"""Trained models, one store per storage root, shared by every sweep under it.

`<storage>/.models/<training key>.pt` (sweep names never start with a dot, so no sweep folder
can take the name). A trial's training key hashes everything that decides its weights, so a
model trained by one sweep is the same model for any other sweep under the same root: the
second sweep loads it and trains nothing. Writes go to a temporary name and are renamed; a
file lock per key (local storage) makes the first trial train and the others wait and load.
A sweep written before the store was shared kept its models in `<sweep>/models/`: such a
model is still found there, and copied into the shared store on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import torch

from advlab.filesystems import is_object_store
from advlab.text import one_line

FOLDER = ".models"
DAMAGED = "damaged"


class ModelStore:
    """<root>/<key>.pt on one filesystem, with the sweep's own older folder as a fallback."""

    def __init__(
        self, fs: pafs.FileSystem, root: str, legacy: str, read_only: bool, notes: list[str]
    ) -> None:
        self.fs, self.root, self.legacy, self.read_only = fs, root, legacy, read_only
        self.notes = notes  # damaged files found (and moved aside, when writable)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}.pt"

    def legacy_path(self, key: str) -> str:
        return f"{self.legacy}/{key}.pt"

    def save(self, key: str, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write(key, buffer.getvalue())

    def _write(self, key: str, payload: bytes) -> None:
        if is_object_store(self.fs):  # one upload is atomic there; a rename would be a copy
            with self.fs.open_output_stream(self.path(key)) as out:
                out.write(payload)
            return
        self.fs.create_dir(self.root, recursive=True)
        temp = f"{self.root}/.{key}.pt.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(temp) as out:
            out.write(payload)
        self.fs.move(temp, self.path(key))

    def load(self, key: str) -> dict[str, Any] | None:
        """The model, or None when there is none or its file is damaged (moved aside when
        this store writes; the model is then trained again). A model found only in the
        sweep's own older folder is copied into the shared store."""
        for path in (self.path(key), self.legacy_path(key)):
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                continue
            try:
                with self.fs.open_input_stream(path) as source:
                    payload = source.read()
                # weights_only: a results folder is data, and must never run code when loaded.
                state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            except Exception as err:  # truncated, or not a torch file: damage, whatever the kind
                self.set_aside(path, err)
                return None
            if path != self.path(key) and not self.read_only:
                self._write(key, payload)  # migrate: the next sweep finds it in the store
            return state
        return None

    def set_aside(self, path: str, why: BaseException | str, then: str = "") -> str:
        """A damaged model moved to <root>/damaged/ (kept for a look, never read) by a store
        that writes, or only noted; returns the line that says so."""
        name = path.rsplit("/", 1)[1]
        text = one_line(why, 120)
        where = f"{FOLDER}/{name}" if path.startswith(self.root + "/") else f"models/{name}"
        if self.read_only:
            line = f"{where} ({text}), left in place"
        else:
            target = f"{self.root}/{DAMAGED}/{name}.{uuid.uuid4().hex[:8]}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            self.fs.move(path, target)
            then = then or "it is trained again"
            line = f"{where} is damaged ({text}); moved to {FOLDER}/{DAMAGED}/, {then}"
        self.notes.append(line)
        return line

    def files(self, keys: set[str]) -> list[str]:
        """The stored files of these keys, in the shared store and the older folder."""
        found = [self.path(k) for k in sorted(keys)] + [self.legacy_path(k) for k in sorted(keys)]
        infos = self.fs.get_file_info(found)
        return [i.path for i in infos if i.type == pafs.FileType.File]

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Serialise training of one key across processes and sweeps (local storage; on
        object storage concurrent trials may both train, with the same result)."""
        if not self.is_local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, f".{key}.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
