"""The filesystem layer on a real S3 API (moto's server on loopback): every file advlab writes
lands as whole objects, reads back as on a local folder, and storage that cannot hold a sweep
is said in one line before any work."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_sweep
from s3_server import object_keys, s3_filesystem
from test_store import curve

from advlab import manifest, results
from advlab.cli import main
from advlab.store import SweepStore
from advlab.sweepfile import parse_sweep
from advlab.trial import TrialContext, run_trial

pytest_plugins = ["s3_server"]  # the loopback S3 server and a bucket per test


def test_tables_round_trip_as_whole_objects_and_pandas_reads_the_folder(
    bucket: str, s3_endpoint: str
) -> None:
    store = SweepStore(bucket, "s")
    store.write_rows("curves", "a", [curve("a", 0.5)])
    store.write_rows("curves", "b", [curve("b", 0.25), curve("b", 0.75)])
    store.write_rows("curves", "a", [curve("a", 0.9)])  # a retried trial replaces its object
    frame = store.read("curves").sort_values(["trial_id", "success_rate"])
    assert frame["trial_id"].tolist() == ["a", "b", "b"]
    assert frame["success_rate"].tolist() == [0.9, 0.25, 0.75]
    # No temporary objects, no folder markers: exactly one object per file.
    assert object_keys(s3_endpoint, f"{bucket}/s") == ["curves/a.parquet", "curves/b.parquet"]
    folder = f"{bucket.removeprefix('s3://')}/s/curves"
    read = pd.read_parquet(folder, filesystem=s3_filesystem(s3_endpoint))
    assert sorted(read["success_rate"]) == [0.25, 0.75, 0.9]


def test_records_models_and_checkpoints_on_s3(bucket: str, s3_endpoint: str) -> None:
    store = SweepStore(bucket, "s")
    store.write_json("sweep.json", {"versions": [1]})
    assert store.read_json("sweep.json") == {"versions": [1]}
    assert store.load_model("k") is None
    store.save_model("k", {"w": torch.arange(6.0)})
    assert torch.equal(store.load_model("k")["w"], torch.arange(6.0))
    fs = s3_filesystem(s3_endpoint)
    for steps in (2, 3):  # two Tune checkpoints, the newer cut in half (a killed upload)
        buffer = io.BytesIO()
        torch.save({"history": list(range(steps)), "weights": torch.ones(64, 64)}, buffer)
        payload = buffer.getvalue()[: None if steps == 2 else len(buffer.getvalue()) // 2]
        path = f"{store.root}/ray/run-a/t1/checkpoint_00000{steps}/training.pt"
        with fs.open_output_stream(path) as out:
            out.write(payload)
    assert store.latest_checkpoint("t1")["history"] == [0, 1]  # the whole one
    (line,) = store.check_files()
    assert line.startswith("ray/run-a/t1/checkpoint_000003/training.pt is damaged")
    keys = object_keys(s3_endpoint, store.uri)
    assert "ray/run-a/t1/checkpoint_000003/training.pt" not in keys
    assert any(k.startswith("damaged/ray/run-a/t1/checkpoint_000003/training.pt.") for k in keys)
    assert "ray/run-a/t1/checkpoint_000002/training.pt" in keys


def test_a_damaged_object_is_noted_by_readers_and_moved_aside_by_a_sweep(
    bucket: str, s3_endpoint: str
) -> None:
    store = SweepStore(bucket, "s")
    store.write_rows("curves", "a", [curve("a", 0.5)])
    with s3_filesystem(s3_endpoint).open_output_stream(f"{store.root}/curves/b.parquet") as out:
        out.write(b"PAR1 not really")
    reader = store.reader()
    assert reader.read("curves")["trial_id"].tolist() == ["a"]
    assert reader.damaged and reader.damaged[0].startswith("curves/b.parquet (")
    assert "curves/b.parquet" in object_keys(s3_endpoint, store.uri)  # a reader moves nothing
    (line,) = store.check_files()
    assert line.startswith("curves/b.parquet is damaged")
    assert [k for k in object_keys(s3_endpoint, store.uri) if k.startswith("curves/")] == [
        "curves/a.parquet"
    ]


def test_a_trial_on_s3_writes_what_it_writes_locally_and_ls_and_load_read_it(
    bucket: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One trial run in this process against each storage: the same rows; `advlab ls` and
    `advlab.load` read s3:// as they read a folder."""
    raw = tiny_sweep(name="one", grid={"model": ["fc10"]}, attacks=[{"name": "fgsm"}])
    raw |= {"attack_examples": 6, "train": raw["train"] | {"epochs": 2}, "measures": []}
    spec = parse_sweep(raw)
    loaded = {}
    for storage in (bucket, str(tmp_path / "local")):
        store = SweepStore(storage, spec.name)
        store.write_manifest(manifest.record_version(None, spec))
        ctx = TrialContext(spec.name, storage, label="fc10")  # W&B: the sweep test's part
        run_trial(spec.trials[0], ctx)
        loaded[storage] = results.load(store.uri)
    remote, local = loaded[bucket], loaded[str(tmp_path / "local")]
    for table, columns in {
        "trials": ["trial_id", "status", "test_error", "train_error"],
        "epochs": ["epoch", "loss", "test_error"],
        "curves": ["budget", "success_rate", "robust_error"],
    }.items():
        pd.testing.assert_frame_equal(
            getattr(remote, table)[columns], getattr(local, table)[columns]
        )
    columns = ["dataset_index", "adv_pred", "dist_rms", "x_adv"]
    pd.testing.assert_frame_equal(
        remote.examples(images=True)[columns], local.examples(images=True)[columns]
    )
    keys = object_keys(s3_endpoint, f"{bucket}/one")
    assert {k.split("/")[0] for k in keys} >= {"trials", "epochs", "examples"}
    models = object_keys(s3_endpoint, f"{bucket}/.models")  # one model store per root
    assert models == [f"{spec.trials[0].training_key()}.pt"]
    assert not [k for k in keys if k.endswith(".tmp") or k.endswith("/")]
    assert main(["ls", bucket]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["one", "1", "1", "1"]


def test_storage_that_cannot_hold_a_sweep_is_one_line_exit_2(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(tiny_sweep(storage=f"{bucket}-missing/advlab")))
    cases = [  # (AWS_ENDPOINT_URL, what the line must say); None: the live loopback server
        (None, "no bucket"),
        ("http://127.0.0.1:9", "cannot reach"),
        ("127.0.0.1:9000", "AWS_ENDPOINT_URL='127.0.0.1:9000' is no endpoint"),
    ]
    for endpoint, said in cases:
        if endpoint is not None:
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        commands = (["validate", str(sweep)], ["sweep", str(sweep)], ["ls", f"{bucket}-missing"])
        for command in commands:
            assert main(command) == 2, (endpoint, command)
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and said in err, (endpoint, err)
    assert not os.path.exists(tmp_path / "results")


def test_wandb_staging_is_uploaded_whole_and_removed_and_a_killed_ones_cleared(
    bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs W&B wrote in a store's local staging folder go up as objects (W&B's links stay
    out) and the folder goes; a folder a killed process left is cleared when the next store of
    the sweep stages (its trial reruns), one of a live process is left alone."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    ended = subprocess.Popen(["true"])
    ended.wait()  # a process that is gone (reaped: no zombie answers for it)
    dead = tmp_path / f"advlab-wandb-s-{ended.pid}-abcd1234"
    live = tmp_path / f"advlab-wandb-s-{os.getpid()}-efgh5678"
    for left in (dead, live):
        left.mkdir()
    store = SweepStore(bucket, "s")
    staging = Path(store.wandb_dir())
    assert not dead.exists() and live.exists() and staging.parent == tmp_path
    run = staging / "wandb" / "offline-run-20260101_000000-s-t1"
    (run / "files").mkdir(parents=True)
    (run / "files" / "config.yaml").write_text("a: 1\n")
    (run / "run-t1.wandb").write_bytes(b"\x00" * 70_000)
    (staging / "wandb" / "latest-run").symlink_to(run)
    store.sync_wandb()
    assert object_keys(s3_endpoint, f"{bucket}/s") == [
        "wandb/offline-run-20260101_000000-s-t1/files/config.yaml",
        "wandb/offline-run-20260101_000000-s-t1/run-t1.wandb",
    ]
    assert not staging.exists()
