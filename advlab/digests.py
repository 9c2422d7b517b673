"""Digests of the files a trial reads besides its settings: `init` weights, an npz file, an
image folder's images, and the source of the user modules it imports (model factory or family,
data loader, training method, attack, measure).

Trial ids and training keys hash these (advlab.spec), so a changed input file reruns exactly
the trials that read it, and an unchanged one never does. Built-in data and models read no such
file: their trials hash no digest, and keep the ids they always had.

Each file is hashed once per process while its size, mtime and inode stay the same (a folder
of 60,000 images is read once, not once per trial id).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from pathlib import Path
from typing import Any

from advlab.plugins import is_import_path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_CHUNK = 1 << 20
_cache: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a regular file's bytes (16 hex digits); "missing" when it cannot be read, so
    an id still forms (the checks that need the file say what is wrong with it)."""
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "not-a-file"  # a FIFO would block the read; the checks refuse it by name
    key = (os.fspath(path), info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _cache:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError:
            return "missing"
        _cache[key] = digest.hexdigest()[:16]
    return _cache[key]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in a class folder, by name (what advlab.sources reads)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_digest(root: str | os.PathLike[str]) -> str:
    """A digest of an ImageFolder layout: every image's place (split/class/name) and bytes."""
    digest = hashlib.sha256()
    base = Path(root)
    for split in ("train", "test"):
        folder = base / split
        classes = sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
        for class_dir in classes:
            for image in image_files(class_dir):
                name = f"{split}/{class_dir.name}/{image.name}"
                digest.update(f"{name}\0{file_digest(image)}\0".encode())
    return digest.hexdigest()[:16]


def module_digest(path: str) -> str:
    """A digest of the source file of the module an import path (`module:attribute`) names;
    "unknown" for a module with no source file (built into Python, or not found)."""
    module = path.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError, TypeError):  # relative, or not a package
        return "unknown"
    origin = getattr(found, "origin", None)
    if found is None or not origin or not os.path.isfile(origin):
        return "unknown"
    return file_digest(origin)


def trial_inputs(spec: Any) -> dict[str, str]:
    """The digests of the files a TrialSpec's training reads, keyed by the setting that names
    each; empty for built-in data and models with no `init`."""
    out: dict[str, str] = {}
    if spec.init is not None:
        out["init"] = file_digest(spec.init)
    dataset = spec.dataset
    if dataset.name == "npz" and dataset.path is not None:
        out["dataset.path"] = file_digest(dataset.path)
    elif dataset.name == "folder" and dataset.path is not None:
        out["dataset.path"] = folder_digest(dataset.path)
    elif is_import_path(dataset.name):
        out["dataset.name"] = module_digest(dataset.name)
    if is_import_path(spec.model):
        out["model"] = module_digest(spec.model)
    method = spec.train.adversarial.method
    if is_import_path(method):
        out["train.adversarial.method"] = module_digest(method)
    return out


def run_inputs(name: str) -> dict[str, str]:
    """The digest of an attack's or a measure's module, when it is named by import path."""
    return {"module": module_digest(name)} if is_import_path(name) else {}
