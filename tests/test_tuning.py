"""Ray Tune as its users know it: searches over YAML spaces, Optuna's Pareto front, schedulers
that stop trials early (recorded as stopped), and the checks that refuse a bad search up front."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import tiny_sweep
from wandb_reader import read_offline_run

from advlab import results
from advlab.cli import main
from advlab.report import build_report
from advlab.spec import SpecError
from advlab.store import SweepStore
from advlab.sweep import pareto_front
from advlab.sweepfile import parse_sweep
from advlab.track import TrialRun

FAST = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01}


def search_sweep(tmp_path: Path, **changes: Any) -> Path:
    raw = tiny_sweep(name="search", grid={}, model="fc16-10", train=dict(FAST))
    raw |= {"storage": str(tmp_path / "results"), "wandb": {"mode": "disabled"}}
    raw |= {"attacks": [{"name": "fgsm"}], "transfer": {"enabled": False}}
    raw |= changes
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_optuna_multi_objective_search_records_samples_and_its_pareto_front(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = {
        "algorithm": "optuna",
        "num_samples": 4,
        "metric": ["test_error", "fgsm/robust_error@0.1"],
        "mode": ["min", "min"],
        "space": {
            "train.lr": {"loguniform": [1e-3, 0.1]},
            "weight_decay": {"choice": [0.0, 1e-3]},
        },
    }
    path = search_sweep(tmp_path, search=search)
    assert main(["sweep", str(path)]) == 0
    res = results.load(str(tmp_path / "results" / "search"))
    assert len(res.trials) == 4 and (res.trials["status"] == "ok").all()
    lrs = res.trials["train.lr"]
    assert lrs.between(1e-3, 0.1).all() and lrs.nunique() == 4  # sampled, log-uniformly
    assert set(res.trials["weight_decay"].map(tuple)) <= {(0.0,), (1e-3,)}
    assert all(label.startswith("lr=") for label in res.trials["label"])
    pareto = SweepStore(str(tmp_path / "results"), "search").read("pareto")
    values = pareto.pivot(index="trial_id", columns="metric", values="value")
    expected = set()
    for trial, row in values.iterrows():  # brute force: no other trial dominates it
        others = values.drop(index=trial)
        beaten = ((others <= row).all(axis=1) & (others < row).any(axis=1)).any()
        expected |= set() if beaten else {trial}
    assert set(pareto.loc[pareto["on_front"], "trial_id"]) == expected
    assert (
        values.loc[:, "test_error"].to_dict()
        == res.trials.set_index("trial_id")["test_error"].to_dict()
    )
    check_pareto_reading_and_report(res, pareto, expected, tmp_path, capsys.readouterr().out)
    # Asked again for the same search: nothing to do; for two more samples: two more only.
    assert main(["sweep", str(path)]) == 0
    assert len(results.load(str(tmp_path / "results" / "search")).trials) == 4
    raw = yaml.safe_load(path.read_text())
    raw["search"]["num_samples"] = 6
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    grown = results.load(str(tmp_path / "results" / "search"))
    assert len(grown.trials) == 6 and len(grown.manifest["versions"]) == 1


def check_pareto_reading_and_report(
    res: results.Results, pareto: pd.DataFrame, front: set[str], tmp_path: Path, out: str
) -> None:
    """The table carries labels, advlab.load reads it (long and wide), the summary lists only
    folders that exist, and the report plots every trial, labelled, with the front in red."""
    labels = res.trials.set_index("trial_id")["label"]
    assert pareto["label"].tolist() == labels.loc[pareto["trial_id"]].tolist()
    wide = res.objectives().set_index("trial_id")
    assert list(wide.columns) == ["label", "test_error", "fgsm/robust_error@0.1", "on_front"]
    assert set(wide.index[wide["on_front"]]) == front and len(wide) == 4
    assert (wide["label"] == labels.loc[wide.index]).all()
    robust = res.curves.query("attack == 'fgsm' and budget == 0.1").set_index("trial_id")
    assert wide["fgsm/robust_error@0.1"].to_dict() == robust["robust_error"].to_dict()
    assert set(res.pareto.columns) >= {"trial_id", "label", "metric", "mode", "value", "on_front"}
    (listed,) = [line for line in out.splitlines() if "parquet:" in line]
    folders = listed.split("{")[1].split("}")[0].split(",")
    assert "pareto" in folders and "transfer" not in folders  # transfer is off in this sweep
    assert all((tmp_path / "results" / "search" / f).is_dir() for f in folders)
    html = build_report([str(tmp_path / "results" / "search")], str(tmp_path / "r.html"))
    page = html.read_text(encoding="utf-8")
    assert '<section id="pareto">' in page
    found = re.findall(r'class="vl-spec" data-target="pareto-[^"]*">(.*?)</script>', page)
    (spec,) = [json.loads(s) for s in found]  # two objectives: one chart
    drawn = {d["trial_id"]: d for d in spec["data"]["values"]}
    assert set(drawn) == set(wide.index)
    for number, (trial, row) in enumerate(wide.iterrows(), start=1):  # each point: label, values
        assert drawn[trial]["label"] == row["label"]
        tag = f"{number}: {row['label']}" if row["on_front"] else str(number)
        assert drawn[trial]["tag"] == tag  # its number in the table; on the front, its label
        assert (drawn[trial]["x"], drawn[trial]["y"]) == (
            row["test_error"],
            row["fgsm/robust_error@0.1"],
        )
        assert drawn[trial]["front"] == ("on the front" if row["on_front"] else "dominated")
    assert f"{len(front)} of 4 trials on the front" in page


@pytest.mark.slow
def test_asha_stops_bad_trials_early_and_records_them_as_stopped(
    ray_local, tmp_path: Path, capsys
) -> None:
    path = search_sweep(
        tmp_path,
        # Good rates first, one at a time: ASHA compares a trial with those before it at the
        # same epoch, so the hopeless small rates then fall below the cut.
        grid={"train.lr": [0.01, 0.03, 1e-4, 1e-5]},
        train=FAST | {"epochs": 6},
        scheduler={"name": "asha", "metric": "test_error", "grace_period": 1},
        max_concurrent=1,
    )
    assert main(["sweep", str(path)]) == 0  # stopping early is no failure
    out = capsys.readouterr().out
    trials = results.load(str(tmp_path / "results" / "search")).trials.set_index("train.lr")
    stopped = trials[trials["status"] == "stopped"]
    assert {1e-4, 1e-5} <= set(stopped.index) and "stopped early" in out
    assert stopped["reason"].str.startswith("stopped early by asha after epoch").all()
    assert (trials.loc[[1e-4, 1e-5], "reason"].str.contains("after epoch 1 ")).all()
    assert (trials.loc[[0.01, 0.03], "status"] == "ok").any()  # the best one ran to the end
    epochs = results.load(str(tmp_path / "results" / "search")).epochs
    ran = epochs.groupby("trial_id")["epoch"].max()
    assert (ran[stopped["trial_id"]] < 6).all()  # they really stopped before the end
    assert stopped["test_error"].isna().all()  # no clean evaluation for a stopped trial
    # `advlab ls` counts the stopped trials, so its counts add up to the trials.
    capsys.readouterr()
    assert main(["ls", str(tmp_path / "results")]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    counts = dict(zip(header.split()[1:], map(int, row.split()[1:]), strict=True))
    assert counts["trials"] == 4 and counts["stopped"] == len(stopped)
    assert counts["ok"] + counts["failed"] + counts["stopped"] + counts["missing"] == 4


def test_pareto_front_known_answer() -> None:
    points = {"a": [0.1, 0.9], "b": [0.2, 0.5], "c": [0.3, 0.6], "d": [0.5, 0.1], "e": [0.5, 0.2]}
    assert pareto_front(points, ["min", "min"]) == {"a", "b", "d"}
    assert pareto_front(points, ["max", "max"]) == {"a", "c", "e"}
    assert pareto_front(points, ["min", "max"]) == {"a"}
    # Brute force over every subset: each front member is dominated by no one.
    for size in range(1, 6):
        for keys in itertools.combinations(points, size):
            front = pareto_front({k: points[k] for k in keys}, ["min", "min"])
            assert front and all(k in keys for k in front)


def _random(space: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"search": {"algorithm": "random", "space": space, **more}}


def _optuna(metric: str | None, **more: Any) -> dict[str, Any]:
    search = {"algorithm": "optuna", "space": {"train.lr": {"uniform": [0.1, 1]}}}
    return {"search": search | ({"metric": metric} if metric else {})} | more


BAD_SEARCHES: list[tuple[str, dict[str, Any], str]] = [
    (
        "space-without-algorithm",
        {"search": {"space": {"train.lr": {"uniform": [0, 1]}}}},
        "grid takes no space",
    ),
    ("unknown-distribution", _random({"train.lr": {"normal": [0, 1]}}), "give one of uniform"),
    ("bounds-reversed", _random({"train.lr": {"uniform": [1, 0]}}), "low < high"),
    ("log-of-zero", _random({"train.lr": {"loguniform": [0, 1]}}), "low > 0"),
    ("bound-invalid-trial", _random({"train.lr": {"uniform": [-1, 1]}}), "train.lr"),
    ("space-key-unknown", _random({"train.lrr": {"uniform": [0.1, 1]}}), "train.lrr"),
    ("optuna-without-metric", _optuna(None), "needs the metric"),
    ("metric-not-produced", _optuna("pgd/robust_error@0.1"), "no trial reports 'pgd/robust"),
    ("optuna-with-grid", _optuna("test_error", grid={"seed": [0, 1]}), "move grid axes"),
    (
        "scheduler-metric-final-only",
        {"scheduler": {"name": "asha", "metric": "fgsm/success@0.1"}},
        "not reported every epoch",
    ),
    (
        "scheduler-on-validation-without-it",
        {"scheduler": {"name": "asha", "metric": "val_robust_error"}},
        "val_robust_error needs train.validation",
    ),
    (
        "scheduler-without-every-epoch-eval",
        {"scheduler": {"name": "asha"}, "train": FAST | {"eval_every": 2}},
        "eval_every: 1",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"), [c[1:] for c in BAD_SEARCHES], ids=[c[0] for c in BAD_SEARCHES]
)
def test_bad_searches_are_refused_before_ray(change: dict, expected: str, tmp_path: Path) -> None:
    raw = yaml.safe_load(search_sweep(tmp_path, **change).read_text())
    with pytest.raises(SpecError) as info:
        parse_sweep(raw)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_an_address_nobody_answers_is_exit_2_in_seconds(tmp_path: Path, capsys) -> None:
    path = search_sweep(tmp_path)
    assert main(["sweep", str(path), "--address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--address: nothing answers at 127.0.0.1:9" in err
    assert not (tmp_path / "results").exists()


def test_offline_runs_reach_remote_storage(tmp_path: Path) -> None:
    """With remote storage W&B writes to a local staging folder; sync_wandb copies it up.
    (A SubTreeFileSystem over another folder stands in for an object store.)"""
    import pyarrow.fs as pafs

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    store = SweepStore(str(tmp_path / "unused"), "s")
    store.fs = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    store.root, store.uri = "s", "mock-bucket://s"
    assert store.is_remote and not store.wandb_dir().startswith(str(bucket))
    run = TrialRun(
        mode="offline", project="p", entity=None, group="s", run_id="s-abc", name="abc",
        config={"a": 1}, directory=store.wandb_dir(),
    )  # fmt: skip
    run.log_summary({"test_error": 0.25})
    run.finish()
    store.sync_wandb()
    uploaded = list((bucket / "s" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(uploaded) == 1
    logged = read_offline_run(uploaded[0].parent)
    assert logged["run"]["id"] == "s-abc" and logged["summary"]["test_error"] == 0.25


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "emptied"])
def test_a_garbage_optuna_db_is_moved_aside_and_the_study_rebuilt(
    damage: str, ray_local, tmp_path: Path, capsys
) -> None:
    import optuna

    search = {
        "algorithm": "optuna", "num_samples": 2, "metric": "test_error",
        "space": {"train.lr": {"loguniform": [1e-3, 0.1]}, "seed": {"int": [0, 9]}},
    }  # fmt: skip
    path = search_sweep(tmp_path, search=search)
    assert main(["sweep", str(path)]) == 0
    db = tmp_path / "results" / "search" / "optuna.db"
    # garbage, or emptied by a full disk (SQLite opens an empty file as a new database)
    db.write_bytes(b"not a database, " * 64 if damage == "garbage" else b"")
    raw = yaml.safe_load(path.read_text())
    raw["search"]["num_samples"] = 3
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    err = capsys.readouterr().err
    if damage == "garbage":
        assert "optuna.db is damaged (" in err
        assert "moved to damaged/, the study is rebuilt from 2 finished samples" in err
        assert list((tmp_path / "results" / "search" / "damaged").glob("optuna.db.*"))
    else:
        assert "optuna.db holds no study 'search'; rebuilt it from 2 finished samples" in err
    res = results.load(str(tmp_path / "results" / "search"))
    assert len(res.trials) == 3 and (res.trials["status"] == "ok").all()
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3  # the two rebuilt and the new one
    errors = sorted(res.trials["test_error"])
    assert sorted(t.value for t in done) == pytest.approx(errors)


def test_progress_prints_epochs_inside_trials_and_an_eta_from_work_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from advlab.sweep import Plan, trial_configs
    from advlab.tuning import progress_callback

    spec = parse_sweep(tiny_sweep(train=FAST | {"epochs": 4}))  # two trials of 4 epochs
    configs = trial_configs(spec, str(tmp_path), "disabled", {})
    plan = Plan(configs)
    assert (plan.total, plan.epochs) == (2, 8)
    moment = [0.0]
    progress = progress_callback(plan.total, plan.epochs, clock=lambda: moment[0], every=10)
    a, b = (SimpleNamespace(config={"trial": c}, trial_id=c["id"]) for c in configs)

    def result(at: float, trial: Any, epoch: int) -> None:
        moment[0] = at
        progress.on_trial_result(0, [], trial, {"epoch": epoch, "test_error": 0.25})

    result(5, a, 1)  # printed (the first line); 1 of 8 epochs in 5 s
    result(8, b, 1)  # within 10 s of the last line: quiet, but its epoch counts
    result(20, a, 2)  # printed; 3 of 8 epochs in 20 s
    result(30, a, 4)  # the trial's last epoch is always printed
    a.last_result = {"failed": 0}
    moment[0] = 40
    progress.on_trial_complete(0, [], a)  # a's 4 epochs count whole
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "advlab:   fc10: epoch 1/4, test error 25.0%; 5 s elapsed, 1/8 epochs, ETA 35 s",
        "advlab:   fc10: epoch 2/4, test error 25.0%; 20 s elapsed, 3/8 epochs, ETA 33 s",
        "advlab:   fc10: epoch 4/4, test error 25.0%; attack runs next; 30 s elapsed, 5/8 "
        "epochs, ETA 18 s",
        "advlab: [1/2] fc10 ok; 0 failed; 40 s elapsed, 5/8 epochs, ETA 24 s",
    ]
    # Before 5% of the planned epochs are done (start-up dominates), no ETA is guessed.
    early = progress_callback(plan.total, 40 * plan.epochs, clock=lambda: moment[0])
    early.on_trial_result(0, [], b, {"epoch": 1, "test_error": math.nan})
    assert capsys.readouterr().out == "advlab:   fc16-10: epoch 1/4; 0 s elapsed, 1/320 epochs\n"


def test_progress_says_which_attack_run_of_how_many_a_trial_is_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from advlab.sweep import Plan, trial_configs
    from advlab.tuning import progress_callback

    spec = parse_sweep(tiny_sweep(train=FAST | {"epochs": 4}))
    configs = trial_configs(spec, str(tmp_path), "disabled", {})
    assert [c["attack_progress"] for c in configs] == [True, True]
    moment = [0.0]
    progress = progress_callback(2, Plan(configs).epochs, clock=lambda: moment[0], every=10)
    a = SimpleNamespace(config={"trial": configs[0]}, trial_id=configs[0]["id"])
    progress.on_trial_result(0, [], a, {"epoch": 4, "test_error": 0.5})
    for at, run, attack in [(12, 1, "fgsm"), (14, 2, "lbfgs")]:
        moment[0] = at
        progress.on_trial_result(0, [], a, {"attack_run": run, "attack_runs": 2, "attack": attack})
    assert capsys.readouterr().out.splitlines()[1:] == [
        "advlab:   fc10: attack run 1/2 (fgsm); 12 s elapsed, 4/8 epochs, ETA 12 s",
    ]  # the second within 10 s of the last line: quiet
    # A scheduler counts reports as epochs and Optuna reads each one's metric: no attack runs.
    asha = parse_sweep(tiny_sweep(scheduler={"name": "asha"}))
    assert not trial_configs(asha, str(tmp_path), "disabled", {})[0]["attack_progress"]


@pytest.mark.parametrize("flag, in_file, expected", [(1, None, 1), (None, 2, 2), (None, None, 0)])
def test_the_grid_generator_carries_the_trials_at_once_limit(
    flag: int | None, in_file: int | None, expected: int, tmp_path: Path
) -> None:
    # Tune ignores max_concurrent_trials when the search is a generator (only a warning said
    # so): `--max-concurrent 1` ran two trials at once until the generator got the limit.
    from advlab.tuning import search_algorithm

    path = search_sweep(tmp_path, grid={"seed": [0, 1, 2]}, max_concurrent=in_file)
    spec = parse_sweep(yaml.safe_load(path.read_text()), tmp_path)
    store = SweepStore(str(tmp_path / "results"), spec.name)
    generator = search_algorithm(spec, store, [], 0, flag)
    assert generator.max_concurrent == expected
