"""An interrupted sweep: kill the driver (and its Ray) mid-run, rerun, nothing recomputed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from advlab.store import SweepStore

ADVLAB = [sys.executable, "-m", "advlab.cli"]


def _kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every live process of session `sid` until none is left.

    Not just the driver's process group: Ray starts its trial workers in groups of their own
    (same session), and a worker that outlived the group kill could finish its trial and write
    its file after the test counted the finished ones.
    """
    deadline = time.monotonic() + timeout
    while True:
        live = [pid for pid in _session_pids(sid) if not _zombie(pid)]
        if not live:
            return
        assert time.monotonic() < deadline, f"processes of session {sid} survive: {live}"
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _session_pids(sid: int) -> list[int]:
    pids: list[int] = []
    if not os.path.isdir("/proc"):  # not Linux: the group kill is all there is
        return pids
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # state follows the (command)


def test_killed_driver_resumes_without_recomputing_finished_trials(tmp_path: Path) -> None:
    sweep = {
        "name": "killme",
        "dataset": {"name": "digits"},
        "grid": {"seed": [0, 1, 2]},
        "model": "fc32-10",
        "train": {"epochs": 8, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "attack_examples": 10,
        "attacks": [{"name": "fgsm"}],
        "max_concurrent": 1,
        "storage": str(tmp_path / "results"),
        "wandb": {"mode": "disabled"},
    }
    path = tmp_path / "killme.yaml"
    path.write_text(yaml.safe_dump(sweep))
    trials_dir = tmp_path / "results" / "killme" / "trials"

    # Its own session, so killing the session takes the driver's local Ray down with it.
    first = subprocess.Popen(
        [*ADVLAB, "sweep", str(path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(trials_dir.glob("*.parquet")) and time.monotonic() < deadline:
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _kill_session(first.pid)
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in trials_dir.glob("*.parquet")}
    assert 1 <= len(finished) < 3

    second = subprocess.run(
        [*ADVLAB, "sweep", str(path)], capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    done = "1 trial" if len(finished) == 1 else f"{len(finished)} trials"  # said as English
    assert f"resuming: {done} already finished" in second.stdout
    for file, (mtime, content) in finished.items():
        assert (file.stat().st_mtime_ns, file.read_bytes()) == (mtime, content), file.name
    trials = SweepStore(str(tmp_path / "results"), "killme").read("trials")
    assert sorted(trials["seed"]) == [0, 1, 2]
    assert (trials["status"] == "ok").all()
    examples = SweepStore(str(tmp_path / "results"), "killme").read("examples")
    assert len(examples) == 3 * 10 * 2  # trials x examples x budgets, no duplicates


def test_ctrl_c_stops_without_transfer_and_a_rerun_continues_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    """SIGINT to the driver: exit 130 with one line saying how to resume, no transfer stage;
    the rerun continues the unfinished trial from its newest checkpoint and ends with the
    numbers of an uninterrupted run."""
    sweep = {
        "name": "ctrlc",
        "dataset": {"name": "digits"},
        "model": "fc32-10",
        "train": {"epochs": 30, "batch_size": 8, "optimizer": "adam", "lr": 0.005},
        "attack_examples": 10,
        "attacks": [{"name": "fgsm"}],
        "checkpoint_every": 2,
        "storage": str(tmp_path / "results"),
        "wandb": {"mode": "disabled"},
        "transfer": {"controls": ["constant"]},
    }
    path = tmp_path / "ctrlc.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sweep_dir = tmp_path / "results" / "ctrlc"
    first = subprocess.Popen(
        [*ADVLAB, "sweep", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not list(sweep_dir.glob("ray/*/*/checkpoint_*")) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert out.strip().splitlines()[-1].startswith("advlab: interrupted:")
    assert "run the same command again to resume" in out
    assert "Tuner.restore" not in out + err
    assert not (sweep_dir / "transfer").exists()

    second = subprocess.run(
        [*ADVLAB, "sweep", str(path)], capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    # Only advlab's own lines: Ray's banners (token authentication, log paths) stay out.
    assert "Token authentication" not in second.stderr and "ray." not in second.stderr.lower()
    trials = SweepStore(str(tmp_path / "results"), "ctrlc").read("trials")
    (resumed,) = trials.itertuples()
    assert resumed.resumed_from_epoch >= 2  # continued, not restarted
    epochs = SweepStore(str(tmp_path / "results"), "ctrlc").read("epochs")
    assert epochs["epoch"].tolist() == list(range(1, 31))

    # The same trial uninterrupted, in one process without Ray (`advlab trial`: the same code)
    straight = subprocess.run(
        [*ADVLAB, "trial", str(path), "--storage", str(tmp_path / "straight")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = SweepStore(str(tmp_path / "straight"), "ctrlc").read("trials").iloc[0]
    assert resumed.test_error == reference["test_error"]
    assert resumed.train_error == reference["train_error"]
