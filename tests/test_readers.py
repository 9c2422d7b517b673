"""Readers only read: `advlab ls`, `advlab.results.load` and `advlab report` never move or
write a file of a sweep, say what they left out and why, work on read-only storage, and read
two sweeps that share trials (a copy of one) side by side."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import tiny_sweep

from advlab import manifest, results
from advlab.cli import main
from advlab.report.load import load_all
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import load_sweep
from advlab.trial import run_trial


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_torch_thread) -> Path:
    """A finished two-trial sweep folder (trained in this process, no Ray)."""
    folder = tmp_path_factory.mktemp("readers")
    raw = tiny_sweep(name="r", storage=str(folder / "results"), measures=[])
    raw |= {"attacks": [{"name": "fgsm"}], "wandb": {"mode": "disabled"}}
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    store = SweepStore(spec.settings.storage, spec.name)
    store.write_manifest(manifest.record_version(None, spec))
    for index, trial in enumerate(spec.trials):
        run_trial(trial, trial_context(spec, index, store.storage, "disabled"))
    return folder / "results" / "r"


def _copy(finished: Path, tmp_path: Path, name: str = "r") -> Path:
    target = tmp_path / "results" / name
    shutil.copytree(finished, target)
    return target


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_ls_lists_a_sweep_with_a_truncated_manifest_and_moves_nothing(
    finished: Path, tmp_path: Path, capsys
) -> None:
    folder = _copy(finished, tmp_path)
    _truncate(folder / "sweep.json")
    before = _snapshot(tmp_path)
    assert main(["ls", str(tmp_path / "results")]) == 0
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("r "))
    assert row.split()[1:4] == ["0", "2", "2"]  # no versions read; its 2 trials, 2 ok
    assert "advlab: r: sweep.json (" in captured.err and "left in place" in captured.err
    assert _snapshot(tmp_path) == before  # nothing moved, nothing written


def test_load_and_report_say_what_they_left_out_and_move_nothing(
    finished: Path, tmp_path: Path, capsys
) -> None:
    folder = _copy(finished, tmp_path)
    first = results.load(str(folder)).trials["trial_id"].iloc[0]
    _truncate(folder / "trials" / f"{first}.parquet")
    _truncate(folder / "sweep.json")
    before = _snapshot(folder)
    res = results.load(str(folder))
    assert first not in set(res.trials["trial_id"])
    assert any(n.startswith(f"trials/{first}.parquet (") for n in res.notes), res.notes
    assert any(n.startswith("sweep.json (") for n in res.notes), res.notes
    page = tmp_path / "page.html"
    assert main(["report", str(folder), "-o", str(page)]) == 0
    err = capsys.readouterr().err
    assert f"advlab: left out of the report: r: trials/{first}.parquet (" in err
    assert "Left out, could not be read:" in page.read_text()
    assert f"trials/{first}.parquet" in page.read_text()
    assert _snapshot(folder) == before


def test_a_report_over_a_sweep_and_its_copy_shows_both(
    finished: Path, tmp_path: Path, capsys
) -> None:
    copy = _copy(finished, tmp_path)
    page = tmp_path / "page.html"
    assert main(["report", str(finished), str(copy), "-o", str(page)]) == 0
    compared = load_all([str(finished), str(copy)])
    ok = compared.ok_trials
    assert len(ok) == 4 and ok["trial_id"].is_unique
    assert len(compared.configs) == 4
    ids = set(results.load(str(finished)).trials["trial_id"])
    assert set(ok["trial_id"]) == ids | {f"{t}~2" for t in ids}
    alone = load_all([str(finished)]).attacks.groupby("trial_id").size()
    both = compared.attacks.groupby("trial_id").size()
    assert both.to_dict() == alone.to_dict() | {f"{t}~2": n for t, n in alone.items()}


@contextlib.contextmanager
def read_only_mount(folder: Path) -> Iterator[bool]:
    """`folder` bind-mounted over itself read-only, for the block; False where this machine
    does not let the test mount (then the test skips)."""
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True,
                       capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        yield False
        return
    try:
        remounted = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True
        ).returncode == 0  # fmt: skip
        yield remounted
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_readers_work_on_read_only_storage(finished: Path, tmp_path: Path, capsys) -> None:
    folder = _copy(finished, tmp_path)
    first = results.load(str(folder)).trials["trial_id"].iloc[0]
    _truncate(folder / "trials" / f"{first}.parquet")
    _truncate(folder / "sweep.json")
    with read_only_mount(tmp_path / "results") as mounted:
        if not mounted:
            pytest.skip("this machine does not let the test mount storage read-only")
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        assert main(["ls", str(tmp_path / "results")]) == 0
        assert len(results.load(str(folder)).trials) == 1
        assert main(["report", str(folder), "-o", str(tmp_path / "page.html")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"trials/{first}.parquet (" in err


def test_readers_pass_over_fifos_named_like_results_files(
    finished: Path, tmp_path: Path, capsys
) -> None:
    import os
    import time

    folder = _copy(finished, tmp_path)
    first = results.load(str(folder)).trials["trial_id"].iloc[0]
    for name in ("sweep.json", f"trials/{first}.parquet"):
        (folder / name).unlink()
        os.mkfifo(folder / name)  # opening one to read would wait for a writer forever
    start = time.monotonic()
    res = results.load(str(folder))
    assert first not in set(res.trials["trial_id"]) and len(res.trials) == 1
    assert f"trials/{first}.parquet (not a regular file), left in place" in res.notes
    assert "sweep.json (not a regular file), left in place" in res.notes
    assert main(["report", str(folder), "-o", str(tmp_path / "page.html")]) == 0
    assert main(["ls", str(tmp_path / "results")]) == 0
    assert time.monotonic() - start < 30
    assert "(not a regular file), left in place" in capsys.readouterr().err
    assert (folder / "sweep.json").is_fifo()  # left where it was
