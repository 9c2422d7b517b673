"""One trial without Ray: the training cache and what a trial writes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_sweep

from advlab.spec import parse_sweep
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.trial import run_trial


def test_trials_differing_only_in_budgets_train_once(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="budgets", grid={"eps": [[0.05], [0.1, 0.2]]}))
    assert len({t.training_key() for t in spec.trials}) == 1
    rows = [
        run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled")).row
        for i, trial in enumerate(spec.trials)
    ]
    assert [r["trained_here"] for r in rows] == [True, False]
    store = SweepStore(str(tmp_path), "budgets")
    epochs = store.read("epochs")
    # Both trials report the one training run's history.
    first, second = (epochs[epochs["trial_id"] == r["trial_id"]] for r in rows)
    assert first["loss"].tolist() == second["loss"].tolist()
    assert rows[0]["test_error"] == rows[1]["test_error"]
    curves = store.read("curves")
    assert sorted(curves.loc[curves["attack"] == "fgsm", "budget"]) == [0.05, 0.1, 0.2]


def test_a_different_seed_trains_a_different_model(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="seeds", grid={"seed": [0, 1]}))
    keys = {t.training_key() for t in spec.trials}
    assert len(keys) == 2
    rows = [
        run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled")).row
        for i, trial in enumerate(spec.trials)
    ]
    assert all(r["trained_here"] for r in rows)
    assert len(list((tmp_path / "seeds" / "models").glob("*.pt"))) == 2


def test_every_attack_runs_in_a_trial_and_scores_its_budgets(tmp_path: Path) -> None:
    attacks = [
        {"name": "fgsm"},
        {"name": "pgd", "steps": 5},
        {"name": "pgd", "label": "pgd_l2", "norm": "l2", "eps": [0.5, 1.0]},
        {"name": "noise", "eps": [0.1]},
        {"name": "lbfgs", "max_iter": 20, "search_steps": 6},
        {"name": "deepfool"},
        {"name": "cw", "steps": 100, "search_steps": 6},
    ]
    spec = parse_sweep(tiny_sweep(name="attacks", grid={"seed": [0]}, attacks=attacks))
    result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
    curves = SweepStore(str(tmp_path), "attacks").read("curves")
    norms = dict(zip(curves["attack"], curves["norm"], strict=False))
    assert norms == {
        "fgsm": "linf",
        "pgd": "linf",
        "pgd_l2": "l2",
        "noise": "stddev",
        "lbfgs": "rms",
        "deepfool": "rms",
        "cw": "rms",
    }
    examples = SweepStore(str(tmp_path), "attacks").read("examples")
    l2 = examples[examples["attack"] == "pgd_l2"]
    assert (l2["dist_l2"] <= l2["budget"] + 1e-5).all()
    # PGD is at least as strong as FGSM at the same budget, on the same examples.
    assert result.metrics["pgd/success@0.1"] >= result.metrics["fgsm/success@0.1"]
    summary = SweepStore(str(tmp_path), "attacks").read("attacks").set_index("attack")
    for name in ("lbfgs", "deepfool", "cw"):
        assert summary.loc[name, "success_rate"] > 0.9
        assert summary.loc[name, "kind"] == "minimization"
        assert pd.isna(summary.loc[name, "budget"])
        assert (examples.loc[examples["attack"] == name, "budget"].isna()).all()
    # The attacks table's numbers are the examples table's, aggregated.
    lbfgs = examples[examples["attack"] == "lbfgs"]
    assert summary.loc["lbfgs", "mean_dist_rms"] == pytest.approx(
        lbfgs.loc[lbfgs["success"], "dist_rms"].mean()
    )
    assert summary.loc["lbfgs", "median_dist_l2"] == pytest.approx(
        lbfgs.loc[lbfgs["success"], "dist_l2"].median()
    )
    assert json.loads(summary.loc["lbfgs", "settings"]) == {
        "loss": "ce",
        "max_iter": 20,
        "search_steps": 6,
        "candidates": None,
        "max_evals": None,
    }
    fixed = summary.loc[["fgsm", "pgd", "pgd_l2", "noise"], "kind"]
    assert (fixed == "fixed_budget").all()
    targets = examples.loc[examples["attack"] == "deepfool", "target"]
    assert (targets == -1).all()  # untargeted by default; lbfgs draws random targets
    assert (examples.loc[examples["attack"] == "lbfgs", "target"] >= 0).all()
