"""Your data files, read within bounds: an npz archive and an ImageFolder layout.

A data file is read by a trial only after it passed these checks, each a one-line DataError
naming the file and the fix: an npz array's header is read before anything is allocated (a
header that claims more than its archive member holds, or more than half this machine's
memory, is refused); an image larger than MAX_PIXELS is refused from its header, before it is
decoded (decompression bombs); anything in an image folder that is not a regular file (a FIFO,
a socket, a folder named like an image) is refused before it is opened, so nothing blocks;
and every class folder must hold training images.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from advlab.data import DataError
from advlab.digests import image_files

# Per image: 32 M pixels (about 5,700 x 5,700), far beyond any image a classifier here trains
# on, far below what a decompression bomb expands to.
MAX_PIXELS = 1 << 25
# Image modes with more than 8 bits a pixel (PIL's names), which 8-bit conversion would clip.
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16B": "16-bit",
              "I;16L": "16-bit", "I;16N": "16-bit"}  # fmt: skip


def memory_limit() -> int:
    """The most bytes of data advlab loads: half of this machine's memory (training needs
    the rest), or 16 GiB where the machine does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def read_npz(path: str) -> dict[str, np.ndarray]:
    """An npz file's arrays, their headers checked before any is loaded."""
    try:
        sizes = npz_sizes(path)
    except DataError:
        raise
    except Exception as err:  # not a zip (truncated, another format), a broken .npy header
        raise _unreadable(path, err) from None
    total, limit = sum(sizes.values()), memory_limit()
    if total > limit:
        raise DataError(
            f"dataset.path: {path} holds {_gib(total)} of arrays, more than half this machine's "
            f"memory ({_gib(2 * limit)}); set dataset.streaming: true to read it per batch"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:  # data, never code
            return {key: archive[key] for key in archive.files}
    except Exception as err:  # a member cut short, object arrays (pickles), bad compression
        raise _unreadable(path, err) from None


def _unreadable(path: str, err: BaseException) -> DataError:
    why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return DataError(
        f"dataset.path: cannot read {path} as .npz ({why}); rewrite it with numpy.savez"
    )


def npz_sizes(path: str) -> dict[str, int]:
    """Each array's size in bytes as its .npy header claims it, read without allocating; an
    array that claims more bytes than its archive member holds is refused (a forged or
    damaged header)."""
    sizes = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as member:
                shape, dtype = _npy_header(member)
            size = math.prod(shape) * dtype.itemsize
            if size > info.file_size:
                raise DataError(
                    f"dataset.path: {path}: array {name!r} claims shape {shape} ({size} bytes) "
                    f"but holds {info.file_size} bytes; the file is damaged, rewrite it with "
                    "numpy.savez"
                )
            sizes[name] = size
    return sizes


def _npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype a .npy header declares (numpy's own header readers)."""
    from numpy.lib import format as npy

    version = npy.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = npy.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format {version[0]}.{version[1]}, which this check does not read")
    return shape, dtype


def read_image_folder(root: Path) -> dict[str, np.ndarray]:
    """ImageFolder layout: root/{train,test}/<class name>/<image>; classes sorted by name,
    each with at least one training image."""
    files = folder_files(root)
    _within_memory(files["train"] + files["test"])
    images = {split: [_read_image(path) for path, _ in found] for split, found in files.items()}
    # One colour layout for both splits: one colour image makes every image RGB, so a
    # gray test split never meets an RGB training split.
    rgb = any(im.mode == "RGB" for found in images.values() for im in found)
    arrays: dict[str, np.ndarray] = {}
    for split, found in files.items():
        arrays[f"x_{split}"] = _stack(images[split], rgb, root)
        arrays[f"y_{split}"] = np.array([label for _, label in found], dtype=np.int64)
    return arrays


def folder_files(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """(image file, label) of each split of an ImageFolder layout, checked as the module says
    (files not yet opened)."""
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
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            found = image_files(root / split / name)
            if split == "train" and not found:  # its label would silently vanish
                raise DataError(
                    f"dataset.path: {root}/train/{name} holds no images; give every class "
                    "training images, or remove its folder"
                )
            files[split] += [(f, label) for f in found]
    return files


def folder_layout(root: Path, paths: list[Path]) -> tuple[bool, tuple[int, int]]:
    """Whether the images read as RGB (any one in colour makes all RGB, as when loaded whole)
    and their one size (width, height), from their headers alone (streaming reads no more)."""
    from PIL import Image

    sizes, rgb = set(), False
    for path in paths:
        _pixels(path)  # regular file, readable header, within MAX_PIXELS
        with Image.open(path) as image:
            if image.mode in WIDE_MODES:
                _read_image(path)  # its one-line refusal
            rgb |= image.mode not in _GRAY_MODES
            sizes.add(image.size)
    if len(sizes) > 1:
        raise DataError(
            f"dataset.path: {root} holds images of sizes {sorted(sizes)[:2]}; "
            "resize them to one size"
        )
    return rgb, sizes.pop()


def read_image(path: Path, rgb: bool) -> Any:
    """One image decoded as loading the whole folder decodes it (`rgb`: the folder's colour)."""
    image = _read_image(path)
    return image.convert("RGB") if rgb else image


_GRAY_MODES = ("L", "1", "LA")


def _stack(images: list[Any], rgb: bool, root: Path) -> np.ndarray:
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise DataError(
            f"dataset.path: {root} holds images of sizes {sorted(sizes)[:2]}; "
            "resize them to one size"
        )
    arrays = [np.asarray(im.convert("RGB") if rgb else im) for im in images]
    x = np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.uint8)
    return x.transpose(0, 3, 1, 2) if rgb else x


def _within_memory(files: list[tuple[Path, int]]) -> None:
    """Refuse files whose headers show they do not fit in memory (3 bytes a pixel at most)."""
    total = sum(_pixels(path) * 3 for path, _ in files)
    if total > memory_limit():
        raise DataError(
            f"dataset.path: its {len(files)} images hold {_gib(total)} of pixels, more than "
            f"half this machine's memory; set dataset.streaming: true to read them per batch"
        )


def _pixels(path: Path) -> int:
    """An image's pixel count from its header (nothing decoded), after checking it is a
    regular file (a FIFO would block the read) no larger than MAX_PIXELS."""
    from PIL import Image

    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise _bad_image(path, err) from None
    if not stat.S_ISREG(mode):
        raise DataError(f"dataset.path: {path} is no regular file; remove it from the folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Exception as err:  # unidentified, damaged, or a bomb by PIL's own measure
        raise _bad_image(path, err) from None
    if width * height > MAX_PIXELS or not width or not height:
        raise DataError(
            f"dataset.path: {path} is {width} x {height} pixels; advlab reads images of 1 to "
            f"{MAX_PIXELS} pixels, resize it"
        )
    return width * height


def _read_image(path: Path) -> Any:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                mode = image.mode
                if mode not in WIDE_MODES:
                    return image.convert("L" if mode in _GRAY_MODES else "RGB")
    except Exception as err:
        raise _bad_image(path, err) from None
    # 16-bit or float pixels would be clipped to 8 bits without a word
    raise DataError(
        f"dataset.path: {path} has {WIDE_MODES[mode]} pixels (mode {mode}); advlab reads "
        "8-bit images, save it as 8-bit PNG"
    )


def _bad_image(path: Path, err: BaseException) -> DataError:
    why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return DataError(f"dataset.path: cannot read image {path} ({why}); remove or fix it")
