"""Why a write failed, in words: a full disk, read-only or unwritable storage, named with its
fix, for a trial's reason, the driver's one-line error and the transfer stage's record."""

from __future__ import annotations

import errno
import os

_STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk holding the storage is full",
    errno.EDQUOT: "the disk quota of the storage is used up",
    errno.EROFS: "the storage is read-only",
    errno.EACCES: "the storage is not writable (permission denied)",
    errno.EPERM: "the storage is not writable (operation not permitted)",
}


def storage_problem(err: BaseException) -> str | None:
    """What is wrong with the storage when `err` (or an error it came from) is a full disk,
    read-only or unwritable storage, naming the file; None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            where = f" (writing {current.filename})" if current.filename else ""
            return f"{_STORAGE_ERRNOS[current.errno]}{where}"
        current = current.__cause__ or current.__context__
    text = str(err)  # pyarrow's filesystem errors carry the errno in their text only
    for number, what in _STORAGE_ERRNOS.items():
        if f"errno {number}" in text.lower() or os.strerror(number) in text:
            return what
    return None


def failure_reason(err: BaseException) -> str:
    """One line for a trial's `reason`: the storage's problem and its fix when storage failed,
    else the error's type and first line."""
    problem = storage_problem(err)
    if problem is not None:
        return f"storage: {problem}; free space or make it writable, then run the sweep again"
    return f"{type(err).__name__}: {err}".splitlines()[0]
