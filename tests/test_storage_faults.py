"""Storage that fails mid-sweep: a disk that fills up, storage that turns read-only. Every
trial it cost says so (not just "missing"), and once the storage is mended, running the same
command again leaves results equal to a clean run's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_sweep

from advlab import results
from advlab.cli import main
from advlab.storage_errors import failure_reason, storage_problem

# A measure beside the sweep file that spoils the storage once, mid-trial, in the worker: the
# disk fills up, or every write finds the storage read-only (as a file system remounted
# read-only after an error answers). The marker file says which, and is used up.
SPOIL = """
import errno
from pathlib import Path

import pyarrow as pa

from advlab.measures import MeasureDef
from advlab.store import SweepStore

MARKER = Path(__file__).with_name("fault-once")


def read_only(self, folder, name, payload):
    raise OSError(errno.EROFS, "Read-only file system", self.path(folder, name))


def spoil(ctx, settings):
    if MARKER.exists():
        kind = MARKER.read_text().strip()
        if kind == "full":
            MARKER.unlink()
            with open(Path(ctx.files).parents[3] / "filler", "wb") as out:
                try:
                    while True:
                        out.write(bytes(1 << 16))
                        out.flush()
                except OSError:
                    pass
        else:
            SweepStore._write_atomic = read_only  # this worker's writes, from now on
    return [{"value": 1.0}]


SPOIL = MeasureDef(
    "spoil", "trial", pa.schema([("trial_id", pa.string()), ("value", pa.float64())]), spoil
)
"""


def _sweep(folder: Path, storage: Path) -> Path:
    (folder / "spoil.py").write_text(SPOIL)
    raw = tiny_sweep(name="s", storage=str(storage), measures=[{"name": "spoil:SPOIL"}])
    raw |= {"attacks": [{"name": "fgsm"}], "wandb": {"mode": "disabled"}}
    raw |= {"transfer": {"enabled": False}, "max_concurrent": 1}
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The trials of the same sweep run on storage that never fails."""
    folder = tmp_path_factory.mktemp("clean")
    assert main(["sweep", str(_sweep(folder, folder / "results"))]) == 0
    return _numbers(folder / "results" / "s")


def _numbers(sweep: Path) -> pd.DataFrame:
    res = results.load(str(sweep))
    trials = res.trials.set_index("trial_id")[["status", "test_error", "train_error"]]
    rates = res.attacks.pivot_table(index="trial_id", columns="budget", values="success_rate")
    return trials.join(rates).sort_index()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB file system of its own (tmpfs), for a disk that can fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("this machine does not let the test mount a small file system")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_disk_that_fills_up_is_said_and_a_rerun_mends_it(
    clean: pd.DataFrame, small_disk: Path, tmp_path: Path, capsys
) -> None:
    path = _sweep(tmp_path, small_disk)
    (tmp_path / "fault-once").write_text("full")
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "0/2 trials ok, 0 failed, 2 missing" in out
    assert out.count("storage: the disk holding the storage is full; free space") == 2
    (small_disk / "filler").unlink()  # the user frees space
    assert main(["sweep", str(path)]) == 0
    pd.testing.assert_frame_equal(_numbers(small_disk / "s"), clean)


@pytest.mark.slow
def test_storage_turned_read_only_is_said_and_a_rerun_mends_it(
    clean: pd.DataFrame, tmp_path: Path, capsys
) -> None:
    path = _sweep(tmp_path, tmp_path / "results")
    (tmp_path / "fault-once").write_text("read-only")
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "0/2 trials ok, 0 failed, 2 missing" in out
    assert out.count("missing ") == 2 and out.count("storage: the storage is read-only") == 2
    (tmp_path / "fault-once").unlink()  # mended
    assert main(["sweep", str(path)]) == 0
    pd.testing.assert_frame_equal(_numbers(tmp_path / "results" / "s"), clean)


def test_storage_problems_are_named_with_their_fix() -> None:
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/data/results/s/trials/x.parquet")
    assert storage_problem(full) == (
        "the disk holding the storage is full (writing /data/results/s/trials/x.parquet)"
    )
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert storage_problem(wrapped) == "the storage is read-only"
    arrow = OSError("[errno 28] No space left on device")  # pyarrow's own wording
    assert failure_reason(arrow).startswith("storage: the disk holding the storage is full;")
    assert storage_problem(ValueError("bad")) is None
    assert failure_reason(ValueError("bad\nmore")) == "ValueError: bad"
