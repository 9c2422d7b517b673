"""A 2-node Ray cluster on this machine loses its worker node mid-trial; the sweep still completes.

ray.cluster_utils.Cluster starts a head and one worker node (1 CPU each) as separate processes
owned by this test. add_node/remove_node must run on the main thread, so the sweep DRIVER runs
in a subprocess (`advlab sweep FILE --address <cluster address>`) while this process watches and
pulls the plug. Both "nodes" share this machine's filesystem, which stands in for the shared
storage (NFS, s3://) a real cluster needs for checkpoints and results.

Finding the moment to remove the node: Ray workers are children of their node's raylet, and Tune
chdirs a trial's process into a working dir named after the trial (trial_dirname_creator = trial
id), so /proc/<pid>/cwd of the worker raylet's children tells which trial runs on the worker node.
We wait until (a) one trial has finished there (its trials row names the worker's node id), and
(b) another trial runs there, has no trials row yet, and has stored at least 3 Tune checkpoints
(one every EVERY epochs) while at most halfway through training; then remove the node. The
trial dies in the middle of training, where it writes nothing under the results tables (those
are written after training), so the only thing it can leave half-done is Tune's own state.

The run is shared (module fixture) by the tests below; it takes about a minute.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from advlab.store import SweepStore
from advlab.sweepfile import load_sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ADVLAB = [sys.executable, "-m", "advlab.cli"]
NAME = "nodeloss"
SEEDS = [0, 1, 2, 3]
EPOCHS = 60
EVERY = 5  # checkpoint_every: a Tune checkpoint every 5 epochs
EXAMPLES = 10
EPS = [0.05, 0.1]


@dataclass
class NodeLossRun:
    returncode: int
    stdout: str
    stderr: str
    sweep_file: Path
    store: SweepStore
    sweep_dir: Path
    head_node: str
    worker_node: str
    interrupted: str  # the trial running on the worker node when it was removed
    checkpoints_before: int  # Tune checkpoints that trial had stored when the node went


def sweep_file(folder: Path) -> Path:
    sweep = {
        "name": NAME,
        "dataset": {"name": "digits"},
        "grid": {"seed": SEEDS},
        "model": "fc64-64-10",
        "subset": "all",
        "train": {"epochs": EPOCHS, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": EPS,
        "attack_examples": EXAMPLES,
        "attacks": [{"name": "fgsm"}],
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        "max_failures": 3,
        "checkpoint_every": EVERY,
        "storage": str(folder / "results"),
        "wandb": {"mode": "disabled"},
        "transfer": {"enabled": False},
    }
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def trials_on(raylet_pid: int) -> set[str]:
    """Basenames of the working dirs of the raylet's child processes (Tune trial dirs)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid == raylet_pid:
                found.add(os.path.basename(os.readlink(f"/proc/{entry}/cwd")))
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
    return found


def last_checkpoint(sweep_dir: Path, trial_id: str) -> int:
    """Index of the newest Tune checkpoint of a trial on storage (-1 if none yet)."""
    names = [p.name for p in sweep_dir.glob(f"ray/*/{trial_id}/checkpoint_*")]
    return max((int(n.rsplit("_", 1)[1]) for n in names), default=-1)


@pytest.fixture(scope="module")
def node_loss_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeLossRun]:
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv

    folder = tmp_path_factory.mktemp("nodeloss")
    path = sweep_file(folder)
    expected = {t.trial_id() for t in load_sweep(path).trials}
    store = SweepStore(str(folder / "results"), NAME)
    sweep_dir = folder / "results" / NAME
    # A private Ray temp dir: the cluster's sessions, sockets and its ray_current_cluster address
    # file stay out of /tmp/ray, where other Ray instances on this host live. Short, for sockets.
    ray_tmp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    # Cluster.shutdown() resets this process's GCS kv client, which a Ray this process already
    # uses (the session's ray_local fixture, if it ran first) still needs: put it back after.
    kv_client = internal_kv.global_gcs_client, internal_kv._initialized
    driver = None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmp)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": False,
                "object_store_memory": 100 * 1024**2,
            },
        )
        try:
            worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
            cluster.wait_for_nodes()
            head_id, worker_id = cluster.head_node.node_id, worker.node_id
            raylet = worker.all_processes["raylet"][0].process.pid
            out, err = folder / "driver.out", folder / "driver.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                driver = subprocess.Popen(
                    [*ADVLAB, "sweep", str(path), "--address", cluster.address],
                    start_new_session=True,  # so a failed test can kill it and its children
                    stdout=stdout,
                    stderr=stderr,
                    env=os.environ | {"RAY_TMPDIR": ray_tmp},
                )
            interrupted, checkpoints = None, -1
            deadline = time.monotonic() + 150
            while interrupted is None:
                assert driver.poll() is None, "the sweep ended before the node could be removed"
                assert time.monotonic() < deadline, "no trial ran on the worker node in time"
                trials = store.read("trials")  # no columns at all while empty
                done = set(trials.get("trial_id", []))
                if worker_id in set(trials.get("worker_node", [])):
                    for trial in (trials_on(raylet) & expected) - done:
                        stored = last_checkpoint(sweep_dir, trial) + 1
                        if stored >= 3 and stored * EVERY <= EPOCHS // 2:
                            interrupted, checkpoints = trial, stored
                time.sleep(0.05)
            cluster.remove_node(worker)
            returncode = driver.wait(timeout=240)
            yield NodeLossRun(
                returncode=returncode,
                stdout=out.read_text(),
                stderr=err.read_text(),
                sweep_file=path,
                store=store,
                sweep_dir=sweep_dir,
                head_node=head_id,
                worker_node=worker_id,
                interrupted=interrupted,
                checkpoints_before=checkpoints,
            )
        finally:
            if driver is not None and driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            cluster.shutdown()  # inside RAY_TMPDIR: it removes *our* address file, not /tmp/ray's
            internal_kv.global_gcs_client, internal_kv._initialized = kv_client
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sweep_survives_losing_a_worker_node_mid_trial(node_loss_run: NodeLossRun) -> None:
    run = node_loss_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{len(SEEDS)}/{len(SEEDS)} trials ok, 0 failed, 0 missing" in run.stdout

    trials = run.store.read("trials")
    # Exactly one row per grid point, every one ok.
    assert sorted(trials["seed"]) == SEEDS
    assert trials["trial_id"].is_unique
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    # The trials ran on both nodes; the one cut off on the worker node finished on the head.
    assert set(trials["worker_node"]) == {run.head_node, run.worker_node}
    node_of = dict(zip(trials["trial_id"], trials["worker_node"], strict=True))
    assert node_of[run.interrupted] == run.head_node

    # Nothing lost, nothing duplicated.
    examples = run.store.read("examples")
    assert len(examples) == len(SEEDS) * EXAMPLES * len(EPS)
    assert not examples.duplicated(["trial_id", "attack", "budget", "example"]).any()
    curves = run.store.read("curves")
    assert len(curves) == len(SEEDS) * len(EPS)
    epochs = run.store.read("epochs")
    for trial_id, history in epochs.groupby("trial_id"):
        assert history["epoch"].tolist() == list(range(1, EPOCHS + 1)), trial_id

    # No half-written files anywhere in the sweep folder (tables, models, Tune's state).
    leftovers = [p for p in run.sweep_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def tune_results(run: NodeLossRun, trial_id: str) -> list[dict]:
    [result_file] = run.sweep_dir.glob(f"ray/*/{trial_id}/result.json")
    return [json.loads(line) for line in result_file.read_text().splitlines() if line]


def test_trial_resumed_from_checkpoint_continues_where_it_stopped(
    node_loss_run: NodeLossRun,
) -> None:
    """Tune's result log of the trial (appended across attempts) shows two processes in turn: the
    one on the lost node reported up to epoch j, the one on the head started right after the last
    checkpoint the first one registered (so it redid fewer than EVERY epochs, not all j).

    Written for either report cadence of tune_trainable: every epoch, or checkpoint epochs only.
    """
    run = node_loss_run
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [r for r in tune_results(run, run.interrupted) if "epoch" in r]
    pids = [r["pid"] for r in reports]
    switch = next(i for i, pid in enumerate(pids) if pid != pids[0])
    first, second = reports[:switch], reports[switch:]
    assert len({r["pid"] for r in second}) == 1, "more than one restart"
    step = first[1]["epoch"] - first[0]["epoch"]  # the node went after >= 3 checkpoints
    assert step in (1, EVERY)
    lost_at = first[-1]["epoch"]
    assert [r["epoch"] for r in first] == list(range(step, lost_at + 1, step))
    # At least as far as the checkpoints we saw on storage before removing the node (the very
    # last of them may not have reached the driver yet).
    assert (run.checkpoints_before - 1) * EVERY <= lost_at < EPOCHS
    checkpointed = {r["epoch"]: r for r in first if r.get("checkpoint_dir_name")}
    assert list(checkpointed) == list(range(EVERY, lost_at + 1, EVERY))
    resumed_from = max(checkpointed)
    assert [r["epoch"] for r in second] == list(range(resumed_from + step, EPOCHS + 1, step))
    # Tune's own count carried over from the checkpoint too.
    assert second[0]["training_iteration"] == checkpointed[resumed_from]["training_iteration"] + 1

    # The redone epochs reproduce exactly what the lost attempt had reported, and the history
    # in parquet is the one reported live: epochs up to the checkpoint from the first attempt
    # (carried in the checkpoint), the rest from the second.
    redone = {r["epoch"]: r for r in first if r["epoch"] > resumed_from}
    for r in second:
        for key in ("loss", "train_error", "test_error"):
            if r["epoch"] in redone:
                assert r[key] == redone[r["epoch"]][key], (r["epoch"], key)
    live = {r["epoch"]: r for r in first if r["epoch"] <= resumed_from}
    live |= {r["epoch"]: r for r in second}
    history = run.store.read("epochs")
    history = history[history["trial_id"] == run.interrupted].set_index("epoch")
    for key in ("loss", "train_error", "test_error", "seconds"):
        assert [history.loc[e, key] for e in sorted(live)] == [live[e][key] for e in sorted(live)]


def test_resumed_trial_matches_an_uninterrupted_run(
    node_loss_run: NodeLossRun, tmp_path: Path
) -> None:
    """Resuming restores weights, optimizer and shuffle state exactly: the interrupted trial ends
    where the same trial run straight through (no Ray, same thread count) ends."""
    import torch

    from advlab.trial import TrialContext, run_trial

    run = node_loss_run
    assert run.returncode == 0, run.stderr[-3000:]
    spec = next(t for t in load_sweep(run.sweep_file).trials if t.trial_id() == run.interrupted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tune_trainable does for a 1-CPU trial
    try:
        straight = run_trial(spec, TrialContext(sweep=NAME, storage=str(tmp_path)))
    finally:
        torch.set_num_threads(threads)
    resumed = run.store.read("trials").set_index("trial_id").loc[run.interrupted]
    for key in ("train_error", "test_error"):
        assert math.isclose(resumed[key], straight.row[key], abs_tol=1e-12), key
    curves = run.store.read("curves")
    resumed_curves = curves[curves["trial_id"] == run.interrupted].sort_values("budget")
    straight_curves = SweepStore(str(tmp_path), NAME).read("curves").sort_values("budget")
    assert resumed_curves["budget"].tolist() == EPS
    for key in ("success_rate", "robust_error"):
        assert resumed_curves[key].tolist() == straight_curves[key].tolist(), key
    history = run.store.read("epochs")
    history = history[history["trial_id"] == run.interrupted].sort_values("epoch")
    reference = SweepStore(str(tmp_path), NAME).read("epochs").sort_values("epoch")
    for column in ("loss", "train_error", "test_error"):
        assert history[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-9)
