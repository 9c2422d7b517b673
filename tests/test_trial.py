"""One trial without Ray: the training cache and what a trial writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_sweep

from advlab.data import load_dataset
from advlab.measure import fraction
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.trial import run_trial


def test_trials_differing_only_in_evaluation_train_once(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="budgets", grid={"attack_examples": [6, 12]}))
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
    assert sorted(curves.loc[curves["attack"] == "fgsm", "n"]) == [6, 6, 12, 12]
    # Rates are stored as the exact fractions they are: k / n in float64, never float32's
    # rounding of it (2 of 25 is 0.08, not 0.07999999821).
    n_test = len(load_dataset("digits").y_test)
    for rate, n in [
        (rows[0]["test_error"], n_test),
        *zip(curves["success_rate"], curves["n"], strict=True),
    ]:
        assert rate == round(rate * n) / n
    attacks = store.read("attacks")
    for rate, n in zip(attacks["success_rate"], attacks["n"], strict=True):
        assert rate == round(rate * n) / n


def test_fraction_is_count_over_n_exactly() -> None:
    import torch

    mask = torch.zeros(25, dtype=torch.bool)
    mask[:2] = True
    assert fraction(mask) == 0.08 != float(mask.float().mean())  # float32: 0.07999999821
    assert fraction(torch.ones(3, dtype=torch.bool)) == 1.0
    assert math.isnan(fraction(torch.zeros(0, dtype=torch.bool)))


def test_a_different_seed_trains_a_different_model(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="seeds", grid={"seed": [0, 1]}))
    keys = {t.training_key() for t in spec.trials}
    assert len(keys) == 2
    rows = [
        run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled")).row
        for i, trial in enumerate(spec.trials)
    ]
    assert all(r["trained_here"] for r in rows)
    assert len(list((tmp_path / ".models").glob("*.pt"))) == 2


def test_every_attack_runs_in_a_trial_and_scores_its_budgets(tmp_path: Path) -> None:
    from attack_cases import advlab_attacks

    from advlab.attacks import registry

    # Every attack advlab registers, with small settings; an attack added to the registry
    # without an entry here fails the first assertion.
    small: dict[str, list[dict]] = {
        "fgsm": [{}],
        "pgd": [{"steps": 5}, {"label": "pgd_l2", "norm": "l2", "eps": [0.5, 1.0]}],
        "noise": [{"eps": [0.1]}],
        "lbfgs": [
            {"max_iter": 20, "search_steps": 6},
            {"label": "lbfgs_from_alma", "loss": "margin", "max_iter": 8, "start": "alma",
             "start_settings": {"steps": 20, "lr_init": 1.0}},
        ],
        "deepfool": [{}],
        "cw": [{"steps": 100, "search_steps": 6}],
        "ddn": [{"steps": 40}],
        "alma": [{"steps": 60}],
        "fmn": [{"steps": 40}],
        "fmn_linf": [{"steps": 40}],
        "hsj": [{"max_queries": 1000, "starts": 1}],
        "hsj_linf": [{"max_queries": 1000, "starts": 1}],
    }  # fmt: skip
    assert set(small) == advlab_attacks()
    attacks = [{"name": name, **settings} for name, runs in small.items() for settings in runs]
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
        "ddn": "rms",
        "alma": "rms",
        "fmn": "rms",
        "fmn_linf": "linf",
        "hsj": "rms",
        "hsj_linf": "linf",
        "lbfgs_from_alma": "rms",
    }
    examples = SweepStore(str(tmp_path), "attacks").read("examples")
    l2 = examples[examples["attack"] == "pgd_l2"]
    assert (l2["dist_l2"] <= l2["budget"] + 1e-5).all()
    # PGD is at least as strong as FGSM at the same budget, on the same examples.
    assert result.metrics["pgd/success@0.1"] >= result.metrics["fgsm/success@0.1"]
    summary = SweepStore(str(tmp_path), "attacks").read("attacks").set_index("attack")
    minimisation = [k for k, kind in summary["kind"].items() if kind == "minimization"]
    assert set(minimisation) == {
        "lbfgs", "deepfool", "cw", "ddn", "alma", "fmn", "fmn_linf", "lbfgs_from_alma", "hsj",
        "hsj_linf",
    }  # fmt: skip
    for name in minimisation:
        assert summary.loc[name, "success_rate"] > 0.9, name
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
    # The recorded settings: every knob of the attack, the given ones as given.
    defaults = registry.get("lbfgs").settings().model_dump(mode="json")
    recorded = json.loads(summary.loc["lbfgs", "settings"])
    assert recorded == defaults | {"max_iter": 20, "search_steps": 6}
    assert {k: recorded[k] for k in ("loss", "candidates", "max_evals", "start")} == {
        "loss": "ce", "candidates": None, "max_evals": None, "start": None
    }  # fmt: skip
    assert recorded["start_settings"] == {} and recorded["history"] is None
    # The started search's settings reach its row as given, and its evaluations include the
    # start attack's 20 steps per example.
    started = json.loads(summary.loc["lbfgs_from_alma", "settings"])
    assert (started["start"], started["start_settings"]) == ("alma", {"steps": 20, "lr_init": 1.0})
    from_alma = examples[examples["attack"] == "lbfgs_from_alma"]
    assert (from_alma["grad_evals"] > 20).all()
    fixed = summary.loc[["fgsm", "pgd", "pgd_l2", "noise"], "kind"]
    assert (fixed == "fixed_budget").all()
    targets = examples.loc[examples["attack"] == "deepfool", "target"]
    assert (targets == -1).all()  # untargeted by default; lbfgs draws random targets
    assert (examples.loc[examples["attack"] == "lbfgs", "target"] >= 0).all()


def test_an_added_attack_runs_alone_and_leaves_the_trials_files_untouched(tmp_path: Path) -> None:
    first = parse_sweep(tiny_sweep(name="grow", grid={"seed": [0]}))
    run_trial(first.trials[0], trial_context(first, 0, str(tmp_path), "disabled"))
    folder = tmp_path / "grow"
    before = {p: p.read_bytes() for p in folder.rglob("*.parquet")}
    attacks = [*tiny_sweep()["attacks"], {"name": "pgd", "steps": 5}]
    second = parse_sweep(tiny_sweep(name="grow", grid={"seed": [0]}, attacks=attacks))
    assert second.ids == first.ids  # the same trial, with one more attack
    result = run_trial(second.trials[0], trial_context(second, 0, str(tmp_path), "disabled"))
    trial_id = first.ids[0]
    # The masking and health checks read the trial's attack runs, so they alone run again (the
    # masking verdict needs PGD, which the trial now has); every other file keeps its bytes.
    rerun = {
        folder / table / f"{trial_id}.measure.{measure}.parquet"
        for measure in ("masking", "health")
        for table in (measure, "measures")
    }
    assert {p: p.read_bytes() for p in before if p not in rerun} == {
        p: b for p, b in before.items() if p not in rerun
    }
    assert all(p.read_bytes() != before[p] for p in rerun)
    added = sorted(p.relative_to(folder) for p in folder.rglob("*.parquet") if p not in before)
    assert [str(p) for p in added] == [
        f"{t}/{trial_id}.pgd.parquet" for t in ("attacks", "curves", "examples")
    ]
    verdict = SweepStore(str(tmp_path), "grow").read("masking")["flagged"]
    assert verdict.notna().all()  # before: no PGD, no verdict
    assert result.row["trained_here"] is True  # the row of the first run, not rewritten
    assert "pgd/success@0.1" in result.metrics and "fgsm/success@0.1" in result.metrics


def test_a_broken_attack_costs_that_attack_only(tmp_path: Path) -> None:
    attacks = [{"name": "fgsm"}, {"name": "pgd", "steps": 5, "step_size": 1e-3}]
    spec = parse_sweep(tiny_sweep(name="broken", grid={"seed": [0]}, attacks=attacks))

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory on the device")

    import advlab.attacks.registry as registry

    pgd = registry.get("pgd")
    original = pgd.run
    object.__setattr__(pgd, "run", explode)
    try:
        result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
    finally:
        object.__setattr__(pgd, "run", original)
    attacks_table = SweepStore(str(tmp_path), "broken").read("attacks").set_index("attack")
    assert result.row["status"] == "ok"
    assert attacks_table.loc["pgd", "status"] == "failed"
    assert attacks_table.loc["pgd", "reason"] == "RuntimeError: out of memory on the device"
    assert (attacks_table.loc["fgsm", "status"] == "ok").all()


def test_a_trial_reports_each_attack_run_as_it_starts(tmp_path: Path) -> None:
    attacks = [{"name": "fgsm"}, {"name": "fgsm", "label": "fgsm_big", "eps": [0.3]}]
    raw = tiny_sweep(name="reports", grid={"model": ["fc10"]}, measures=[], attacks=attacks)
    spec = parse_sweep(raw)
    seen: list[dict] = []
    run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"),
              report=lambda metrics, _: seen.append(metrics))  # fmt: skip
    assert [m["epoch"] for m in seen[:3]] == [1, 2, 3]
    assert seen[3:] == [
        {"attack_run": 1, "attack_runs": 2, "attack": "fgsm"},
        {"attack_run": 2, "attack_runs": 2, "attack": "fgsm_big"},
    ]
