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

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from advlab import digests
from advlab.data import DATASETS, DataError, Dataset, load_dataset, validate_dataset_source
from advlab.data import _images_to_tensor as images_to_tensor
from advlab.data import _labels_to_tensor as labels_to_tensor
from advlab.plugins import PluginError, import_object, is_import_path

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
) -> Dataset:
    """The dataset a DatasetSpec names (cached per process, as every trial reloads it)."""
    check_source(name, root, path)
    if name in DATASETS:
        return load_dataset(name, root)
    resolved = None if path is None else str(Path(path).expanduser().resolve())
    return _load_cached(
        name, resolved, _stamp(name, resolved), json.dumps(dict(args or {}), sort_keys=True)
    )


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
    """The data a DatasetSpec names (advlab.spec.DatasetSpec)."""
    return load_data(dataset.name, dataset.root, dataset.path, dataset.args)


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
        return arrays_to_dataset(Path(path).stem, _read_npz(path), f"dataset.path: {path}")
    if name == "folder":
        assert path is not None
        return arrays_to_dataset(
            Path(path).name, read_image_folder(Path(path)), f"dataset.path: {path}"
        )
    arrays = _call_loader(name, json.loads(args))
    return arrays_to_dataset(name, arrays, f"dataset.name: {name}")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:  # data, never code
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"dataset.path: cannot read {path} as .npz ({_line(err)}); rewrite it with numpy.savez"
        ) from None


def _call_loader(name: str, args: dict[str, Any]) -> Any:
    loader = resolve_import(name, "dataset.name")
    try:
        return loader(**args)
    except Exception as err:
        raise DataError(
            f"dataset.name: {name}(**dataset.args) raised {type(err).__name__}: {_line(err)}"
        ) from None


def resolve_import(path: str, key: str) -> Callable[..., Any]:
    """`module:function` imported (modules beside the sweep file are on sys.path)."""
    try:
        found = import_object(path, key)
    except PluginError as err:
        raise DataError(str(err)) from None
    if not callable(found):
        raise DataError(f"{key}: {path} is a {type(found).__name__}, not a function")
    return found


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


# --------------------------------------------------------------------------- checks


def arrays_to_dataset(name: str, arrays: Any, where: str) -> Dataset:
    """Four arrays, checked and converted to advlab's Dataset (float32 NCHW in [0,1], int64)."""
    arrays = _as_mapping(arrays, where)
    x_train, x_test = (_images(arrays[k], k, where) for k in ("x_train", "x_test"))
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
    classes = int(max(y_train.max(), y_test.max())) + 1
    absent = sorted(set(range(classes)) - set(np.unique(y_train).tolist()))
    if absent:
        raise DataError(
            f"{where}: labels run to {classes - 1} but class {absent[0]} has no training example; "
            "relabel as 0..K-1"
        )
    return Dataset(
        name=name,
        x_train=images_to_tensor(x_train, 1.0),
        y_train=labels_to_tensor(y_train),
        x_test=images_to_tensor(x_test, 1.0),
        y_test=labels_to_tensor(y_test),
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


def _images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] from uint8 or float images, (N, H, W) or (N, C, H, W)."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{where}: {key} has shape {x.shape}; give images as (N, H, W) or (N, C, H, W)"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype.kind != "f":
        raise DataError(f"{where}: {key} holds {x.dtype}; give uint8 (0..255) or floats in [0, 1]")
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        low, high = float(np.nanmin(x)), float(np.nanmax(x))
        raise DataError(
            f"{where}: {key} pixels span [{low:.4g}, {high:.4g}]; "
            "scale them to [0, 1] (attacks work in that box)"
        )
    return x.astype(np.float32)


def _labels(y: np.ndarray, key: str, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {y.shape}; give one integer label per image")
    if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # whole-number floats are labels too
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: {key} holds {y.dtype}; give integer class labels 0..K-1")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: {key} has label {int(y.min())}; labels run 0..K-1")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- image folders


def read_image_folder(root: Path) -> dict[str, np.ndarray]:
    """ImageFolder layout: root/{train,test}/<class name>/<image>; classes sorted by name."""
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"dataset.path: {root} has no {split}/ folder; "
                f"lay it out as {split}/<class>/<image>"
            )
        splits[split] = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = splits["train"]
    extra = sorted(set(splits["test"]) - set(classes))
    if not classes or extra:
        why = (
            f"test/ has class {extra[0]!r} that train/ lacks"
            if extra
            else "train/ has no class folders"
        )
        raise DataError(f"dataset.path: {root}: {why}; give train/ a folder per class")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        folders = [(c, root / split / name) for c, name in enumerate(classes)]
        files = [(f, c) for c, folder in folders for f in digests.image_files(folder)]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _read_images(files, root)
    return arrays


def _read_images(files: list[tuple[Path, int]], root: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                images.append(
                    image.convert("RGB") if image.mode not in ("L", "1") else image.convert("L")
                )
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(
                f"dataset.path: cannot read image {path} ({_line(err)}); remove or fix it"
            ) from None
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise DataError(
            f"dataset.path: {root} holds images of sizes {sorted(sizes)[:2]}; "
            "resize them to one size"
        )
    rgb = any(im.mode == "RGB" for im in images)
    arrays = [np.asarray(im.convert("RGB") if rgb else im) for im in images]
    x = np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.uint8)
    x = x.transpose(0, 3, 1, 2) if rgb else x
    return x, np.array([label for _, label in files], dtype=np.int64)
