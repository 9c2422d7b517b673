"""Datasets and training-set subsets.

Every dataset arrives as float32 tensors of shape (N, C, H, W) with pixels in [0, 1] (the box the
Szegedy attack works in) and int64 labels. Sources:

- ``digits``: scikit-learn's 8x8 digits, shipped inside the package (no download), with a fixed
  stratified 75/25 train/test split. Minutes-long sweeps and tests use it.
- ``mnist`` / ``fashion_mnist``: the standard IDX files read from ``root`` (raw or ``.gz``), or
  downloaded by torchvision into ``~/.cache/advlab/data`` when ``root`` is None.
- ``cifar10``: torchvision's python batches under ``root`` or downloaded into the cache.

Subsets pick which training examples a trial trains on (see :func:`parse_subset`). They depend on
``split_seed`` alone, never on the trial seed, so "P1" names the same 30,000 MNIST images in every
trial of every sweep, as the paper's Tables 3-4 need.
"""

from __future__ import annotations

import functools
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from advlab.text import one_line

__all__ = [
    "DATASETS",
    "FACTS",
    "IDX_FILES",
    "SUBSETS",
    "DataError",
    "Dataset",
    "DatasetFacts",
    "Subset",
    "SubsetSplit",
    "default_cache_dir",
    "load_dataset",
    "parse_subset",
    "read_idx",
    "select_subset",
    "validate_dataset_source",
]


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the key and the fix."""


@dataclass(frozen=True)
class DatasetFacts:
    """What a built-in data set is, known without loading it: sweep files are checked (class
    counts in model names, per-layer decays) before any data is read."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


# The built-in data sets; a loaded one's Dataset.input_shape and num_classes agree with these.
FACTS = {
    "digits": DatasetFacts((1, 8, 8), 10),
    "mnist": DatasetFacts((1, 28, 28), 10),
    "fashion_mnist": DatasetFacts((1, 28, 28), 10),
    "cifar10": DatasetFacts((3, 32, 32), 10),
}
DATASETS = tuple(FACTS)

SUBSETS = """Subset strings (the ``subset`` key of a trial):
  all            the whole training set
  p1, p2         the paper's two disjoint halves of the training set (Tables 3-4); p1 holds
                 floor(N/2) examples, p2 the rest; together they cover the training set
  fraction:F     a stratified fraction 0 < F <= 1: round(F*N) examples, each class contributing in
                 proportion to its size (largest remainders get the leftover examples)
  per_class:K    exactly K examples of every class (K must not exceed the smallest class)
All depend only on split_seed. heldout_idx is the rest of the training set (for p1 exactly p2)."""

# Names of the four IDX files as distributed by LeCun and Zalando (and Debian); ".gz" optional.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# torchvision's class and folder name for each downloadable dataset.
_TORCHVISION_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """Where downloads go when no ``root`` is given."""
    return Path.home() / ".cache" / "advlab" / "data"


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset. Tensors are shared by every caller in the process: do not modify them."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    layout: str = ""  # the layout your arrays came in, e.g. "(N, H, W, C)"; "" for built-ins

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1


# --------------------------------------------------------------------------- IDX files

# IDX type byte -> big-endian numpy dtype (LeCun's MNIST page, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip, told apart by content, not by name) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"dataset.root: cannot read IDX file {path} ({one_line(err)})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"dataset.root: {path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"dataset.root: {path} is truncated (header cut short)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"dataset.root: {path} holds {len(raw) - header} data bytes but its header "
            f"{shape} needs {count * dtype.itemsize}; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native order, writable copy


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(name: str, root: Path) -> Path:
    """The folder under ``root`` holding the IDX files: root itself or torchvision's layout."""
    candidates = [root, root / _TORCHVISION_NAMES[name] / "raw"]
    for folder in candidates:
        if all(_find_idx_file(folder, stem) for stem in IDX_FILES.values()):
            return folder
    missing = [s for s in IDX_FILES.values() if _find_idx_file(root, s) is None]
    raise DataError(
        f"dataset.root: folder {root} lacks {', '.join(f'{m}(.gz)' for m in missing)}; point "
        f"dataset.root at the folder holding the four {name} IDX files, or drop it to download"
    )


def _load_idx_dataset(name: str, root: Path) -> Dataset:
    folder = _idx_folder(name, root)
    arrays = {key: read_idx(_find_idx_file(folder, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"dataset.root: {folder} {split} files disagree: images {x.shape}, labels "
                f"{y.shape}; expected (N, H, W) images and N labels"
            )
        # Pixels are scaled by 1/255 and labels index logits, so anything else is the wrong file.
        if x.dtype != np.uint8 or y.dtype.kind not in "iu" or (y.size and y.min() < 0):
            raise DataError(
                f"dataset.root: {folder} {split} files hold {x.dtype} images and {y.dtype} "
                "labels; expected unsigned-byte images and non-negative integer labels"
            )
    return Dataset(
        name=name,
        x_train=_images_to_tensor(arrays["x_train"][:, None]),
        y_train=_labels_to_tensor(arrays["y_train"]),
        x_test=_images_to_tensor(arrays["x_test"][:, None]),
        y_test=_labels_to_tensor(arrays["y_test"]),
    )


# --------------------------------------------------------------------------- loaders


def _images_to_tensor(images: np.ndarray, scale: float = 255.0) -> Tensor:
    """(N, C, H, W) array of 0..scale -> contiguous float32 tensor in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    return x.div_(scale).clamp_(0.0, 1.0).contiguous()


def _labels_to_tensor(labels: np.ndarray | list[int]) -> Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64).contiguous()


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    # Fixed forever: changing it would silently change every digits result ever stored.
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    return Dataset(
        name="digits",
        x_train=_images_to_tensor(x_train, 16.0),
        y_train=_labels_to_tensor(y_train),
        x_test=_images_to_tensor(x_test, 16.0),
        y_test=_labels_to_tensor(y_test),
    )


def _download_failed(name: str, err: Exception) -> DataError:
    return DataError(
        f"dataset.root: downloading {name} into {default_cache_dir()} failed ({one_line(err)}); "
        "check the network or point dataset.root at a local copy"
    )


def _download_idx_dataset(name: str) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION_NAMES[name])
    cache = default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        train = cls(root=str(cache), train=True, download=True)
        test = cls(root=str(cache), train=False, download=True)
    except (OSError, RuntimeError) as err:
        raise _download_failed(name, err) from err
    return Dataset(
        name=name,
        x_train=_images_to_tensor(train.data.numpy()[:, None]),
        y_train=_labels_to_tensor(train.targets.numpy()),
        x_test=_images_to_tensor(test.data.numpy()[:, None]),
        y_test=_labels_to_tensor(test.targets.numpy()),
    )


def _cifar_root(root: Path) -> Path:
    """Accept the folder above cifar-10-batches-py (torchvision's root) or that folder itself."""
    return root.parent if root.name == _CIFAR_FOLDER else root


def _load_cifar10(root: Path | None) -> Dataset:
    import torchvision

    download = root is None
    folder = default_cache_dir() if root is None else _cifar_root(root)
    try:
        if download:
            folder.mkdir(parents=True, exist_ok=True)
        train = torchvision.datasets.CIFAR10(str(folder), train=True, download=download)
        test = torchvision.datasets.CIFAR10(str(folder), train=False, download=download)
    except (OSError, RuntimeError) as err:
        if download:
            raise _download_failed("cifar10", err) from err
        raise DataError(
            f"dataset.root: cannot load CIFAR-10 from {folder / _CIFAR_FOLDER} ({one_line(err)}); "
            "re-extract cifar-10-python.tar.gz there or drop dataset.root to download"
        ) from err
    return Dataset(
        name="cifar10",
        # torchvision keeps HWC for PIL; models want CHW.
        x_train=_images_to_tensor(train.data.transpose(0, 3, 1, 2)),
        y_train=_labels_to_tensor(train.targets),
        x_test=_images_to_tensor(test.data.transpose(0, 3, 1, 2)),
        y_test=_labels_to_tensor(test.targets),
    )


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"dataset.name: {name!r} is not a dataset; use {_or_list(DATASETS)}")


def _or_list(items: tuple[str, ...]) -> str:
    return ", ".join(items[:-1]) + f" or {items[-1]}"


def validate_dataset_source(name: str, root: str | None) -> None:
    """Cheap check, before any work starts, that ``name`` is known and ``root`` holds its files."""
    _check_name(name)
    if root is None:
        return  # loaded from the package or downloaded on first use
    if name == "digits":
        raise DataError(
            "dataset.root: digits ships with scikit-learn and reads no folder; drop dataset.root"
        )
    folder = Path(root).expanduser()
    if not folder.is_dir():
        files = (
            _CIFAR_FOLDER
            if name == "cifar10"
            else ", ".join(f"{stem}(.gz)" for stem in IDX_FILES.values())
        )
        raise DataError(
            f"dataset.root: folder {folder} does not exist; point dataset.root at a folder "
            f"holding {files}, or drop it to download"
        )
    if name == "cifar10":
        batches = _cifar_root(folder) / _CIFAR_FOLDER
        missing = [f for f in _CIFAR_FILES if not (batches / f).is_file()]
        if missing:
            raise DataError(
                f"dataset.root: {batches} lacks {', '.join(missing)}; point dataset.root at the "
                f"folder holding {_CIFAR_FOLDER}/ (extracted cifar-10-python.tar.gz), "
                "or drop it to download"
            )
    else:
        _idx_folder(name, folder)


def load_dataset(name: str, root: str | None = None) -> Dataset:
    """Load a dataset by name (see module docstring); cached per process since trials reload."""
    validate_dataset_source(name, root)
    resolved = None if root is None else str(Path(root).expanduser().resolve())
    return _load_cached(name, resolved)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None) -> Dataset:
    if name == "digits":
        return _load_digits()
    if name == "cifar10":
        return _load_cifar10(None if root is None else Path(root))
    if root is None:
        return _download_idx_dataset(name)
    return _load_idx_dataset(name, Path(root))


# --------------------------------------------------------------------------- subsets


@dataclass(frozen=True)
class Subset:
    """A parsed subset string: ``kind`` is all, p1, p2, fraction or per_class."""

    kind: str
    fraction: float | None = None
    per_class: int | None = None


@dataclass(frozen=True)
class SubsetSplit:
    """Which training examples a trial trains on; ``heldout_idx`` is the rest, both sorted."""

    train_idx: Tensor
    heldout_idx: Tensor


def _bad_subset(subset: object, why: str = "is not a subset") -> DataError:
    return DataError(
        f"subset: {subset!r} {why}; use all, p1, p2, fraction:F (0<F<=1) or per_class:K (K>=1)"
    )


def parse_subset(subset: str) -> Subset:
    """Parse a subset string (see ``SUBSETS``); raise DataError on anything malformed."""
    if not isinstance(subset, str):
        raise _bad_subset(subset, "is not a string")
    text = subset.strip()
    if text in ("all", "p1", "p2"):
        return Subset(kind=text)
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("fraction", "per_class"):
        raise _bad_subset(subset)
    if kind == "fraction":
        try:
            fraction = float(value)
        except ValueError:
            raise _bad_subset(subset, "has no number after 'fraction:'") from None
        if not 0.0 < fraction <= 1.0:  # also rejects nan
            raise _bad_subset(subset, "needs a fraction 0 < F <= 1")
        return Subset(kind="fraction", fraction=fraction)
    try:
        per_class = int(value)
    except ValueError:
        raise _bad_subset(subset, "has no whole number after 'per_class:'") from None
    if per_class < 1:
        raise _bad_subset(subset, "needs K >= 1 examples per class")
    return Subset(kind="per_class", per_class=per_class)


_MASK64 = (1 << 64) - 1


def _shuffle_keys(n: int, split_seed: int) -> np.ndarray:
    """A pseudo-random uint64 key per index (splitmix64 of seed and index).

    Hand-rolled rather than numpy/torch RNG so that P1/P2 can never change with a library upgrade
    or differ between cluster nodes running different versions. The mix is a bijection on uint64,
    so keys within one seed are distinct and argsort gives a true permutation.
    """
    with np.errstate(over="ignore"):
        seed = np.uint64((split_seed * 0xD1B54A32D192ED03) & _MASK64)
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + seed
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _split(train: np.ndarray, n: int) -> SubsetSplit:
    mask = np.zeros(n, dtype=bool)
    mask[train] = True
    return SubsetSplit(
        train_idx=torch.from_numpy(np.flatnonzero(mask).astype(np.int64)),
        heldout_idx=torch.from_numpy(np.flatnonzero(~mask).astype(np.int64)),
    )


def _stratified_quotas(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class counts summing to exactly round(F*N): floors plus largest remainders."""
    target = round(fraction * int(class_sizes.sum()))
    exact = class_sizes * fraction
    quotas = np.minimum(np.floor(exact).astype(np.int64), class_sizes)
    leftover = target - int(quotas.sum())
    # Ties go to the lower class index (stable sort) so the allocation is deterministic.
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:leftover]] += 1
    return quotas


def select_subset(dataset: Dataset, subset: str, split_seed: int = 0) -> SubsetSplit:
    """Pick the training indices for ``subset``; deterministic in ``split_seed`` alone."""
    spec = parse_subset(subset)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise DataError(f"split_seed: {split_seed!r} is not a whole number >= 0; use e.g. 0")
    labels = dataset.y_train.numpy()
    n = len(labels)
    if spec.kind == "all":
        return _split(np.arange(n), n)
    order = np.argsort(_shuffle_keys(n, split_seed), kind="stable")
    if spec.kind in ("p1", "p2"):
        half = n // 2
        return _split(order[:half] if spec.kind == "p1" else order[half:], n)

    # Stratified kinds: walk each class's examples in shuffled order and take a prefix, so
    # per_class:K is nested in per_class:K' for K < K' under the same seed.
    classes, sizes = np.unique(labels, return_counts=True)
    if spec.kind == "per_class":
        if spec.per_class > sizes.min():
            small = classes[sizes.argmin()]
            raise DataError(
                f"subset: 'per_class:{spec.per_class}' asks for more examples than class {small} "
                f"of {dataset.name} has ({sizes.min()}); use per_class:{sizes.min()} or fewer"
            )
        quotas = np.full(len(classes), spec.per_class, dtype=np.int64)
    else:
        quotas = _stratified_quotas(sizes, spec.fraction)
        if quotas.sum() == 0:
            raise DataError(
                f"subset: {subset!r} selects no examples of the {n} in {dataset.name}; "
                f"use a fraction of at least {1 / n:.2g}"
            )
    shuffled_labels = labels[order]
    chosen = [
        order[shuffled_labels == c][:k] for c, k in zip(classes, quotas, strict=True) if k > 0
    ]
    return _split(np.concatenate(chosen), n)
