"""Transfer: the paper's Tables 2 and 4 over a real sweep, with controls and noise baselines."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_sweep
from wandb_reader import offline_run_dirs, read_offline_run

from advlab.cli import main
from advlab.data import load_dataset, select_subset
from advlab.store import SweepStore


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory) -> SweepStore:
    """Three trials, one of which diverges: transfer must carry on with the other two."""
    folder = tmp_path_factory.mktemp("transfer")
    raw = tiny_sweep(name="xfer", storage=str(folder), grid={})
    raw["cases"] = [
        {"model": "fc10"},
        {"model": "fc16-10"},
        {"model": "fc10", "train.optimizer": "sgd", "train.lr": 1.0e6},  # diverges: fails
    ]
    raw["weight_decay"] = 1.0e-4
    raw["transfer"] = {"controls": ["constant", "knn"], "amplify_rms": [0.1]}
    path = folder / "xfer.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 1  # one trial failed
    return SweepStore(str(folder), "xfer")


def test_failed_trial_is_left_out_and_recorded(swept: SweepStore) -> None:
    trials = swept.read("trials")
    failed = set(trials.loc[trials["status"] == "failed", "trial_id"])
    ok = set(trials.loc[trials["status"] == "ok", "trial_id"])
    assert len(failed) == 1 and len(ok) == 2
    record = swept.read_json("transfer.json")
    assert set(record["skipped"]) == failed
    assert record["skipped"][next(iter(failed))].startswith("failed: FloatingPointError")
    rows = swept.read("transfer")
    assert set(rows["source_trial"]) == ok
    assert set(rows.loc[rows["target_kind"] == "trial", "target"]) == ok


def test_every_source_meets_every_target(swept: SweepStore) -> None:
    rows = swept.read("transfer")
    adversarial = rows[rows["kind"] == "adversarial"]
    # 2 sources x (lbfgs + fgsm at 2 budgets) x (2 trial targets + 2 controls)
    assert len(adversarial) == 2 * 3 * 4
    assert set(rows["kind"]) == {"adversarial", "noise", "amplified"}
    amplified = rows[rows["kind"] == "amplified"]
    assert (amplified["amplified_to"] == 0.1).all()  # the rms aimed at, as a typed column
    assert rows.loc[rows["kind"] != "amplified", "amplified_to"].isna().all()


def test_diagonal_equals_the_source_attacks_success_rate(swept: SweepStore) -> None:
    rows = swept.read("transfer")
    examples = swept.read("examples")
    diagonal = rows[(rows["kind"] == "adversarial") & (rows["target"] == rows["source_trial"])]
    assert len(diagonal) == 2 * 3
    for row in diagonal.itertuples():
        mine = examples[
            (examples["trial_id"] == row.source_trial) & (examples["attack"] == row.attack)
        ]
        if row.attack == "fgsm":
            mine = mine[mine["budget"] == row.budget]
        assert row.n == len(mine) == 12
        assert row.error_adv == pytest.approx(mine["success"].mean())
        assert row.error_clean == 0.0  # attacked examples are the correctly classified ones


def test_a_constant_classifier_errs_exactly_on_the_other_labels(swept: SweepStore) -> None:
    rows = swept.read("transfer")
    examples = swept.read("examples")
    data = load_dataset("digits")
    train = data.y_train[select_subset(data, "fraction:0.5").train_idx].numpy()
    majority = np.bincount(train).argmax()  # what DummyClassifier(most_frequent) predicts
    constant = rows[(rows["target"] == "constant") & (rows["kind"] == "adversarial")]
    assert len(constant) == 2 * 3
    for row in constant.itertuples():
        mine = examples[
            (examples["trial_id"] == row.source_trial) & (examples["attack"] == row.attack)
        ]
        if row.attack == "fgsm":
            mine = mine[mine["budget"] == row.budget]
        expected = (mine["label"] != majority).mean()
        assert row.error_adv == expected
        assert row.error_clean == expected  # it ignores its input


def test_noise_rows_match_the_examples_distortion(swept: SweepStore) -> None:
    rows = swept.read("transfer")
    examples = swept.read("examples")
    for row in rows[(rows["kind"] == "noise") & (rows["target"] == "constant")].itertuples():
        mine = examples[
            (examples["trial_id"] == row.source_trial) & (examples["attack"] == row.attack)
        ]
        if row.attack == "fgsm":
            mine = mine[mine["budget"] == row.budget]
        # Each example's clipped noise has exactly its own adversarial rms.
        assert row.rms == pytest.approx(mine["dist_rms"].mean(), rel=1e-3)
    amplified = rows[(rows["kind"] == "amplified") & (rows["amplified_to"] == 0.1)]
    assert len(amplified)
    # Amplified only upward: each fooled example's rms becomes max(its own, 0.1).
    for row in amplified.itertuples():
        mine = examples[
            (examples["trial_id"] == row.source_trial) & (examples["attack"] == row.attack)
        ]
        if row.attack == "fgsm":
            mine = mine[mine["budget"] == row.budget]
        raised = np.maximum(mine.loc[mine["success"], "dist_rms"].to_numpy(), 0.1)
        assert row.rms == pytest.approx(raised.mean(), abs=2e-3)


def test_transfer_run_in_wandb_holds_the_table(swept: SweepStore) -> None:
    runs = [read_offline_run(d) for d in offline_run_dirs(swept.path())]
    (transfer,) = [r for r in runs if r["run"]["id"] == "xfer-transfer-v1"]
    assert transfer["run"]["group"] == "xfer"
    (table_file,) = [f for f in transfer["files"] if f.startswith("media/table/transfer_0")]
    folder = next(d for d in offline_run_dirs(swept.path()) if d.name.endswith("transfer-v1"))
    table = json.loads((folder / "files" / table_file).read_text())
    assert len(table["data"]) == len(swept.read("transfer"))
    labels = {row["source_label"] for row in _records(table)}
    assert labels == set(swept.read("trials").query("status == 'ok'")["label"])
    assert any(f.startswith("media/images/transfer_heatmap/lbfgs") for f in transfer["files"])
    assert any(f.startswith("media/table/transfer_matrix/lbfgs") for f in transfer["files"])


def _records(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


@pytest.mark.slow
def test_sampled_pairs_per_example_rows_and_resuming_a_cut_stage(
    ray_local, tmp_path, capsys, monkeypatch
) -> None:
    """pairs: sample over 4 trials: each source meets itself, one sampled trial and the
    control; per-example rows add up to the per-pair counts; a shard lost after the stage is
    the only one `advlab transfer` runs again, and the table comes back the same. W&B keeping
    only 50 rows of a table here, its run holds the pooled summary, not a truncated table."""
    monkeypatch.setattr("advlab.track.TABLE_ROWS", 50)
    import advlab
    from advlab.spec import TrialSpec
    from advlab.sweep_settings import TransferSpec
    from advlab.transfer import stale_reason
    from advlab.transfer_pairs import trial_targets

    raw = tiny_sweep(
        name="sampled", storage=str(tmp_path), grid={"model": ["fc10", "fc16-10"], "seed": [0, 1]}
    )
    raw |= {"eps": [0.1], "measures": []}
    raw["transfer"] = {
        "controls": ["constant"], "pairs": "sample", "sample": 1, "per_example": True,
        "amplify_rms": [0.1],
    }  # fmt: skip
    path = tmp_path / "sampled.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    store = SweepStore(str(tmp_path), "sampled")
    settings = TransferSpec.model_validate(raw["transfer"])
    trials = store.read("trials")
    specs = {
        t: TrialSpec.from_stored(s) for t, s in zip(trials["trial_id"], trials["spec"], strict=True)
    }
    rows = store.read("transfer")
    want = {(s, t) for s, ts in trial_targets(specs, settings).items() for t in ts}
    want |= {(s, "constant") for s in specs}
    assert set(zip(rows["source_trial"], rows["target"], strict=True)) == want
    assert len(want) == 4 * 3
    keys = ["source_trial", "attack", "budget", "kind", "amplified_to", "target"]
    per_example = store.read("transfer_examples")
    missing = {"budget": -1.0, "amplified_to": -1.0}  # NaN keys never compare equal
    counted = (
        per_example.fillna(missing)
        .assign(
            adv=lambda f: f["prediction_adv"] != f["label"],
            clean=lambda f: f["prediction_clean"] != f["label"],
        )
        .groupby(keys)
        .agg(size=("adv", "size"), adv=("adv", "sum"), clean=("clean", "sum"))
        .reset_index()
    )
    both = rows.fillna(missing).merge(counted, on=keys, how="left", validate="one_to_one")
    assert len(both) == len(rows) == 12 * 6  # fgsm@0.1 and lbfgs, each with noise, amplified
    assert (both["size"] == both["n"]).all() and (both["adv"] == both["errors_adv"]).all()
    assert (both["clean"] == both["errors_clean"]).all()
    assert (both["error_adv"] == both["errors_adv"] / both["n"]).all()
    loaded = advlab.load(store.path()).table("transfer_examples")
    assert len(loaded) == len(per_example) and loaded["source_label"].notna().all()

    assert stale_reason(store, settings) is None
    store.fs.delete_file(store.trial_files("transfer")[0])
    assert stale_reason(store, settings) == "shards of its table are missing"
    capsys.readouterr()
    assert main(["transfer", store.path()]) == 0
    out = capsys.readouterr().out
    assert f"(1 of {len(store.trial_files('transfer'))} shards run now)" in out
    again = store.read("transfer")
    order = [*keys, "target_kind"]
    pd.testing.assert_frame_equal(
        again.sort_values(order).reset_index(drop=True),
        rows.sort_values(order).reset_index(drop=True),
    )
    assert stale_reason(store, settings) is None
    runs = [read_offline_run(d) for d in offline_run_dirs(store.path())]
    (logged,) = [r for r in runs if r["run"]["id"] == "sampled-transfer-v1"]
    assert any(f.startswith("media/table/transfer_summary") for f in logged["files"])
    assert not any(f.startswith("media/table/transfer_0") for f in logged["files"])
    assert logged["summary"]["transfer/rows"] == 72
    assert "72 rows, over the 50 W&B keeps" in logged["summary"]["transfer/table"]
