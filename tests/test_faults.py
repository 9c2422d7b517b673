"""Faults during work: damaged results files, a broken transfer target or stage, two sweeps on
one folder, diverged training. Nothing already right is lost or duplicated, every failure is
recorded with its reason, and rerunning the same command mends what can be mended."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_sweep

from advlab import results
from advlab.cli import main
from advlab.store import SweepStore
from advlab.sweepfile import parse_sweep
from advlab.trial import TrialContext, run_trial


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """A finished two-trial sweep (its file and folder), copied afresh by each test."""
    folder = tmp_path_factory.mktemp("faults")
    raw = tiny_sweep(name="f", storage=str(folder / "results"), wandb={"mode": "disabled"})
    raw["transfer"] = {"controls": ["constant"]}
    path = folder / "f.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    return path, folder / "results" / "f"


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    path, folder = finished
    target = tmp_path / "results" / "f"
    shutil.copytree(folder, target)
    shutil.copytree(folder.parent / ".models", target.parent / ".models")  # the shared store
    return path, target


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_damaged_files_are_moved_aside_and_only_their_work_reruns(
    finished, tmp_path: Path, capsys
) -> None:
    path, folder = _copy(finished, tmp_path)
    before = results.load(str(folder))
    first, second = before.trials["trial_id"]
    key = before.trials.set_index("trial_id").loc[first, "training_key"]
    untouched = folder / "epochs" / f"{second}.parquet"
    kept = untouched.read_bytes()
    _truncate(folder / "trials" / f"{first}.parquet")
    _truncate(folder / "examples" / f"{second}.lbfgs.parquet")
    _truncate(folder.parent / ".models" / f"{key}.pt")
    (folder / "sweep.json").write_text('{"name": "f", "vers')
    capsys.readouterr()
    assert main(["sweep", str(path), "--storage", str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err
    for name in (f"trials/{first}.parquet", f"examples/{second}.lbfgs.parquet"):
        assert f"{name} is damaged" in err
    assert {p.name.split(".parquet")[0] for p in (folder / "damaged").rglob("*.parquet*")} >= {
        first,
        f"{second}.lbfgs",
    }
    after = results.load(str(folder))
    assert sorted(after.trials["trial_id"]) == sorted([first, second])  # no duplicates
    pd.testing.assert_series_equal(
        after.trials.set_index("trial_id")["test_error"].sort_index(),
        before.trials.set_index("trial_id")["test_error"].sort_index(),
    )  # the damaged model was retrained to the same weights
    lbfgs = after.examples().query("attack == 'lbfgs'")
    assert len(lbfgs) == len(before.examples().query("attack == 'lbfgs'"))
    assert untouched.read_bytes() == kept  # what was not damaged was not redone
    assert main(["report", str(folder), "-o", str(tmp_path / "r.html")]) == 0


@pytest.mark.slow
def test_a_broken_transfer_target_costs_that_target_only(finished, tmp_path: Path, capsys) -> None:
    _, folder = _copy(finished, tmp_path)
    res = results.load(str(folder))
    lost, kept = res.trials["trial_id"]
    key = res.trials.set_index("trial_id").loc[lost, "training_key"]
    (folder.parent / ".models" / f"{key}.pt").unlink()
    assert main(["transfer", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"target {lost} failed: FileNotFoundError" in out
    rows = SweepStore.from_dir(str(folder)).read("transfer")
    failed = rows[rows["status"] == "failed"]
    assert failed["target"].tolist() == [lost]
    ok = rows[rows["status"] == "ok"]
    assert set(ok["target"]) == {kept, "constant"}
    assert set(ok["source_trial"]) >= {lost, kept}  # its examples still transfer elsewhere


@pytest.mark.slow
def test_a_failed_transfer_stage_is_summarised_and_the_sweep_exits_1(
    finished, tmp_path: Path, capsys
) -> None:
    path, folder = _copy(finished, tmp_path)
    shutil.rmtree(folder / "transfer")
    (folder / "transfer").write_text("a file where the transfer folder goes")  # cannot write
    assert main(["sweep", str(path), "--storage", str(tmp_path / "results")]) == 1
    out = capsys.readouterr().out
    assert "2/2 trials ok" in out
    assert "transfer stage failed:" in out and "advlab transfer" in out


@pytest.mark.slow
def test_a_second_sweep_on_the_same_folder_is_refused(finished, tmp_path: Path, capsys) -> None:
    path, _ = _copy(finished, tmp_path)
    store = SweepStore(str(tmp_path / "results"), "f")
    with store.sweep_lock():
        assert main(["sweep", str(path), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is in use by another advlab sweep (pid" in err


def test_training_that_diverges_without_nan_fails_with_its_reason(tmp_path: Path) -> None:
    raw = tiny_sweep(name="d", grid={}, model="fc10")
    raw["train"] = {"epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 1.0e6}
    spec = parse_sweep(raw)
    with pytest.raises(FloatingPointError, match="training diverged"):
        run_trial(spec.trials[0], TrialContext(sweep="d", storage=str(tmp_path)))
    row = SweepStore(str(tmp_path), "d").read("trials").iloc[0]
    assert row["status"] == "failed"
    assert row["reason"].startswith("FloatingPointError: training diverged: loss")


@pytest.mark.slow
def test_a_sweep_without_attacks_trains_and_transfers_nothing(ray_local, tmp_path: Path) -> None:
    raw = tiny_sweep(name="bare", storage=str(tmp_path / "results"), attacks=[])
    raw["wandb"] = {"mode": "disabled"}
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    res = results.load(str(tmp_path / "results" / "bare"))
    assert (res.trials["status"] == "ok").all() and res.attacks.empty
    assert res.transfer.empty


@pytest.mark.slow
def test_a_control_that_cannot_fit_a_tiny_subset_costs_that_control_only(
    ray_local, tmp_path: Path, capsys
) -> None:
    # Three training images: k-nearest neighbours with k = 5 cannot predict from them.
    raw = tiny_sweep(name="tiny", storage=str(tmp_path / "results"), subset="fraction:0.002")
    raw |= {"wandb": {"mode": "disabled"}, "transfer": {"controls": ["constant", "knn"]}}
    raw["attacks"] = [{"name": "fgsm"}]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2/2 trials ok" in out and "target knn failed: ValueError" in out
    rows = results.load(str(tmp_path / "results" / "tiny")).transfer
    assert rows.loc[rows["target"] == "knn", "status"].tolist() == ["failed"]
    ok = rows[rows["status"] == "ok"]
    assert set(ok["target_kind"]) == {"trial", "control"} and set(ok["target"]) >= {"constant"}


@pytest.mark.slow
def test_a_zero_byte_cached_model_is_retrained_never_trusted(
    finished, tmp_path: Path, capsys
) -> None:
    path, folder = _copy(finished, tmp_path)
    before = results.load(str(folder)).trials.set_index("trial_id")
    first = before.index[0]
    key = before.loc[first, "training_key"]
    (folder.parent / ".models" / f"{key}.pt").write_bytes(b"")  # a full disk's leftover
    capsys.readouterr()
    assert main(["sweep", str(path), "--storage", str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err
    assert f".models/{key}.pt is damaged (an empty file); moved to .models/damaged/" in err
    after = results.load(str(folder)).trials.set_index("trial_id")
    assert bool(after.loc[first, "trained_here"])  # trained again, not loaded
    assert (folder.parent / ".models" / f"{key}.pt").stat().st_size > 0
    columns = ["test_error", "train_error", "status"]
    pd.testing.assert_frame_equal(after[columns].sort_index(), before[columns].sort_index())


@pytest.mark.slow
def test_a_zero_byte_training_checkpoint_is_moved_aside_and_its_trial_restarts(
    finished, tmp_path: Path, capsys
) -> None:
    path, folder = _copy(finished, tmp_path)
    before = results.load(str(folder)).trials.set_index("trial_id")
    first = before.index[0]
    (folder / "trials" / f"{first}.parquet").unlink()  # it never finished...
    checkpoint = folder / "ray" / "run-x" / first / "checkpoint_000001" / "training.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")  # ...and its checkpoint was cut off by a full disk
    capsys.readouterr()
    assert main(["sweep", str(path), "--storage", str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err
    assert "training.pt is damaged (an empty file); moved to damaged/, its trial restarts" in err
    assert not checkpoint.exists()
    after = results.load(str(folder)).trials.set_index("trial_id")
    assert after.loc[first, "resumed_from_epoch"] == 0
    assert after.loc[first, "test_error"] == before.loc[first, "test_error"]


@pytest.mark.slow
def test_a_transfer_cut_off_after_the_sweep_grew_reruns_and_matches_a_clean_one(
    finished, tmp_path: Path, capsys
) -> None:
    path, folder = _copy(finished, tmp_path)
    shards = folder / "transfer"
    old_rows = {p.name: p.read_bytes() for p in shards.glob("*.parquet")}
    old_record = (folder / "transfer.json").read_bytes()
    raw = yaml.safe_load(path.read_text())
    raw["grid"]["weight_decay"] = [1.0e-4, 1.0e-3]  # the sweep grows to four trials
    grown = tmp_path / "f.yaml"
    grown.write_text(yaml.safe_dump(raw))
    storage = ["--storage", str(tmp_path / "results")]
    assert main(["sweep", str(grown), *storage]) == 0
    clean = results.load(str(folder)).transfer
    # kill -9 during that transfer stage: the trials are done, half the new shards written,
    # the old table's shards not yet removed, the record the old one
    new = sorted({p.name for p in shards.glob("*.parquet")} - set(old_rows))
    for name in new[: len(new) // 2]:
        (shards / name).unlink()
    for name, data in old_rows.items():
        (shards / name).write_bytes(data)
    (folder / "transfer.json").write_bytes(old_record)
    capsys.readouterr()
    assert main(["sweep", str(grown), *storage]) == 0
    out = capsys.readouterr().out
    assert "4/4 trials ok" in out and "transfer: 4 source trials" in out
    again = results.load(str(folder))
    trials = set(again.trials["trial_id"])
    ok = again.transfer[again.transfer["status"] == "ok"]
    assert set(ok["source_trial"]) - {"noise"} == trials
    assert set(ok.loc[ok["target_kind"] == "trial", "target"]) == trials
    order = ["source_trial", "attack", "budget", "kind", "target", "amplified_to"]
    pd.testing.assert_frame_equal(
        again.transfer.sort_values(order).reset_index(drop=True),
        clean.sort_values(order).reset_index(drop=True),
    )
    capsys.readouterr()
    assert main(["sweep", str(grown), *storage]) == 0  # fresh now: no transfer stage
    assert "transfer:" not in capsys.readouterr().out


def test_a_transfer_record_without_its_inputs_is_stale(tmp_path: Path) -> None:
    from advlab.sweep_settings import TransferSpec
    from advlab.transfer import stale_reason, transfer_inputs

    store = SweepStore(str(tmp_path), "s")
    settings = TransferSpec()
    assert stale_reason(store, settings) is None  # no trials: nothing to transfer
    row = {"trial_id": "t1", "status": "ok", "reason": "", "sweep": "s", "label": "t1"}
    store.write_rows("trials", "t1", [row])
    assert stale_reason(store, settings) == "no transfer table yet"
    store.write_json("transfer.json", {"sources": ["t1"], "skipped": {}, "failed": {}})
    assert stale_reason(store, settings) == "its table is missing"
    store.write_rows("transfer", "all", [{"target": "t1", "status": "ok", "reason": ""}])
    assert stale_reason(store, settings) == "its record predates the record of its inputs"
    inputs = transfer_inputs(store, settings)
    store.write_json("transfer.json", {"sources": ["t1"], "inputs": inputs})
    assert stale_reason(store, settings) == "its record predates sharded transfer"
    store.write_json("transfer.json", {"inputs": inputs, "shards": ["all", "other"]})
    assert stale_reason(store, settings) == "shards of its table are missing"
    store.write_json("transfer.json", {"inputs": inputs, "shards": ["all"]})
    assert stale_reason(store, settings) is None
    inputs["settings"] = {"pairs": "sample"}  # recorded settings read as settings now
    store.write_json("transfer.json", {"inputs": inputs, "shards": ["all"]})
    assert stale_reason(store, settings) == "the transfer settings changed"
