"""Real Ray Tune sweeps on the embedded digits, read back from parquet and W&B offline files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_sweep
from PIL import Image
from wandb_reader import offline_run_dirs, read_offline_run

from advlab.cli import main
from advlab.data import load_dataset
from advlab.store import SweepStore
from advlab.sweepfile import load_sweep

# Where and how fast a trial ran may differ between runs; its numbers may not.
TIMING_COLUMNS = ["train_seconds", "worker_node"]


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory) -> tuple[Path, str]:
    """One real sweep (2 trials), run through the command line as a user would."""
    import yaml

    folder = tmp_path_factory.mktemp("sweep")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_sweep(), "storage": str(folder / "results")}))
    assert main(["sweep", str(path)]) == 0
    return path, str(folder / "results")


def test_one_trials_row_per_grid_point_with_its_grid_values(finished) -> None:
    path, storage = finished
    spec = load_sweep(path)
    trials = SweepStore(storage, "tiny").read("trials")
    assert sorted(trials["trial_id"]) == sorted(t.trial_id() for t in spec.trials)
    assert sorted(trials["model"]) == ["fc10", "fc16-10"]
    assert [list(w) for w in trials["weight_decay"]] == [[1e-4], [1e-4]]  # always a typed list
    assert (trials["status"] == "ok").all()
    assert (trials["n_attacked"] == 12).all()
    assert trials["test_error"].between(0, 0.5).all()


def test_examples_distortions_match_the_stored_images(finished) -> None:
    _, storage = finished
    examples = SweepStore(storage, "tiny").read("examples")
    x_test = load_dataset("digits").x_test.flatten(1).numpy()
    assert len(examples) == 2 * 12 * 3  # 2 trials x 12 examples x (fgsm at 2 budgets + lbfgs)
    x_adv = np.stack(examples["x_adv"].to_numpy())
    x = x_test[examples["dataset_index"].to_numpy()]
    assert x_adv.shape == (len(examples), 64)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    rms = np.sqrt(((x_adv.astype(np.float64) - x) ** 2).mean(axis=1))
    np.testing.assert_allclose(examples["dist_rms"], rms, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(examples["dist_l2"], rms * 8, rtol=1e-4, atol=1e-6)
    fgsm = examples[examples["attack"] == "fgsm"]
    assert (fgsm["dist_linf"] <= fgsm["budget"] + 1e-6).all()
    lbfgs = examples[examples["attack"] == "lbfgs"]
    assert (lbfgs.loc[lbfgs["success"], "adv_pred"] == lbfgs.loc[lbfgs["success"], "target"]).all()
    assert (lbfgs["target"] != lbfgs["label"]).all()


def test_curves_agree_with_the_examples(finished) -> None:
    _, storage = finished
    store = SweepStore(storage, "tiny")
    examples, curves = store.read("examples"), store.read("curves")
    assert len(curves) == 2 * 2 * 2  # trials x attacks x budgets
    for row in curves.itertuples():
        rows = examples[(examples["trial_id"] == row.trial_id) & (examples["attack"] == row.attack)]
        if row.attack == "fgsm":
            hit = rows.loc[rows["budget"] == row.budget, "success"]
        else:
            hit = rows["success"] & (rows["dist_rms"] <= row.budget)
        assert row.n == 12
        assert row.success_rate == pytest.approx(hit.mean())


def test_wandb_offline_runs_compare_well(finished) -> None:
    """Readable names and grid-value tags, plain scalar summaries, models and results as
    artifacts, and a transfer run with its matrices as tables and labelled heatmaps."""
    path, storage = finished
    store = SweepStore(storage, "tiny")
    trials = store.read("trials").set_index("trial_id")
    attacks = store.read("attacks").set_index(["trial_id", "attack"])
    runs = [read_offline_run(d) for d in offline_run_dirs(Path(storage) / "tiny")]
    by_job = {
        job: [r for r in runs if r["run"]["job_type"] == job]
        for job in ("trial", "transfer", "results")
    }
    assert [len(v) for v in by_job.values()] == [2, 1, 1]
    labels = load_sweep(path).labels
    for run in by_job["trial"]:
        trial_id = run["config"]["trial_id"]
        assert run["run"]["group"] == "tiny"
        assert run["run"]["project"] == "advlab-tests"
        assert run["run"]["name"] == labels[trial_id] == trials.loc[trial_id, "label"]
        model = trials.loc[trial_id, "model"]
        assert run["run"]["tags"] == [f"model={model}", "weight_decay=0.0001"]
        assert run["config"]["model"] == model
        summary = run["summary"]
        for key in ("test_error", "train_error"):
            assert summary[key] == pytest.approx(trials.loc[trial_id, key])  # a plain number
        lbfgs = attacks.loc[(trial_id, "lbfgs")]
        assert summary["lbfgs/mean_dist_rms"] == pytest.approx(lbfgs["mean_dist_rms"])
        assert summary["lbfgs/success_rate"] == pytest.approx(lbfgs["success_rate"])
        assert summary["n_attacked"] == 12
        epochs = [h["train/test_error"] for h in run["history"] if "train/test_error" in h]
        assert len(epochs) == 3 and summary["train/test_error_min"] == min(epochs)
        (artifact,) = [a for a in run["artifacts"] if a["type"] == "model"]
        key = trials.loc[trial_id, "training_key"]
        assert artifact["files"][f"{key}.pt"]["local_path"] == store.model_file(key)
        assert Path(store.model_file(key)).is_file()

    (results_run,) = by_job["results"]
    assert results_run["run"]["name"] == "tiny: results v1"
    (artifact,) = results_run["artifacts"]
    assert (artifact["name"], artifact["type"]) == ("tiny-results", "results")
    assert set(artifact["files"]) == {name for name, _ in store.result_files()}
    assert {f"trials/{t}.parquet" for t in trials.index} | {"sweep.json"} <= set(artifact["files"])
    shards = {f"transfer/{Path(p).name}" for p in store.trial_files("transfer")}
    assert shards and shards <= set(artifact["files"])  # every shard of the transfer stage

    (transfer_run,) = by_job["transfer"]
    run_dir = next(
        d for d in offline_run_dirs(Path(storage) / "tiny") if d.name.endswith("tiny-transfer-v1")
    )
    files = transfer_run["files"]
    heatmaps = [f for f in files if f.startswith("media/images/transfer_heatmap/lbfgs")]
    matrix_files = [f for f in files if f.startswith("media/table/transfer_matrix/lbfgs")]
    assert len(heatmaps) == 1 and len(matrix_files) == 1
    matrix = json.loads((run_dir / "files" / matrix_files[0]).read_text())
    assert matrix["columns"][0] == "examples made on"
    assert sorted(r[0] for r in matrix["data"]) == sorted(trials["label"])  # labels, not ids
    assert {"constant", "knn", *trials["label"]} == set(matrix["columns"][1:])
    with Image.open(run_dir / "files" / heatmaps[0]) as image:
        assert image.width > 200 and image.height > 100  # a drawn figure, not 1 px per cell


def test_same_sweep_twice_gives_identical_trials_tables(finished, tmp_path: Path) -> None:
    path, storage = finished
    assert main(["sweep", str(path), "--storage", str(tmp_path)]) == 0
    first = SweepStore(storage, "tiny").read("trials").drop(columns=TIMING_COLUMNS)
    second = SweepStore(str(tmp_path), "tiny").read("trials").drop(columns=TIMING_COLUMNS)
    key = "trial_id"
    pd.testing.assert_frame_equal(
        first.sort_values(key).reset_index(drop=True),
        second.sort_values(key).reset_index(drop=True),
    )
    order = ["trial_id", "attack", "budget", "example"]
    ex1 = SweepStore(storage, "tiny").read("examples").sort_values(order)
    ex2 = SweepStore(str(tmp_path), "tiny").read("examples").sort_values(order)
    np.testing.assert_array_equal(np.stack(ex1["x_adv"]), np.stack(ex2["x_adv"]))


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(ray_local, write_sweep, capsys) -> None:
    raw = tiny_sweep(name="diverges", grid={"train.lr": [0.1, 1.0e6]})
    raw |= {"train": {"epochs": 3, "optimizer": "sgd"}, "weight_decay": 1.0e-4}  # overflows
    assert main(["sweep", str(write_sweep(raw))]) == 1
    out = capsys.readouterr().out
    assert "1/2 trials ok, 1 failed, 0 missing" in out
    storage = load_sweep(write_sweep(raw)).settings.storage
    trials = SweepStore(storage, "diverges").read("trials").set_index("train.lr")
    assert trials.loc[0.1, "status"] == "ok"
    assert trials.loc[1.0e6, "status"] == "failed"
    assert re.search("training (diverged|loss is (nan|inf))", trials.loc[1.0e6, "reason"])
    # The failed trial wrote no partial results beside its trials row.
    examples = SweepStore(storage, "diverges").read("examples")
    assert set(examples["trial_id"]) == {trials.loc[0.1, "trial_id"]}


def test_bad_api_key_falls_back_to_offline_once_and_never_leaks(
    ray_local, write_sweep, tmp_path: Path, capfd, monkeypatch
) -> None:
    key = "advlabsecret" + "0" * 28
    monkeypatch.setenv("WANDB_API_KEY", key)
    raw = tiny_sweep(name="keyed", grid={"model": ["fc10"]})
    raw["wandb"] = {"mode": "auto", "project": "advlab-tests"}
    raw["transfer"] = {"controls": ["constant"]}
    assert main(["sweep", str(write_sweep(raw))]) == 0
    out, err = capfd.readouterr()
    assert err.count("W&B is unreachable or refused the API key") == 1
    assert "W&B offline runs:" in out
    assert key not in out + err
    files = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    assert any(p.name.endswith(".wandb") for p in files)
    for path in files:
        assert key.encode() not in path.read_bytes(), path


def test_a_fresh_rerun_keeps_one_wandb_run_folder_per_run(finished) -> None:
    """Last in this module: it reruns the fixture's sweep in place."""
    path, storage = finished
    folder = Path(storage) / "tiny"
    before = {read_offline_run(d)["run"]["id"] for d in offline_run_dirs(folder)}
    assert main(["sweep", str(path), "--fresh"]) == 0
    after = [read_offline_run(d)["run"]["id"] for d in offline_run_dirs(folder)]
    assert sorted(after) == sorted(before) and len(after) == 4  # 2 trials, transfer, results
