"""W&B's offline runs for remote storage: a local staging folder per process, uploaded whole.

W&B writes to a local folder only, so on object storage each store stages its runs in a
folder of its own and uploads them file by file when the run ends (SweepStore.sync_wandb).
A folder whose process is gone (a killed trial, rerun now: its new W&B run replaces the
part-run, as `track.drop_earlier_runs` does on local storage) is removed before a new one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def staging_dir(sweep: str) -> str:
    """A new staging folder for this process, after removing those of dead processes."""
    prefix = staging_prefix(sweep)
    for left in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if left_by_dead_process(left.name, prefix):
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def staging_prefix(sweep: str) -> str:
    """The start of the name of every staging folder of a sweep."""
    return f"advlab-wandb-{re.sub(r'[^A-Za-z0-9_.-]+', '_', sweep)}-"


def left_by_dead_process(name: str, prefix: str) -> bool:
    """Whether `name` is a staging folder (of the sweep with this prefix) whose process is gone:
    a killed trial's, which cannot remove it itself."""
    found = (
        re.fullmatch(r"(\d+)-[a-z0-9_]{8}", name[len(prefix) :])
        if name.startswith(prefix)
        else None
    )
    return found is not None and not _alive(int(found[1]))


def upload_runs(staging: str, write: Callable[[str, str, bytes], None]) -> None:
    """Every file of every finished run under <staging>/wandb, as write(folder, name, bytes)
    with folder relative to the storage's wandb/ (W&B's links, latest-run, are skipped), then
    the staging folder removed."""
    local = os.path.join(staging, "wandb")
    for run in sorted(os.listdir(local)) if os.path.isdir(local) else []:
        folder = os.path.join(local, run)
        if os.path.islink(folder) or not os.path.isdir(folder):
            continue
        for base, _, names in os.walk(folder):
            for name in names:
                source = os.path.join(base, name)
                inside = os.path.relpath(source, local).replace(os.sep, "/")
                folder_name, _, file_name = inside.rpartition("/")
                with open(source, "rb") as handle:
                    write(f"wandb/{folder_name}", file_name, handle.read())
    shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True
