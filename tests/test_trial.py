"""One trial without Ray: the training cache and what a trial writes."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_sweep

from advlab.spec import parse_sweep
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.trial import run_trial


def test_trials_differing_only_in_budgets_train_once(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="budgets", grid={"eps": [[0.05], [0.1, 0.2]]}))
    assert len({t.training_key() for t in spec.trials}) == 1
    rows = [
        run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled"))
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
        run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled"))
        for i, trial in enumerate(spec.trials)
    ]
    assert all(r["trained_here"] for r in rows)
    assert len(list((tmp_path / "seeds" / "models").glob("*.pt"))) == 2
