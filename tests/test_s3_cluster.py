"""A sweep on object storage from a two-node Ray cluster whose nodes share no results folder:
moto's S3 server on loopback, a head and a worker started with `ray start` (each with its own
working dir, temporary dir and Ray temp dir), the driver killed mid-sweep and run again, and
the results read back through s3:// equal to the same trials run locally."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from s3_server import free_port, object_keys, s3_env, s3_filesystem
from test_resume import _kill_session, _session_pids

from advlab import results
from advlab.cli import main
from advlab.wandb_staging import left_by_dead_process, staging_prefix

pytest_plugins = ["s3_server"]  # the loopback S3 server

RAY = str(Path(sys.executable).parent / "ray")
ADVLAB = [sys.executable, "-m", "advlab.cli"]
SWEEP = {
    "name": "cloud",
    "dataset": {"name": "digits"},
    "grid": {"seed": [0, 1, 2]},
    "model": "fc32-10",
    "train": {"epochs": 8, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    "attack_examples": 10,
    "attacks": [{"name": "fgsm"}],
    "measures": [],
    "checkpoint_every": 1,
    "max_concurrent": 2,
    "wandb": {"mode": "offline"},
    "transfer": {"controls": ["constant"]},
}
ADVLAB_FILES = (".parquet", ".pt", "sweep.json", "transfer.json", ".wandb")  # results, any


def node_dirs(root: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A node's (or the driver's) own working dir, and TMPDIR inside it."""
    home = root / name
    (home / "tmp").mkdir(parents=True)
    return home, {"TMPDIR": str(home / "tmp")}


def start_node(env: dict[str, str], cwd: Path, temp: str, port: int, head: bool) -> Any:
    """`ray start` for the head (GCS on `port`) or a worker joining it, every port free, its
    own Ray temp dir; --block ties the node's processes to this one's session, so killing that
    session stops this node alone (never `ray stop`)."""
    agent, grpc, runtime, metrics = (free_port() for _ in range(4))
    command = [
        RAY, "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
        f"--temp-dir={temp}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime}",
        f"--metrics-export-port={metrics}", "--disable-usage-stats",
    ]  # fmt: skip
    if head:
        command += [
            "--head", f"--port={port}", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
    else:
        command += [f"--address=127.0.0.1:{port}"]
    log = (cwd.parent / f"{cwd.name}.log").open("w")  # beside its folder, which stays clean
    return subprocess.Popen(
        command, env=env, cwd=cwd, start_new_session=True, stdout=log, stderr=log
    )


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what every node's environment holds (S3 endpoint, credentials)
    root: Path  # the nodes' and the driver's own folders
    sessions: list[int] = field(default_factory=list)  # one per node: its processes
    temps: list[str] = field(default_factory=list)  # each node's Ray temp dir


@pytest.fixture
def cluster(s3_endpoint: str, tmp_path: Path) -> Iterator[Cluster]:
    """Head and worker node, each with the S3 endpoint and credentials in its environment
    (as a user's nodes would have), stopped by their own sessions afterwards."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")}
    # Ray's token authentication, as a cluster should run (tests/test_job_submit.py): nodes,
    # driver and probe share ~/.ray/auth_token, made once here if this machine has none.
    base |= s3_env(s3_endpoint) | {"WANDB_MODE": "offline", "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=base, capture_output=True, check=True)
    found = Cluster(f"127.0.0.1:{port}", base, tmp_path)
    nodes: list[subprocess.Popen] = []
    try:
        for name in ("head", "worker"):
            cwd, extra = node_dirs(tmp_path, name)
            found.temps.append(tempfile.mkdtemp(prefix="s3n", dir="/tmp"))  # short socket paths
            nodes.append(start_node(base | extra, cwd, found.temps[-1], port, name == "head"))
            found.sessions.append(nodes[-1].pid)
            if name == "head":  # a worker that finds no head gives up
                wait_for_port(port, nodes[-1])
        wait_for_nodes(base, port, len(nodes), nodes)
        yield found
    finally:
        for node in nodes:  # a private cluster: killed outright, a graceful stop takes ~10 s
            _kill_session(node.pid)
            node.wait()
        for temp in found.temps:
            shutil.rmtree(temp, ignore_errors=True)


def wait_for_port(port: int, process: Any) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, "`ray start --head` exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    pytest.fail("the head's GCS never listened")


def wait_for_nodes(env: dict[str, str], port: int, count: int, nodes: list) -> None:
    """Until `count` nodes are alive (one probe process that polls, not one per poll)."""
    probe = (
        "import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "end = time.monotonic() + 150\n"
        "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.monotonic() < end:"
        " time.sleep(0.5)\n"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, f"127.0.0.1:{port}", str(count)], env=env,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert all(node.poll() is None for node in nodes), "a `ray start` exited"
    assert done.stdout.strip().splitlines()[-1:] == [str(count)], done.stderr[-2000:]


def trial_workers(sessions: list[int]) -> list[int]:
    """The nodes' processes running a Tune trial (Ray names them after the trainable)."""
    found = []
    for sid in sessions:
        for pid in _session_pids(sid):
            with contextlib.suppress(OSError):
                if b"ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
    return found


def advlab_files(folder: Path) -> list[str]:
    """advlab's results files under a folder. Not counted: a checkpoint a trial killed with
    the driver was saving to its temporary folder for Tune to upload (tmp*/training.pt), and
    the W&B staging folder of such a trial (killed_runs); a kill leaves them, no reader looks
    for them there."""
    return [
        str(path)
        for path in folder.rglob("*")
        if (path.name.endswith(ADVLAB_FILES) or path.name.startswith("offline-run-"))
        and not (path.name == "training.pt" and path.parent.name.startswith("tmp"))
        and _killed_staging(path) is None
    ]


def _killed_staging(path: Path) -> Path | None:
    """The W&B staging folder (advlab.wandb_staging) holding `path` when its process is gone:
    a trial killed with the driver, whose part-run the rerun's replaces. The next trial to
    stage on that node removes it; when none runs there, it stays in the node's TMPDIR."""
    prefix = staging_prefix(SWEEP["name"])
    return next((f for f in path.parents if left_by_dead_process(f.name, prefix)), None)


def killed_runs(folder: Path) -> set[str]:
    """The trial ids of the W&B runs left in killed trials' staging folders under a folder."""
    return {
        path.name.rsplit("-", 1)[1]
        for path in folder.rglob("offline-run-*")
        if path.is_dir() and _killed_staging(path) is not None
    }


@pytest.mark.slow
def test_a_two_node_sweep_on_s3_survives_a_killed_driver_and_reads_as_a_local_run(
    cluster: Cluster, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, env, root = cluster.address, cluster.env, cluster.root
    for name, value in s3_env(s3_endpoint).items():  # this process reads the bucket too
        monkeypatch.setenv(name, value)
    s3_filesystem(s3_endpoint, create=True).create_dir("sweeps")
    storage = "s3://sweeps/advlab"
    driver, extra = node_dirs(root, "driver")
    (driver / "cloud.yaml").write_text(yaml.safe_dump(SWEEP | {"storage": storage}))
    command = [*ADVLAB, "sweep", "cloud.yaml", "--address", address]
    env = env | extra

    log = (root / "first.log").open("w")  # outside the driver's folder, which stays empty
    first = subprocess.Popen(
        command, env=env, cwd=driver, start_new_session=True, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 300
    while not [k for k in object_keys(s3_endpoint, f"{storage}/cloud") if k.startswith("trials/")]:
        assert first.poll() is None, (root / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.2)
    _kill_session(first.pid)  # the driver, as a lost laptop would: its cluster lives on
    log.close()
    while trial_workers(cluster.sessions):  # Ray stops the dead driver's trials
        assert time.monotonic() < deadline, "the dead driver's trials run on"
        time.sleep(0.2)
    fs = s3_filesystem(s3_endpoint)
    before = object_keys(s3_endpoint, f"{storage}/cloud")
    models_before = object_keys(s3_endpoint, f"{storage}/.models")  # one store per root
    finished = {
        k: fs.open_input_stream(f"sweeps/advlab/cloud/{k}").read()
        for k in before
        if k.startswith("trials/")
    }
    assert 1 <= len(finished) < 3

    second = subprocess.run(command, env=env, cwd=driver, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    done = "1 trial" if len(finished) == 1 else f"{len(finished)} trials"
    assert f"resuming: {done} already finished" in second.stdout
    assert f"aws s3 sync {storage}/cloud/wandb wandb, then wandb sync" in second.stdout
    for key, payload in finished.items():  # finished trials are not run again
        assert fs.open_input_stream(f"sweeps/advlab/cloud/{key}").read() == payload, key

    cloud = results.load(f"{storage}/cloud")
    assert (cloud.trials["status"] == "ok").all() and len(cloud.trials) == 3
    assert cloud.trials["worker_node"].nunique() == 2  # both nodes ran trials
    assert len(cloud.transfer) and (cloud.transfer["status"] == "ok").all()
    keys = object_keys(s3_endpoint, f"{storage}/cloud")
    runs = {k.split("/")[1] for k in keys if k.startswith("wandb/offline-run-")}
    assert len(runs) >= 3  # every trial's W&B run reached the bucket
    assert any("/checkpoint_" in k for k in keys)  # Tune's checkpoints went there too
    for trial in cloud.trials.itertuples():  # cut mid-training: continued from its checkpoint
        cut = f"{trial.training_key}.pt" not in models_before
        if cut and any(f"/{trial.trial_id}/checkpoint_" in k for k in before):
            assert trial.resumed_from_epoch >= 1, trial.trial_id

    assert_same_as_local(cloud, driver / "cloud.yaml", root / "local")
    assert main(["ls", storage]) == 0
    assert main(["report", f"{storage}/cloud", "-o", str(root / "report.html")]) == 0
    assert "cloud" in (root / "report.html").read_text()
    # No node and no driver kept a results file: everything went to the bucket. A killed
    # trial's W&B staging may stay on its node (its process cannot clean up), but its trial
    # reran and that run reached the bucket.
    for name in ("head", "worker", "driver"):
        assert advlab_files(root / name) == [], name
        for trial_id in killed_runs(root / name):
            assert any(r.endswith(f"-{trial_id}") for r in runs), trial_id
    for temp in cluster.temps:
        assert advlab_files(Path(temp)) == [], temp


def assert_same_as_local(cloud: results.Results, sweep: Path, local: Path) -> None:
    """The sweep's trials run in this process on a local folder give the same numbers."""
    for index in range(len(cloud.trials)):
        argv = ["trial", str(sweep), "--index", str(index), "--storage", str(local)]
        assert main([*argv, "--wandb", "disabled"]) == 0
    reference = results.load(str(local / "cloud"))
    for table, columns in {
        "trials": ["trial_id", "seed", "test_error", "train_error"],
        "epochs": ["trial_id", "epoch", "loss", "test_error"],
        "curves": ["trial_id", "budget", "success_rate", "robust_error"],
        "examples": ["trial_id", "budget", "dataset_index", "adv_pred", "dist_rms"],
    }.items():
        ours = getattr(cloud, table) if table != "examples" else cloud.examples()
        theirs = getattr(reference, table) if table != "examples" else reference.examples()
        pd.testing.assert_frame_equal(_sorted(ours[columns]), _sorted(theirs[columns]))


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns[:3])).reset_index(drop=True)
