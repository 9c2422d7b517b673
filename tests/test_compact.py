"""Compaction and the shared model store, on real trials written by run_trial (no Ray).

Compaction must leave every reader (advlab.load, pandas, polars and DuckDB on each table
folder as it is) with exactly the rows they saw before, survive a crash between its steps,
do nothing the second time, and let a sweep grow and rerun trials afterwards. The model store
is one per storage root: a second sweep under it loads its models and trains nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pytest
import yaml
from conftest import tiny_sweep

import advlab.trial
from advlab import compact, manifest, parts, results
from advlab.cli import main
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import load_sweep
from advlab.trial import run_trial

TABLES = ("trials", "epochs", "examples", "attacks", "curves", "measures", "health", "masking")


def _sweep(folder: Path, name: str, seeds: list[int]) -> Any:
    raw = tiny_sweep(name=name, storage=str(folder / "results"), grid={"seed": seeds})
    raw |= {"model": "fc10", "attacks": [{"name": "fgsm"}], "wandb": {"mode": "disabled"}}
    raw |= {"measures": [{"name": "health"}, {"name": "masking"}], "attack_examples": 6}
    raw["train"] |= {"epochs": 1}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_sweep(path)


def _run(spec: Any, indexes: list[int], stamp: str = "") -> None:
    store = SweepStore(spec.settings.storage, spec.name)
    store.write_manifest(manifest.record_version(store.read_manifest(), spec))
    for index in indexes:
        run_trial(
            spec.trials[index], trial_context(spec, index, store.storage, "disabled", None, stamp)
        )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_torch_thread) -> tuple[Any, Path]:
    """Two finished trials of a three-seed sweep (the third runs later, to grow it)."""
    folder = tmp_path_factory.mktemp("compact")
    spec = _sweep(folder, "c", [0, 1, 2])
    _run(spec, [0, 1])
    return spec, folder / "results" / "c"


@pytest.fixture
def copy(finished, tmp_path: Path) -> tuple[Any, Path]:
    _, folder = finished
    target = tmp_path / "results" / "c"
    shutil.copytree(folder, target)
    shutil.copytree(folder.parent / ".models", target.parent / ".models")
    return _sweep(tmp_path, "c", [0, 1, 2]), target


def _rows(frame: pd.DataFrame) -> list[tuple]:
    """Rows as sortable tuples (lists, e.g. images, as tuples; NaN/None as one marker)."""
    out = []
    for row in frame.itertuples(index=False):
        out.append(tuple(_plain(v) for v in row))
    return sorted(out, key=repr)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return "<null>" if value is None or value is pd.NA or value != value else value


def _everything(folder: Path, globbed: bool = True) -> dict[str, list[tuple]]:
    """Every table as advlab.load reads it; and (unless a rerun's rows are loose beside their
    compacted copies, until compaction) each reader of the folder as it is, the same rows."""
    res = results.load(str(folder))
    assert not res.notes
    seen = {}
    for table in TABLES:
        frame = res.examples(images=True) if table == "examples" else res.table(table)
        names = SweepStore.from_dir(str(folder)).read(table).columns.tolist()
        ours = _rows(frame[names])
        for other in _globbed(folder / table) if globbed else []:
            assert _rows(other[names]) == ours, table
        seen[table] = ours
    return seen


def _globbed(path: Path) -> list[pd.DataFrame]:
    return [
        pd.read_parquet(path),
        pl.read_parquet(f"{path}/*.parquet").to_pandas(),
        duckdb.sql(f"SELECT * FROM '{path}/*.parquet'").df(),
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.parquet")}


def test_compaction_keeps_every_row_and_a_second_run_changes_nothing(copy) -> None:
    _, folder = copy
    before, loose = _everything(folder), _files(folder)
    assert main(["compact", str(folder)]) == 0
    after = _files(folder)
    assert sorted(Path(p).parent.name for p in after) == sorted(TABLES)
    assert all(parts.is_compacted(p) for p in after) and len(loose) == 2 * 9
    assert _everything(folder) == before
    assert compact.compact_sweep(str(folder)) == []  # idempotent: nothing loose, no rewrite
    assert _files(folder) == after


def test_a_crash_between_writing_and_removing_loses_and_duplicates_nothing(
    copy, monkeypatch
) -> None:
    _, folder = copy
    before = _everything(folder)
    store = SweepStore.from_dir(str(folder))
    deletes = []

    def crash_after_one(store: SweepStore, path: str) -> None:  # dies after removing one file
        if deletes:
            raise KeyboardInterrupt("killed")
        deletes.append(path)
        store.fs.delete_file(path)

    monkeypatch.setattr(compact, "_delete", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        compact.compact_table(store, "examples")
    files = [p.name for p in (folder / "examples").glob("*.parquet")]
    assert len(files) == 2 and sum(map(parts.is_compacted, files)) == 1  # one merged, one left
    assert _everything(folder, globbed=False) == before
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):  # and a crash before removing anything
        monkeypatch.setattr(compact, "_remove", _raise)
        compact.compact_table(SweepStore.from_dir(str(folder)), "attacks")
    monkeypatch.undo()
    assert _everything(folder, globbed=False) == before
    compact.compact_sweep(str(folder))  # the next compaction finishes the job
    assert all(parts.is_compacted(p) for p in _files(folder))
    assert _everything(folder) == before  # globbing readers too, rows exactly once


def _raise(*args: Any) -> None:
    raise KeyboardInterrupt("killed")


def test_a_sweep_grows_and_reruns_a_trial_after_compaction(copy) -> None:
    spec, folder = copy
    compact.compact_sweep(str(folder))
    first = _everything(folder)
    merged = _files(folder)
    _run(spec, [2])  # grows: a new trial's loose files beside the compacted ones
    grown = _everything(folder)
    assert len(grown["trials"]) == 3 and len(grown["examples"]) == 3 * len(first["examples"]) / 2
    assert all(_files(folder)[p] == b for p, b in merged.items())  # nothing rewritten
    _run(spec, [0], stamp="rerun")  # --fresh on one trial: its rows replace, never add
    rerun = _everything(folder, globbed=False)  # loose rerun files win over compacted copies
    assert {t: len(r) for t, r in rerun.items()} == {t: len(r) for t, r in grown.items()}
    assert rerun["trials"] != grown["trials"]  # its row is the rerun's (new timings)
    compact.compact_sweep(str(folder))
    assert _everything(folder) == rerun
    assert len(list((folder / "trials").glob("*.parquet"))) == 1


def test_a_run_that_leaves_no_rows_hides_its_compacted_rows(copy) -> None:
    _, folder = copy
    compact.compact_sweep(str(folder))
    store = SweepStore.from_dir(str(folder))
    trial = store.read("trials")["trial_id"].iloc[0]
    before = len(store.read("health"))
    store.write_part("health", trial, "measure.health", None)
    left = store.read("health")
    assert trial not in set(left["trial_id"]) and len(left) == before / 2
    compact.compact_sweep(str(folder))  # and readers that glob the folder, once compacted
    for other in _globbed(folder / "health"):
        assert sorted(other["trial_id"]) == sorted(left["trial_id"])


def test_two_sweeps_under_one_root_share_their_models(copy, monkeypatch) -> None:
    _, folder = copy
    fits = []
    real = advlab.trial.FitJob
    monkeypatch.setattr(advlab.trial, "FitJob", lambda *a: fits.append(a) or real(*a))
    other = _sweep(folder.parent.parent, "other", [0, 1])  # same models, another sweep
    _run(other, [0, 1])
    assert fits == []  # loaded from the shared store: no epoch trained
    rows = results.load(str(folder.parent / "other")).trials
    assert not rows["trained_here"].any()
    assert not (folder.parent / "other" / "models").exists()


def test_a_model_in_a_sweeps_own_older_folder_is_found_and_moved_into_the_store(copy) -> None:
    _, folder = copy
    store = SweepStore.from_dir(str(folder))
    key = store.read("trials")["training_key"].iloc[0]
    shared = folder.parent / ".models" / f"{key}.pt"
    (folder / "models").mkdir()
    shutil.move(shared, folder / "models" / f"{key}.pt")  # where an older version kept it
    assert SweepStore.from_dir(str(folder), read_only=True).load_model(key) is not None
    assert not shared.exists()  # a reader copies nothing
    state = store.load_model(key)
    assert (
        state is not None and shared.read_bytes() == (folder / "models" / f"{key}.pt").read_bytes()
    )


def test_a_damaged_compacted_file_takes_its_runs_rows_and_they_rerun(copy) -> None:
    spec, folder = copy
    compact.compact_sweep(str(folder))
    before = _everything(folder)
    (damaged,) = (folder / "examples").glob("compacted-*.parquet")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a full disk
    store = SweepStore.from_dir(str(folder))
    (line,) = store.check_files()
    assert line.startswith(f"examples/{damaged.name} is damaged")
    assert store.read("examples").empty and store.read("attacks").empty  # the runs go whole
    assert len(store.read("trials")) == 2  # the trials stand: their training is sound
    _run(spec, [0, 1])  # the sweep resumes: the attack runs, and only they, run again
    after = _everything(folder, globbed=False)
    for table in ("examples", "curves", "trials", "epochs"):  # the same numbers, not timings
        assert after[table] == before[table], table
    assert len(after["attacks"]) == len(before["attacks"])


def test_compact_refuses_a_folder_with_no_results_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["compact", str(tmp_path / "nothing")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no advlab results here" in line and "<storage>/<sweep>" in line
    assert not (tmp_path / "nothing").exists()  # refused before any work: nothing written


def test_a_sweeps_end_compacts_past_the_threshold_or_once_compacted(copy, monkeypatch) -> None:
    spec, folder = copy
    store = SweepStore.from_dir(str(folder))
    assert compact.compact_after_sweep(store) is None  # 18 loose files: a small sweep stays
    monkeypatch.setattr(compact, "AUTO_MIN_FILES", 18)
    line = compact.compact_after_sweep(store)
    assert line == "advlab: compacted 18 parquet files into one per table (8 tables)"
    monkeypatch.undo()
    store.write_part("health", spec.trials[0].trial_id(), "measure.health", None)
    assert compact.compact_after_sweep(store) == (  # compacted before: one loose file is enough
        "advlab: compacted 2 parquet files into one per table (1 table)"
    )


def test_the_transfer_stages_shard_files_are_left_to_it(copy) -> None:
    """The transfer stage resumes by its shard files' names: compaction must not merge them."""
    _, folder = copy
    store = SweepStore.from_dir(str(folder))
    shards = ["a1b2c3", "d4e5f6"]
    for shard in shards:
        store.write_rows("transfer", shard, [])
    compact.compact_sweep(str(folder))
    left = sorted(Path(p).name for p in store.trial_files("transfer"))
    assert left == [f"{s}.parquet" for s in shards]
    assert all(parts.is_compacted(p) for t in TABLES for p in store.trial_files(t))
