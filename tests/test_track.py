"""W&B offline runs: written by a real wandb run, read back from the transaction log."""

from __future__ import annotations

from pathlib import Path

from wandb_reader import offline_run_dirs, read_offline_run

from advlab.track import TrialRun, resolve_mode


def open_run(directory: Path, run_id: str = "my-sweep-abc") -> TrialRun:
    return TrialRun(
        mode="offline",
        project="advlab-tests",
        entity=None,
        group="my-sweep",
        run_id=run_id,
        name="fc10 wd=0.001",
        tags=["model=fc10", "weight_decay=0.001"],
        config={"model": "fc10", "train": {"lr": 0.1}},
        directory=str(directory),
    )


def test_offline_run_files_hold_config_history_and_plain_summaries(tmp_path: Path) -> None:
    run = open_run(tmp_path)
    for epoch, error in ((1, 0.5), (2, 0.2), (3, 0.3)):  # the best epoch is not the last
        run.log_epoch({"epoch": epoch, "loss": 1.0 / epoch, "test_error": error})
    run.log_summary({"test_error": 0.125, "lbfgs/mean_dist_rms": 0.0625, "fgsm/success@0.1": 0.5})
    run.finish()

    (run_dir,) = offline_run_dirs(tmp_path)
    logged = read_offline_run(run_dir)
    assert logged["run"] == {
        "id": "my-sweep-abc", "group": "my-sweep", "project": "advlab-tests",
        "name": "fc10 wd=0.001", "tags": ["model=fc10", "weight_decay=0.001"], "job_type": "trial",
    }  # fmt: skip
    assert logged["config"]["model"] == "fc10"
    assert logged["config"]["train"] == {"lr": 0.1}
    losses = [h["train/loss"] for h in logged["history"] if "train/loss" in h]
    assert losses == [1.0, 0.5, 1.0 / 3]
    summary = logged["summary"]
    # Plain numbers under their own names, sortable and filterable in W&B's run table.
    assert summary["test_error"] == 0.125
    assert summary["lbfgs/mean_dist_rms"] == 0.0625
    assert summary["fgsm/success_at_0_1"] == 0.5
    assert summary["train/test_error"] == 0.3  # the last epoch
    assert summary["train/test_error_min"] == 0.2  # the best one, beside it
    assert summary["train/loss_min"] == 1.0 / 3


def test_a_rerun_replaces_the_runs_folder(tmp_path: Path) -> None:
    for attempt in (1, 2, 3):
        run = open_run(tmp_path)
        run.log_summary({"attempt": attempt})
        run.finish()
    other = open_run(tmp_path, run_id="abc")  # a suffix of the first id: a different run
    other.finish()
    folders = offline_run_dirs(tmp_path)
    assert len(folders) == 2
    ids = sorted(read_offline_run(f)["run"]["id"] for f in folders)
    assert ids == ["abc", "my-sweep-abc"]
    (mine,) = [f for f in folders if read_offline_run(f)["run"]["id"] == "my-sweep-abc"]
    assert read_offline_run(mine)["summary"]["attempt"] == 3


def test_artifacts_point_at_the_stored_files(tmp_path: Path, monkeypatch) -> None:
    staging = tmp_path / "wandb-data"  # W&B's own data folder (~/.local/share/wandb by default)
    monkeypatch.setenv("WANDB_DATA_DIR", str(staging))
    model = tmp_path / "models" / "k.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    run = open_run(tmp_path)
    run.log_artifact("model-k", "model", [("k.pt", str(model))], {"model": "fc10"})
    run.log_tables({"curves/fgsm": [{"budget": 0.1, "robust_error": 0.25}]})
    run.finish()
    # What the README says: the model (and results) artifacts copy nothing; the tables, W&B's
    # own table artifacts, are staged by wandb in its data folder until uploaded.
    staged = [p.read_bytes() for p in staging.rglob("*") if p.is_file()]
    assert {p.parent for p in staging.rglob("*") if p.is_file()} == {
        staging / "artifacts" / "staging"
    }  # the folder the README names: $WANDB_DATA_DIR/artifacts/staging
    assert staged and all(b"weights" not in s for s in staged)
    assert any(b'"robust_error"' in s and b'"_type": "table"' in s for s in staged)
    artifacts = read_offline_run(offline_run_dirs(tmp_path)[0])["artifacts"]
    (artifact,) = [a for a in artifacts if a["name"] == "model-k"]
    assert (artifact["name"], artifact["type"], artifact["metadata"]) == (
        "model-k", "model", {"model": "fc10"},
    )  # fmt: skip
    # Referenced where it lies (no copy in W&B's staging folder), so `wandb sync` reads it there.
    assert artifact["files"]["k.pt"]["local_path"] == str(model)
    assert artifact["files"]["k.pt"]["size"] == len(b"weights")


def test_disabled_tracking_writes_nothing(tmp_path: Path) -> None:
    run = TrialRun(
        mode="disabled",
        project="p",
        entity=None,
        group="g",
        run_id="r",
        name="r",
        config={},
        directory=str(tmp_path / "wandb-dir"),
    )
    run.log_epoch({"epoch": 1, "loss": 1.0})
    run.finish()
    assert not (tmp_path / "wandb-dir").exists()


def test_mode_is_offline_without_an_api_key(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_a_trials_offline_run_holds_its_tables_and_example_images(tmp_path: Path) -> None:
    import json

    from conftest import tiny_sweep
    from PIL import Image

    from advlab.store import SweepStore
    from advlab.sweep import trial_context
    from advlab.sweepfile import parse_sweep
    from advlab.trial import run_trial

    spec = parse_sweep(tiny_sweep(grid={"seed": [0]}))
    result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "offline"))
    row, metrics = result.row, result.metrics
    (run_dir,) = offline_run_dirs(tmp_path / "tiny")
    logged = read_offline_run(run_dir)
    files = logged["files"]

    curves = SweepStore(str(tmp_path), "tiny").read("curves")
    logged_rates = {}
    for attack in ("fgsm", "lbfgs"):
        (curves_file,) = [f for f in files if f.startswith(f"media/table/curves/{attack}_")]
        table = json.loads((run_dir / "files" / curves_file).read_text())
        assert table["columns"] == list(curves.columns)
        budget, rate = table["columns"].index("budget"), table["columns"].index("success_rate")
        logged_rates |= {(attack, r[budget]): r[rate] for r in table["data"]}
    assert len(logged_rates) == len(curves) == 4
    for r in curves.itertuples():
        assert logged_rates[(r.attack, r.budget)] == r.success_rate

    (attacks_file,) = [f for f in files if f.startswith("media/table/attacks/lbfgs_")]
    logged_attacks = json.loads((run_dir / "files" / attacks_file).read_text())
    attacks = SweepStore(str(tmp_path), "tiny").read("attacks")
    assert logged_attacks["columns"] == list(attacks.columns)
    column = logged_attacks["columns"].index("mean_dist_rms")
    lbfgs = attacks.loc[attacks["attack"] == "lbfgs", "mean_dist_rms"].item()
    assert [r[column] for r in logged_attacks["data"]] == [lbfgs]
    assert metrics["lbfgs/mean_dist_rms"] == lbfgs

    # Final metrics are plain numbers under names W&B can sort and filter (no '@' or '.').
    summary = logged["summary"]
    assert summary["lbfgs/mean_dist_rms"] == metrics["lbfgs/mean_dist_rms"]
    assert summary["lbfgs/success_rate"] == metrics["lbfgs/success_rate"]
    assert summary["test_error"] == row["test_error"]
    assert summary["fgsm/robust_error_at_0_1"] == metrics["fgsm/robust_error@0.1"]
    assert not [k for k in summary if "@" in k or "." in k]
    (model,) = [a for a in logged["artifacts"] if a["type"] == "model"]  # beside run tables
    key = spec.trials[0].training_key()
    assert model["name"] == f"model-{key}"
    assert model["files"][f"{key}.pt"]["local_path"] == str(tmp_path / ".models" / f"{key}.pt")
    assert model["metadata"]["model"] == spec.trials[0].model

    images = [f for f in files if f.startswith("media/images/examples/lbfgs")]
    successes = min(8, round(metrics["lbfgs/success_rate"] * row["n_attacked"]))
    assert len(images) == 3 * successes  # original, adversarial, perturbation x10
    with Image.open(run_dir / "files" / images[0]) as image:
        assert image.size == (8, 8)


def _trial_runs(directory: Path, run_id: str) -> list[dict]:
    """Every offline run folder of one run id, read back, oldest first."""
    runs = [read_offline_run(f) for f in offline_run_dirs(directory)]
    return [r for r in runs if r["run"]["id"] == run_id]


def test_a_trials_run_only_grows_when_attacks_are_added_or_it_is_rerun(
    tmp_path: Path, write_sweep, capsys
) -> None:
    from conftest import tiny_sweep

    from advlab.cli import main
    from advlab.sweep import trial_context
    from advlab.sweepfile import load_sweep
    from advlab.trial import run_trial

    raw = tiny_sweep(grid={"seed": [0]}, measures=[], storage=str(tmp_path / "results"))
    raw["attacks"] = [{"name": "lbfgs", "max_iter": 10, "search_steps": 3}]
    spec = load_sweep(write_sweep(raw))
    storage = str(tmp_path / "results")
    run_trial(spec.trials[0], trial_context(spec, 0, storage, "offline"))
    run_id = f"tiny-{spec.ids[0]}"

    def held() -> tuple[set[str], set[str]]:
        runs = _trial_runs(tmp_path / "results" / "tiny", run_id)
        files = {f.split("_")[0] for r in runs for f in r["files"] if f.startswith("media/")}
        return {a["type"] for r in runs for a in r["artifacts"]}, files

    artifacts, files = held()
    assert "model" in artifacts
    assert {"media/images/examples/lbfgs", "media/table/attacks/lbfgs"} <= files
    raw["attacks"].append({"name": "fgsm"})  # the sweep gains an attack
    grown = load_sweep(write_sweep(raw))
    run_trial(grown.trials[0], trial_context(grown, 0, storage, "offline"))
    again_artifacts, again_files = held()
    assert again_artifacts >= artifacts and again_files >= files | {"media/table/attacks/fgsm"}
    assert main(["trial", str(write_sweep(raw)), "--index", "0", "--wandb", "offline"]) == 0
    last_artifacts, last_files = held()
    assert last_artifacts >= again_artifacts and last_files >= again_files
    runs = _trial_runs(tmp_path / "results" / "tiny", run_id)
    assert len(runs) == 3  # the first run and one per time it grew, all under one id
    assert (
        runs[-1]["summary"]["fgsm/robust_error_at_0_1"]
        == runs[1]["summary"]["fgsm/robust_error_at_0_1"]
    )
