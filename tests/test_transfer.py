"""Transfer: the paper's Tables 2 and 4 over a real sweep, with controls and noise baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_sweep

from advlab.cli import main
from advlab.data import load_dataset, select_subset
from advlab.store import SweepStore
from advlab.track import offline_run_dirs, read_offline_run
from advlab.transfer import amplify, gaussian_like


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory) -> SweepStore:
    """Three trials, one of which diverges: transfer must carry on with the other two."""
    folder = tmp_path_factory.mktemp("transfer")
    raw = tiny_sweep(name="xfer", storage=str(folder), grid={})
    raw["cases"] = [
        {"model": "fc10"},
        {"model": "fc16-10"},
        {"model": "fc10", "train.optimizer": "sgd", "train.lr": 1.0e30},  # overflows: fails
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
    assert set(rows["kind"]) == {"adversarial", "noise", "amplified@0.1"}


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
    amplified = rows[rows["kind"] == "amplified@0.1"]
    assert np.allclose(amplified["rms"], 0.1, atol=2e-3)


def test_transfer_run_in_wandb_holds_the_table(swept: SweepStore) -> None:
    runs = [read_offline_run(d) for d in offline_run_dirs(swept.local_path())]
    (transfer,) = [r for r in runs if r["run"]["id"] == "xfer-transfer"]
    assert transfer["run"]["group"] == "xfer"
    (table_file,) = [f for f in transfer["files"] if f.startswith("media/table/transfer_")]
    folder = next(d for d in offline_run_dirs(swept.local_path()) if d.name.endswith("transfer"))
    table = json.loads((folder / "files" / table_file).read_text())
    assert len(table["data"]) == len(swept.read("transfer"))
    assert any(f.startswith("media/images/transfer_matrix/lbfgs") for f in transfer["files"])


def test_amplify_reaches_the_requested_rms_inside_the_box() -> None:
    torch.manual_seed(0)
    clean = torch.rand(50, 64)
    adversarial = (clean + 0.02 * torch.randn(50, 64)).clamp(0, 1)
    for rms in (0.05, 0.1, 0.2):
        out = amplify(clean, adversarial, rms)
        assert out.min() >= 0 and out.max() <= 1
        achieved = (out - clean).pow(2).mean(1).sqrt()
        torch.testing.assert_close(achieved, torch.full((50,), rms), rtol=1e-4, atol=1e-5)
        if rms == 0.05:  # little clipping: the direction of each perturbation is kept
            cosine = torch.nn.functional.cosine_similarity(out - clean, adversarial - clean)
            assert (cosine > 0.95).all()


def test_amplify_saturates_when_the_box_forbids_the_rms() -> None:
    clean = torch.zeros(1, 4)
    adversarial = torch.tensor([[0.01, 0.0, 0.0, 0.0]])  # one pixel can move to 1 at most
    out = amplify(clean, adversarial, rms=0.9)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # rms 0.5, the most possible


def test_gaussian_noise_has_each_examples_stddev() -> None:
    clean = torch.full((2, 20000), 0.5)
    noisy = gaussian_like(clean, torch.tensor([0.05, 0.1]), torch.Generator().manual_seed(0))
    std = (noisy - clean).std(1)
    torch.testing.assert_close(std, torch.tensor([0.05, 0.1]), rtol=0.02, atol=0)
