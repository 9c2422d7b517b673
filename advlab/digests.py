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

import ast
import contextlib
import hashlib
import importlib.machinery
import os
import stat
import sys
from pathlib import Path
from typing import Any

from advlab.plugins import is_import_path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_CHUNK = 1 << 20
_cache: dict[tuple[str, int, int, int], str] = {}
_imports_cache: dict[tuple[str, str, str], set[str]] = {}


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
                digest.update(f"{name}\0{file_digest(image)}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def module_digest(path: str) -> str:
    """A digest of the source of the module an import path (`module:attribute`) names and of
    every user module it imports, directly or through others (a helper module beside the
    sweep file is an input as much as the module itself); "unknown" for a module with no
    source file (built into Python, or not found). Found without importing anything."""
    module = path.partition(":")[0]
    origin = _source_file(module)
    if origin is None:
        return "unknown"
    files = _user_sources(origin, module)
    if len(files) == 1:  # one file: its digest alone, as before helpers counted
        return file_digest(origin)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{file_digest(name)}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _source_file(module: str) -> str | None:
    """The source file of a module by name, found on sys.path without importing it or its
    parent packages (PathFinder searches each package's folder itself)."""
    spec, locations = None, None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), locations)
        except (ImportError, ValueError, OSError):
            return None
        if spec is None:
            return None
        locations = spec.submodule_search_locations
    origin = getattr(spec, "origin", None)
    return origin if origin and os.path.isfile(origin) else None


def _is_user_file(path: str) -> bool:
    """A file of the user's own code: outside Python's installation (stdlib, site-packages)
    and outside advlab itself."""
    here = os.path.realpath(path)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(__file__)}
    return not any(here.startswith(os.path.realpath(r) + os.sep) for r in roots)


def _user_sources(origin: str, module: str, limit: int = 500) -> set[str]:
    """`origin` and the source files of the user modules it imports, transitively (at most
    `limit` files: a user package larger than that is digested in part)."""
    found, todo = {origin}, [(origin, module)]
    while todo and len(found) < limit:
        source, name = todo.pop()
        package = name if source.endswith("__init__.py") else name.rpartition(".")[0]
        for imported in _imports(source, package):
            file = _source_file(imported)
            if file is not None and file not in found and _is_user_file(file):
                found.add(file)
                todo.append((file, imported))
    return found


def _imports(source: str, package: str) -> set[str]:
    """The module names a source file imports (`import a.b`, `from a import b` as a and
    a.b, relative imports resolved against its package); none when it does not parse."""
    key = (source, package, file_digest(source))  # an edited file is parsed again
    if key not in _imports_cache:
        tree = ast.Module(body=[], type_ignores=[])
        if source.endswith(".py"):  # compiled modules import nothing we can see
            # One that does not parse: its import says what is wrong with it.
            with contextlib.suppress(SyntaxError, ValueError, OSError):
                tree = ast.parse(Path(source).read_bytes())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute_name(node, package)
                if base:
                    names.add(base)
                    names.update(f"{base}.{alias.name}" for alias in node.names)
        # `import a.b.c` runs a and a.b as well
        _imports_cache[key] = {
            ".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)
        }
    return _imports_cache[key]


def _absolute_name(node: ast.ImportFrom, package: str) -> str | None:
    if not node.level:
        return node.module
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts) or (node.level > 1 and not package):
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])]) or None


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
    if spec.model.startswith("timm:"):  # its weights file, `model_args.pretrained`
        pretrained = spec.model_args.get("pretrained")
        if isinstance(pretrained, str) and os.path.isfile(pretrained):
            out["model_args.pretrained"] = file_digest(pretrained)
    method = spec.train.adversarial.method
    if is_import_path(method):
        out["train.adversarial.method"] = module_digest(method)
    return out


def run_inputs(name: str) -> dict[str, str]:
    """The digest of an attack's or a measure's module, when it is named by import path."""
    return {"module": module_digest(name)} if is_import_path(name) else {}
