"""Where a trial's data comes from, in one lookup: `load_data_spec(DatasetSpec) -> Dataset`, and
`attacked_split(DatasetSpec, split)` for the images a trial attacked.

- a built-in name (digits, mnist, fashion_mnist, cifar10; see advlab.data),
- `npz`: one .npz file (`path`) holding x_train, y_train, x_test, y_test,
- `folder`: an ImageFolder layout (`path`/train/<class>/*.png and `path`/test/<class>/...),
- `module:function`: your own loader, called with `dataset.args`, returning the same four
  arrays (a mapping with those keys, or a tuple in that order).

Images may be (N, H, W) or (N, C, H, W), uint8 (scaled by 1/255) or float already in [0, 1];
labels are integers 0..K-1. Whatever the source, the arrays pass the same checks, and a problem
becomes one DataError line naming the array and the fix, before any trial starts. Per-channel
normalisation is no data transform here: it lives inside the model (advlab.models.Normalized),
so attacks and distortions stay in [0, 1] pixel space.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from advlab import digests, streaming
from advlab.data import DATASETS, DataError, Dataset, load_dataset, validate_dataset_source
from advlab.data import _images_to_tensor as images_to_tensor
from advlab.data import _labels_to_tensor as labels_to_tensor
from advlab.datafiles import folder_files, folder_layout, read_image_folder, read_npz
from advlab.plugins import PluginError, call_user, import_object, is_import_path
from advlab.resample import resample

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SPLITS = ("test", "train")  # what TrialSpec.attack_split may name
IMAGE_SUFFIXES = digests.IMAGE_SUFFIXES


def check_source(name: str, root: str | None, path: str | None) -> None:
    """The cheap checks, at spec time: the kind is known and its file or folder exists."""
    if name in DATASETS:
        if path is not None:
            raise DataError(f"dataset.path: {name} is built in and reads no file; drop path")
        validate_dataset_source(name, root)
        return
    if root is not None:
        raise DataError(
            f"dataset.root: only the built-in data sets read a root; use path for {name}"
        )
    if name in ("npz", "folder"):
        if path is None:
            raise DataError(f"dataset.path: required for {name}; give the {_what(name)}")
        want = Path(path).is_file() if name == "npz" else Path(path).is_dir()
        if not want:
            raise DataError(f"dataset.path: {path} is no {_what(name)}; check the path")
        return
    if not is_import_path(name):
        raise DataError(
            f"dataset.name: {name!r} is not a dataset; use {', '.join(DATASETS)}, npz, folder "
            "or module:function"
        )


def _what(name: str) -> str:
    return ".npz file" if name == "npz" else "folder with train/ and test/ subfolders"


def load_data(
    name: str,
    root: str | None = None,
    path: str | None = None,
    args: Mapping[str, Any] | None = None,
    streaming: bool = False,
    workers: int = 0,
) -> Dataset:
    """The dataset a DatasetSpec names (cached per process, as every trial reloads it);
    `streaming`: its images read per batch (advlab.streaming), with `workers` processes."""
    check_source(name, root, path)
    if name in DATASETS:
        return load_dataset(name, root)
    resolved = None if path is None else str(Path(path).expanduser().resolve())
    stamp = _stamp(name, resolved)
    if streaming and resolved is not None:
        return _stream_cached(name, resolved, stamp, workers)
    return _load_cached(name, resolved, stamp, json.dumps(dict(args or {}), sort_keys=True))


def _stamp(name: str, path: str | None) -> str:
    """What the cache of loaded data is keyed by besides the name: the content digest of its
    file, folder or loader module, so a file changed in place (an image rewritten inside its
    folder leaves the folder's mtime alone) is read again, as its trials' ids are new."""
    if name == "npz" and path is not None:
        return digests.file_digest(path)
    if name == "folder" and path is not None:
        return digests.folder_digest(path)
    return digests.module_digest(name)


def load_data_spec(dataset: Any) -> Dataset:
    """The data a DatasetSpec names (advlab.spec.DatasetSpec), at its `resolution`: every
    reader (trial, transfer, controls, report, validate) comes through here, so none can see
    the images at another resolution than the trial did."""
    data = load_data(
        dataset.name, dataset.root, dataset.path, dataset.args, dataset.streaming, dataset.workers
    )
    return data if dataset.resolution is None else _resampled(data, dataset.resolution)


def _resampled(data: Dataset, resolution: int) -> Dataset:
    """`data` at resolution x resolution, kept for the last two (data, resolution) pairs: the
    loaded data sets are cached objects, so the same object means the same images."""
    key = (id(data), resolution)
    held = _RESAMPLED.get(key)
    if held is not None and held[0] is data:
        return held[1]
    out = dataclasses.replace(
        data, x_train=resample(data.x_train, resolution), x_test=resample(data.x_test, resolution)
    )
    while len(_RESAMPLED) >= 2:
        _RESAMPLED.pop(next(iter(_RESAMPLED)))
    _RESAMPLED[key] = (data, out)
    return out


_RESAMPLED: dict[tuple[int, int], tuple[Dataset, Dataset]] = {}


def attacked_split(dataset: Any, split: str) -> tuple[Tensor, Tensor]:
    """Images and labels of the split a trial attacked (its `attack_split`, an examples row's
    `split`) of the data a DatasetSpec names; the examples table's dataset_index indexes them
    whole. Whoever reads attacked images back (report, transfer) comes here, so a split or a
    source kind cannot be read one way by the trial and another way by its readers."""
    if split not in SPLITS:
        raise DataError(f"attack_split: {split!r} is not a split; use {' or '.join(SPLITS)}")
    data = load_data_spec(dataset)
    return (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, path: str | None, stamp: str, args: str) -> Dataset:
    if name == "npz":
        assert path is not None
        return arrays_to_dataset(Path(path).stem, read_npz(path), f"dataset.path: {path}")
    if name == "folder":
        assert path is not None
        # Image files: (N, C, H, W) or (N, H, W) as decoded, whatever their size.
        arrays = read_image_folder(Path(path))
        return arrays_to_dataset(Path(path).name, arrays, f"dataset.path: {path}", FIRST)
    arrays = _call_loader(name, json.loads(args))
    return arrays_to_dataset(name, arrays, f"dataset.name: {name}")


@functools.lru_cache(maxsize=4)
def _stream_cached(name: str, path: str, stamp: str, workers: int) -> Dataset:
    """A streaming Dataset: labels in memory, images as StreamedImages (checked as a loaded
    set is: layout, dtype, range, shapes, classes)."""
    where = f"dataset.path: {path}"
    if name == "npz":
        images, labels = _npz_streams(path, where)
    else:
        images, labels = _folder_streams(Path(path), where)
    shapes = {split: x.image_shape for split, x in images.items()}
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"{where}: x_train images are {shapes['train']} but x_test {shapes['test']}; "
            "give both the same shape"
        )
    for split in ("train", "test"):
        if len(images[split]) != len(labels[split]):
            raise DataError(
                f"{where}: x_{split} has {len(images[split])} images but y_{split} "
                f"{len(labels[split])} labels; give one label per image"
            )
        if len(labels[split]) == 0:
            raise DataError(f"{where}: x_{split} is empty; give at least one example")
        images[split].workers = workers
    _check_classes(labels["train"], labels["test"], where)
    layout = next(iter(images.values())).layout
    return Dataset(
        name=Path(path).stem if name == "npz" else Path(path).name,
        x_train=images["train"], y_train=labels_to_tensor(labels["train"]),  # type: ignore[arg-type]
        x_test=images["test"], y_test=labels_to_tensor(labels["test"]),  # type: ignore[arg-type]
        layout=layout,
    )  # fmt: skip


def _npz_streams(path: str, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    members = streaming.member_offsets(path)
    missing = [k for k in ARRAYS if k not in members]
    if missing:
        raise DataError(
            f"{where}: no array {missing[0]!r}; give x_train, y_train, x_test and y_test"
        )
    images, labels = {}, {}
    with np.load(path, allow_pickle=False) as archive:
        for split in ("train", "test"):
            labels[split] = _labels(archive[f"y_{split}"], f"y_{split}", where)
    for split in ("train", "test"):
        key = f"x_{split}"
        offset, shape, dtype, fortran = members[key]
        layout = image_layout(shape, key, where)
        if fortran or (dtype != np.uint8 and dtype.kind != "f"):
            raise DataError(
                f"{where}: {key} holds {'Fortran-ordered ' if fortran else ''}{dtype}; streaming "
                "reads C-ordered uint8 (0..255) or floats in [0, 1]"
            )
        last = layout == LAYOUTS[2]
        reader = streaming.MemmapRows(path, offset, shape, dtype, last)
        if dtype.kind == "f":
            streaming.check_float_rows(reader, key, where)
        chw = (1, *shape[1:]) if len(shape) == 3 else (
            (shape[3], shape[1], shape[2]) if last else shape[1:]
        )  # fmt: skip
        images[split] = _streamed(reader, shape[0], chw, layout, key, where)
    return images, labels


def _folder_streams(root: Path, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    files = folder_files(root)
    rgb, (width, height) = folder_layout(root, [f for found in files.values() for f, _ in found])
    chw = (3 if rgb else 1, height, width)
    images, labels = {}, {}
    for split, found in files.items():
        reader = streaming.FolderRows([f for f, _ in found], rgb)
        images[split] = _streamed(reader, len(found), chw, FIRST, f"x_{split}", where)
        labels[split] = np.array([label for _, label in found], dtype=np.int64)
    return images, labels


def _streamed(reader: Any, n: int, chw: tuple[int, ...], layout: str, key: str,
              where: str) -> streaming.StreamedImages:  # fmt: skip
    if 0 in chw:
        raise DataError(f"{where}: {key} images are {chw} (C, H, W): no pixels; give images")
    images = streaming.StreamedImages(reader, np.arange(n), tuple(int(s) for s in chw))
    images.layout = layout
    return images


def _call_loader(name: str, args: dict[str, Any]) -> Any:
    loader = resolve_import(name, "dataset.name")
    return call_user(loader, "dataset.name", f"{name}(**dataset.args)", **args, error=DataError)


def resolve_import(path: str, key: str) -> Callable[..., Any]:
    """`module:function` imported (modules beside the sweep file are on sys.path)."""
    try:
        found = import_object(path, key)
    except PluginError as err:
        raise DataError(str(err)) from None
    if not callable(found):
        raise DataError(f"{key}: {path} is a {type(found).__name__}, not a function")
    return found


# --------------------------------------------------------------------------- checks


def arrays_to_dataset(name: str, arrays: Any, where: str, layout: str | None = None) -> Dataset:
    """Four arrays, checked and converted to advlab's Dataset (float32 NCHW in [0,1], int64);
    their layout is found from their shapes (`image_layout`) unless `layout` says it."""
    arrays = _as_mapping(arrays, where)
    (x_train, found), (x_test, _) = (
        _images(arrays[k], k, where, layout) for k in ("x_train", "x_test")
    )
    y_train, y_test = (_labels(arrays[k], k, where) for k in ("y_train", "y_test"))
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise DataError(
                f"{where}: x_{split} has {len(x)} images but y_{split} {len(y)} labels; "
                "give one label per image"
            )
        if len(x) == 0:
            raise DataError(f"{where}: x_{split} is empty; give at least one example")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{where}: x_train images are {x_train.shape[1:]} but x_test {x_test.shape[1:]}; "
            "give both the same shape"
        )
    _check_classes(y_train, y_test, where)
    return Dataset(
        name=name,
        x_train=images_to_tensor(x_train, 1.0),
        y_train=labels_to_tensor(y_train),
        x_test=images_to_tensor(x_test, 1.0),
        y_test=labels_to_tensor(y_test),
        layout=found,
    )


def _check_classes(y_train: np.ndarray, y_test: np.ndarray, where: str) -> None:
    """Labels 0..K-1, K >= 2, every class with training examples (found from the labels
    present, so a label of 10**12 costs no 10**12-entry set)."""
    present = np.unique(y_train)
    if present.size < 2:
        raise DataError(
            f"{where}: y_train holds one class ({int(present[0])}); a classifier needs at "
            "least two classes with training examples"
        )
    highest = int(max(present[-1], y_test.max()))
    if highest >= present.size:  # some label below the highest has no training example
        gaps = np.flatnonzero(present != np.arange(present.size))
        absent = int(gaps[0]) if gaps.size else int(present.size)
        raise DataError(
            f"{where}: labels run to {highest} but class {absent} has no training example; "
            "relabel as 0..K-1"
        )


def _as_mapping(arrays: Any, where: str) -> dict[str, np.ndarray]:
    if isinstance(arrays, tuple | list) and len(arrays) == 4:
        arrays = dict(zip(ARRAYS, arrays, strict=True))
    if not isinstance(arrays, Mapping):
        raise DataError(
            f"{where}: returned a {type(arrays).__name__}; return x_train, y_train, x_test, y_test"
        )
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(
            f"{where}: no array {missing[0]!r}; give x_train, y_train, x_test and y_test"
        )
    return {k: _numpy(arrays[k]) for k in ARRAYS}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


LAYOUTS = ("(N, H, W)", "(N, C, H, W)", "(N, H, W, C)")
FIRST = LAYOUTS[1]


def image_layout(shape: tuple[int, ...], key: str, where: str) -> str:
    """Which of LAYOUTS `shape` is, from the sizes: channels last when the last size is 1, 3 or
    4 and the second above 4 (as PIL and TF keep images), channels first otherwise. A shape
    that reads both ways (second size 1-4 and last 1, 3 or 4) is refused."""
    if len(shape) == 3:
        return LAYOUTS[0]
    if len(shape) != 4:
        raise DataError(
            f"{where}: {key} has shape {shape}; give images as (N, H, W), (N, C, H, W) or "
            "(N, H, W, C)"
        )
    first, last = shape[1] in (1, 2, 3, 4), shape[3] in (1, 3, 4)
    if first and last:
        raise DataError(
            f"{where}: {key} has shape {shape}, which reads as {shape[1]} channels of "
            f"{shape[2]}x{shape[3]} or {shape[3]} channels of {shape[1]}x{shape[2]}; save the "
            "images as (N, C, H, W) or (N, H, W, C) with height and width above 4"
        )
    return LAYOUTS[2] if last else LAYOUTS[1]


def _images(
    x: np.ndarray, key: str, where: str, known: str | None = None
) -> tuple[np.ndarray, str]:
    """(N, C, H, W) float32 in [0, 1], and the layout it came in (`known`, else found by
    `image_layout`), from uint8 or float images as (N, H, W), (N, C, H, W) or (N, H, W, C)."""
    if known is not None and x.ndim in (3, 4):
        layout = known if x.ndim == 4 else LAYOUTS[0]
    else:
        layout = image_layout(tuple(int(s) for s in x.shape), key, where)
    if x.ndim == 3:
        x = x[:, None]
    if layout == LAYOUTS[2]:
        x = x.transpose(0, 3, 1, 2)
    if 0 in x.shape[1:]:
        raise DataError(
            f"{where}: {key} images are {x.shape[1:]} (C, H, W): no pixels; give images of at "
            "least one pixel"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0, layout
    if x.dtype.kind != "f":
        raise DataError(f"{where}: {key} holds {x.dtype}; give uint8 (0..255) or floats in [0, 1]")
    finite = np.isfinite(x)
    if not finite.all():
        raise DataError(
            f"{where}: {key} has {int(x.size - finite.sum())} pixels that are NaN or infinite; "
            "give finite pixels in [0, 1]"
        )
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"{where}: {key} pixels span [{float(x.min()):.4g}, {float(x.max()):.4g}]; "
            "scale them to [0, 1] (attacks work in that box)"
        )
    return x.astype(np.float32), layout


def _labels(y: np.ndarray, key: str, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {y.shape}; give one integer label per image")
    if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # whole-number floats are labels too
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: {key} holds {y.dtype}; give integer class labels 0..K-1")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: {key} has label {int(y.min())}; labels run 0..K-1")
    if y.size and y.max() > np.iinfo(np.int64).max:  # uint64 beyond int64 would wrap around
        raise DataError(f"{where}: {key} has label {int(y.max())}; labels run 0..K-1")
    return y.astype(np.int64)
