"""Data larger than memory: images read per batch, from an npz file's uncompressed members
memory-mapped in place or from an image folder's files, through a torch DataLoader with
`dataset.workers` worker processes.

A streaming split is a `StreamedImages`: rows of a reader, indexed like a tensor (a slice or
an index array gives another view, nothing read) and read into a float32 (B, C, H, W) tensor in
[0, 1] by `.to(device)`, so `runtime.predict`, which moves a chunk at a time, evaluates it
without holding it. A batch holds exactly the values the in-memory loader gives (the same
conversion, row by row), so streamed and in-memory training agree bit for bit. Labels are
small and stay in memory.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from advlab.data import DataError

__all__ = ["FolderRows", "MemmapRows", "StreamedImages", "batches", "member_offsets"]

_CHECK_ROWS = 4096  # rows per read when checking a float array's range


def _convert(x: np.ndarray, layout_last: bool) -> Tensor:
    """Rows as stored -> float32 (B, C, H, W) in [0, 1], as advlab.sources converts them."""
    if x.ndim == 3:
        x = x[:, None]
    elif layout_last:
        x = x.transpose(0, 3, 1, 2)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).clamp_(0.0, 1.0)


class MemmapRows:
    """One image array of an npz file, memory-mapped where its member lies (opened lazily in
    each process, so a DataLoader worker maps it rather than receiving a copy)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any],
                 layout_last: bool) -> None:  # fmt: skip
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.layout_last = layout_last
        self._array: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_array": None}

    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(
                self.path, self.dtype, "r", offset=self.offset, shape=self.shape
            )
        return self._array

    def read(self, rows: np.ndarray) -> Tensor:
        return _convert(self.array()[rows], self.layout_last)


class FolderRows:
    """Image files of one split, decoded when read (as advlab.datafiles decodes them)."""

    def __init__(self, files: Sequence[Path], rgb: bool) -> None:
        self.files, self.rgb = list(files), rgb

    def read(self, rows: np.ndarray) -> Tensor:
        from advlab.datafiles import read_image

        images = [np.asarray(read_image(self.files[int(i)], self.rgb)) for i in rows]
        return _convert(np.stack(images), layout_last=self.rgb)


class StreamedImages:
    """Rows `rows` of a reader (MemmapRows or FolderRows), shaped (N, C, H, W)."""

    device = torch.device("cpu")
    layout = ""  # the layout the stored arrays come in, as advlab.data.Dataset.layout

    def __init__(self, reader: Any, rows: np.ndarray, image_shape: tuple[int, int, int],
                 workers: int = 0) -> None:  # fmt: skip
        self.reader, self.rows, self.workers = reader, rows, workers
        self.image_shape = image_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.image_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> StreamedImages:
        if isinstance(key, Tensor):
            key = key.cpu().numpy()
        rows = self.rows[key]
        return StreamedImages(self.reader, np.atleast_1d(rows), self.image_shape, self.workers)

    def to(self, device: torch.device | str) -> Tensor:
        """The rows read into one tensor on `device` (read in order of the file, for speed)."""
        if not len(self.rows):
            return torch.zeros((0, *self.image_shape)).to(device)
        order = np.argsort(self.rows, kind="stable")
        x = torch.empty(self.shape)
        x[torch.from_numpy(order)] = self.reader.read(self.rows[order])
        return x.to(device)

    def numpy(self) -> np.ndarray:
        return self.to("cpu").numpy()


class _Batches(torch.utils.data.Dataset):
    """Item i is the i-th batch of a training order (a DataLoader worker reads it whole)."""

    def __init__(self, images: StreamedImages, order: list[Tensor]) -> None:
        self.images, self.order = images, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[self.order[i]].to("cpu")


def batches(
    x: Tensor | StreamedImages, y: Tensor, order: list[Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x[idx], y[idx]) for each index batch of `order`, in order: indexed in memory, or read
    by the streaming set's DataLoader workers (in order: no worker's timing changes a batch)."""
    if isinstance(x, Tensor):
        for idx in order:
            yield x[idx], y[idx]
        return
    loader = torch.utils.data.DataLoader(
        _Batches(x, [idx.cpu() for idx in order]), batch_size=None, num_workers=x.workers,
        pin_memory=y.device.type == "cuda",
    )  # fmt: skip
    for idx, xb in zip(order, loader, strict=True):
        yield xb.to(y.device, non_blocking=True), y[idx]


# --------------------------------------------------------------------------- npz members


def member_offsets(path: str) -> dict[str, tuple[int, tuple[int, ...], np.dtype[Any], bool]]:
    """Each array of an npz file: (byte offset of its data in the file, shape, dtype, Fortran
    order), read from the zip's local headers and the .npy headers; an npz written by
    numpy.savez_compressed (deflated members) cannot be mapped and is refused in one line."""
    from numpy.lib import format as npy

    found = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataError(
                    f"dataset.path: {path}: array {name!r} is compressed, and streaming maps "
                    "arrays in place; write the file with numpy.savez, not savez_compressed"
                )
            raw.seek(info.header_offset)
            local = raw.read(30)  # the zip local file header; its name and extra field follow
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            raw.seek(info.header_offset + 30 + name_len + extra_len)
            version = npy.read_magic(raw)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else (
                npy.read_array_header_2_0
            )  # fmt: skip
            shape, fortran, dtype = read_header(raw)
            found[name] = (raw.tell(), tuple(shape), dtype, fortran)
    return found


def check_float_rows(reader: MemmapRows, key: str, where: str) -> None:
    """A float array's pixels are finite and in [0, 1], checked a block of rows at a time."""
    array = reader.array()
    for start in range(0, len(array), _CHECK_ROWS):
        block = np.asarray(array[start : start + _CHECK_ROWS])
        if not np.isfinite(block).all():
            raise DataError(f"{where}: {key} has NaN or infinite pixels; give finite pixels")
        if block.size and (block.min() < 0 or block.max() > 1):
            raise DataError(
                f"{where}: {key} has pixels outside [0, 1] (rows {start}..); scale them to "
                "[0, 1] (attacks work in that box)"
            )
