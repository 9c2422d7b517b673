"""Results as a dataset: every table folder reads the same in pandas, polars and DuckDB, the
loader gives typed joined frames in grid order, and sweeps grow without touching finished work."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
import yaml
from conftest import tiny_sweep

from advlab import results
from advlab.cli import main
from advlab.manifest import record_version
from advlab.stats import METHOD, RATE_METHOD, estimate
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.tables import SCHEMAS, schema
from advlab.trial import TrialContext, run_trial

SORT_KEYS = {
    "trials": ["trial_id"],
    "epochs": ["trial_id", "epoch"],
    "attacks": ["trial_id", "attack", "budget"],
    "curves": ["trial_id", "attack", "budget"],
    "examples": ["trial_id", "attack", "budget", "example"],
    "measures": ["trial_id", "measure"],
    "lipschitz": ["trial_id", "layer"],  # measure tables are parquet folders like the rest
    "masking": ["trial_id"],
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Any]:
    """Three trials without Ray: scalar and per-layer weight decay, and one that diverges."""
    storage = tmp_path_factory.mktemp("mixed")
    raw = tiny_sweep(name="mixed", grid={})
    raw["cases"] = [
        {"model": "fc10", "weight_decay": 1.0e-4},
        {"model": "fc16-10", "weight_decay": [1.0e-4, 1.0e-5]},
        {"model": "fc10", "train.optimizer": "sgd", "train.lr": 1.0e6},  # diverges: fails
    ]
    spec = parse_sweep(raw)
    store = SweepStore(str(storage), "mixed")
    store.write_manifest(record_version(None, spec))
    for index, trial in enumerate(spec.trials):
        with contextlib.suppress(FloatingPointError):  # recorded as a failed row
            run_trial(trial, trial_context(spec, index, str(storage), "disabled"))
    return storage / "mixed", spec


def _python(value: Any) -> Any:
    """One engine-independent form of a cell: lists as lists, NaN and NA as None."""
    if isinstance(value, np.ndarray | list | pl.Series):
        return [_python(v) for v in list(value)]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _rows(frame: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    records = [{k: _python(v) for k, v in row.items()} for row in frame.to_dict("records")]
    return sorted(records, key=lambda r: [str(r[k]) for k in keys])


@pytest.mark.parametrize("table", list(SORT_KEYS))
def test_each_table_reads_the_same_in_pandas_polars_and_duckdb(mixed, table: str) -> None:
    folder, _ = mixed
    path = folder / table
    with_pandas = pd.read_parquet(path)  # the folder as it is, no options
    with_polars = pl.read_parquet(f"{path}/*.parquet")
    with_duckdb = duckdb.sql(f"SELECT * FROM '{path}/*.parquet'")
    names = schema(table).names
    assert list(with_pandas.columns) == list(with_polars.columns) == with_duckdb.columns == names
    keys = SORT_KEYS[table]
    expected = _rows(with_pandas, keys)
    assert _rows(with_polars.to_pandas(), keys) == expected
    assert _rows(with_duckdb.df(), keys) == expected
    # Each engine types each column as declared.
    polars_types = dict(zip(with_polars.columns, with_polars.dtypes, strict=True))
    duckdb_types = dict(zip(with_duckdb.columns, with_duckdb.types, strict=True))
    for field in schema(table):
        assert str(duckdb_types[field.name]) == _duckdb_type(field.type), field.name
        assert polars_types[field.name] == _polars_type(field.type), field.name


def _duckdb_type(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return f"{_duckdb_type(kind.value_type)}[]"
    names = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE"}
    return names.get(kind) or {pa.bool_(): "BOOLEAN", pa.float32(): "FLOAT"}[kind]


def _polars_type(kind: pa.DataType) -> pl.DataType:
    if pa.types.is_list(kind):
        return pl.List(_polars_type(kind.value_type))
    return {
        pa.string(): pl.String(),
        pa.int64(): pl.Int64(),
        pa.float64(): pl.Float64(),
        pa.bool_(): pl.Boolean(),
        pa.float32(): pl.Float32(),
    }[kind]


def test_weight_decay_is_a_typed_list_and_a_failed_row_has_every_column(mixed) -> None:
    folder, _ = mixed
    trials = pl.read_parquet(f"{folder}/trials/*.parquet").sort("trial_index")
    assert trials["weight_decay"].to_list() == [[1e-4], [1e-4, 1e-5], [0.0]]
    failed = trials.filter(pl.col("status") == "failed")
    assert failed.height == 1
    assert re.match(
        "FloatingPointError: training (diverged|loss is (nan|inf))", failed["reason"].item()
    )
    assert failed["test_error"].item() is None and failed["n_attacked"].item() is None
    assert failed["model"].item() == "fc10" and failed["train.lr"].item() == 1.0e6


def test_loader_gives_labelled_typed_frames_in_grid_order(mixed) -> None:
    folder, spec = mixed
    res = results.load(str(folder))
    assert res.trials["trial_id"].tolist() == spec.ids
    assert res.trials["label"].tolist() == [spec.labels[t] for t in spec.ids]
    assert res.trials["n_attacked"].dtype == pd.Int64Dtype()  # null stays null, not NaN
    ok = res.trials[res.trials["status"] == "ok"]
    assert res.attacks["trial_id"].isin(ok["trial_id"]).all()
    # Every row of the other tables carries its trial's label and grid values.
    labelled = res.attacks.merge(res.trials[["trial_id", "label", "model"]], on="trial_id")
    assert (labelled["label_x"] == labelled["label_y"]).all()
    assert (labelled["model_x"] == labelled["model_y"]).all()
    lbfgs = res.attacks[res.attacks["attack"] == "lbfgs"]
    assert lbfgs["kind"].eq("minimization").all() and lbfgs["budget"].isna().all()
    examples = res.examples()
    assert "x_adv" not in examples and len(examples) == 2 * 12 * 3
    assert res.examples(images=True)["x_adv"].map(len).eq(64).all()


def test_older_files_missing_a_column_read_as_null(mixed, tmp_path: Path) -> None:
    folder, _ = mixed
    old = SweepStore(str(tmp_path), "old")
    frame = pd.read_parquet(folder / "curves")
    for trial_id, rows in frame.drop(columns=["norm"]).groupby("trial_id"):  # a file each
        old.write_table("curves", trial_id, pa.Table.from_pandas(rows, preserve_index=False))
    got = old.read("curves")
    assert list(got.columns) == SCHEMAS["curves"].names
    assert got["norm"].isna().all() and len(got) == len(frame)


def test_fresh_retrains_instead_of_reusing_the_cached_model(tmp_path: Path) -> None:
    spec = parse_sweep(tiny_sweep(name="fresh", grid={"seed": [0]}))
    trial = spec.trials[0]
    first = run_trial(trial, TrialContext(sweep="fresh", storage=str(tmp_path)))
    again = run_trial(trial, TrialContext(sweep="fresh", storage=str(tmp_path), run_stamp="r2"))
    assert first.row["trained_here"] and again.row["trained_here"]
    saved = SweepStore(str(tmp_path), "fresh").load_model(trial.training_key())
    assert saved is not None and saved["run"] == "r2"
    assert first.row["test_error"] == again.row["test_error"]  # same seed, same numbers


@pytest.mark.slow
def test_a_sweep_grows_by_its_new_trials_and_attacks_only(ray_local, tmp_path: Path) -> None:
    raw = tiny_sweep(name="grow", grid={"weight_decay": [1.0e-4]}, model="fc10")
    raw |= {"storage": str(tmp_path / "results"), "transfer": {"enabled": False}}
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    folder = tmp_path / "results" / "grow"
    files = folder.parent.rglob("*")  # the sweep's folder and its storage root's models
    before = {p: p.read_bytes() for p in files if p.is_file() and "ray" not in p.parts}
    before = {p: b for p, b in before.items() if p.suffix in (".parquet", ".pt")}
    raw["grid"]["weight_decay"].append(1.0e-3)
    raw["attacks"] = [*raw["attacks"], {"name": "pgd", "steps": 5}]
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    # Every finished file keeps its bytes, but for the masking and health checks' (their
    # verdicts read the trial's attack runs, so the added attack reruns them).
    rerun = {p for p in before if p.name.endswith((".measure.masking.parquet",
                                                   ".measure.health.parquet"))}  # fmt: skip
    assert len(rerun) == 4  # their rows and their records
    assert {p: p.read_bytes() for p in before if p not in rerun} == {
        p: b for p, b in before.items() if p not in rerun
    }
    res = results.load(str(folder))
    assert res.trials["label"].tolist() == ["wd=0.0001", "wd=0.001"]
    assert [len(v["trial_ids"]) for v in res.manifest["versions"]] == [1, 2]
    old, new = res.trials["trial_id"]
    runs = res.attacks.groupby("trial_id")["attack"].apply(set)
    assert runs[old] == runs[new] == {"fgsm", "lbfgs", "pgd"}
    assert res.trials.set_index("trial_id")["trained_here"].to_dict() == {old: True, new: True}
    epochs = res.epochs.groupby("trial_id").size()
    assert epochs[old] == epochs[new] == 3


def test_ls_lists_sweeps_with_their_trial_counts(mixed, capsys) -> None:
    folder, _ = mixed
    assert main(["ls", str(folder.parent)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    columns = ["sweep", "versions", "trials", "ok", "failed", "stopped", "missing", "older"]
    assert header.split() == columns
    assert row.split() == ["mixed", "1", "3", "2", "1", "0", "0", "0"]


def test_sweeps_table_counts_stopped_trials_so_they_add_up() -> None:
    # The report's "Sweeps compared" table, as `advlab ls` above: ASHA stopped three of five
    # trials, one left no row; it said "1 ok, 0 failed, 1 no result" for five trials.
    from types import SimpleNamespace

    from advlab.report.sections.overview import _sweep_row

    status = ["ok", "stopped", "stopped", "stopped"]
    trials = pd.DataFrame({"trial_id": list("abcd"), "status": status, "dataset.name": "digits"})
    manifest = {"versions": [{"trial_ids": list("abcde")}]}
    run = SimpleNamespace(trials=trials, manifest=manifest, uri="/x/asha")
    cells = _sweep_row(run, "asha").cells  # type: ignore[arg-type]
    counts = {k: int(cells[k].text) for k in ("ok", "failed", "stopped", "missing")}
    assert counts == {"ok": 1, "failed": 0, "stopped": 3, "missing": 1}
    assert sum(counts.values()) == len(manifest["versions"][0]["trial_ids"])


def test_seeds_are_repeats_summarised_with_a_95_percent_interval(tmp_path: Path) -> None:
    raw = tiny_sweep(name="seeds", grid={"model": ["fc10", "fc16-10"], "seed": [0, 1, 2]})
    raw["attacks"] = [{"name": "fgsm"}]
    spec = parse_sweep(raw)
    store = SweepStore(str(tmp_path), "seeds")
    store.write_manifest(record_version(None, spec))
    for index, trial in enumerate(spec.trials):
        run_trial(trial, trial_context(spec, index, str(tmp_path), "disabled"))
    res = results.load(str(tmp_path / "seeds"))
    assert res.trials["configuration"].tolist() == ["fc10"] * 3 + ["fc16-10"] * 3
    assert res.trials["label"].tolist()[:2] == ["fc10 seed0", "fc10 seed1"]
    summary = res.over_seeds("trials", "test_error").set_index("configuration")
    for model in ("fc10", "fc16-10"):
        errors = res.trials.loc[res.trials["model"] == model, "test_error"].to_numpy(float)
        assert summary.loc[model, "n"] == 3
        assert summary.loc[model, "mean"] == pytest.approx(errors.mean())
        assert summary.loc[model, "values"] == pytest.approx(list(errors))  # seed 0, 1, 2
        # A test error is a rate over the test set (digits: ceil(0.25 x 1797) = 450 examples):
        # its interval is over seeds and examples (advlab.stats, whose tests check the method).
        lo, hi = summary.loc[model, "lo"], summary.loc[model, "hi"]
        assert summary.loc[model, "method"] == RATE_METHOD
        assert 0.0 <= lo < errors.mean() < hi <= 1.0
        assert (lo, hi) == (estimate(errors, [450] * 3).lo, estimate(errors, [450] * 3).hi)
    assert set(res.trials["n_test"]) == {450}
    curves = res.over_seeds("curves", "robust_error")
    assert len(curves) == 2 * 2  # two configurations x two budgets, one attack
    assert set(curves["n"]) == {3} and set(curves["method"]) == {RATE_METHOD}
    runs = res.over_seeds("attacks", "success_rate")  # over each run's n attacked examples
    assert len(runs) == 2 * 2 and set(runs["method"]) == {RATE_METHOD}
    assert set(res.over_seeds("attacks", "mean_dist_rms")["method"]) == {METHOD}
    clean = res.over_seeds("trials", "test_error", count="n_scanned")  # any count column
    assert (
        clean.loc[0, "hi"] == estimate(res.trials["test_error"][:3], res.trials["n_scanned"][:3]).hi
    )
