"""Parquet store: atomic per-trial files, replaced (never duplicated) on rerun, read back whole."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from advlab.store import SweepStore
from advlab.tables import EXAMPLES


def curve(trial_id: str, rate: float) -> dict:
    return {
        "trial_id": trial_id,
        "attack": "fgsm",
        "norm": "linf",
        "budget": 0.1,
        "n": 10,
        "success_rate": rate,
        "robust_error": rate,
    }


def test_rows_round_trip_and_rewrite_replaces(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "s")
    store.write_rows("curves", "a", [curve("a", 0.5)])
    store.write_rows("curves", "b", [curve("b", 0.25), curve("b", 0.75)])
    store.write_rows("curves", "a", [curve("a", 0.9)])  # a retried trial
    frame = store.read("curves").sort_values(["trial_id", "success_rate"])
    assert frame["trial_id"].tolist() == ["a", "b", "b"]
    assert frame["success_rate"].tolist() == [0.9, 0.25, 0.75]
    # No temporary files are left behind, and pyarrow reads the folder as one dataset.
    assert sorted(p.name for p in (tmp_path / "s" / "curves").iterdir()) == [
        "a.parquet",
        "b.parquet",
    ]
    assert pq.read_table(tmp_path / "s" / "curves").num_rows == 3


def test_examples_keep_their_schema_and_images(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "s")
    row = {name: 0 for name in EXAMPLES.names}
    row |= {"trial_id": "t", "attack": "lbfgs", "budget": None, "success": True, "split": "test"}
    row |= {"dist_rms": 0.1, "dist_l2": 0.8, "dist_linf": 0.3, "x_adv": [0.0, 0.5, 1.0]}
    store.write_rows("examples", "t", [row])
    table = pq.read_table(tmp_path / "s" / "examples" / "t.parquet")
    assert table.schema == EXAMPLES
    assert table.column("x_adv").to_pylist() == [[0.0, 0.5, 1.0]]


def test_empty_tables_read_as_empty_frames_with_columns(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "s")
    assert list(store.read("curves").columns) == [
        "trial_id",
        "attack",
        "norm",
        "budget",
        "n",
        "success_rate",
        "robust_error",
    ]
    assert store.read("trials").empty
    assert store.read_json("sweep.json") is None


def test_relative_storage_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SweepStore("results", "s")
    assert store.uri == f"{tmp_path}/results/s"
    store.write_json("sweep.json", {"a": 1})
    assert store.read_json("sweep.json") == {"a": 1}


def test_from_dir_opens_the_same_sweep(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "my-sweep")
    store.write_json("sweep.json", {"name": "my-sweep"})
    again = SweepStore.from_dir(str(tmp_path / "my-sweep"))
    assert (again.uri, again.sweep) == (store.uri, "my-sweep")
    assert again.read_json("sweep.json") == {"name": "my-sweep"}


def test_readers_ignore_half_written_files(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "s")
    store.write_rows("curves", "a", [curve("a", 0.5)])
    folder = tmp_path / "s" / "curves"
    # What a writer killed mid-write leaves: a hidden temporary file, possibly truncated.
    whole = (folder / "a.parquet").read_bytes()
    (folder / ".b.parquet.0123.tmp").write_bytes(whole[: len(whole) // 2])
    assert store.read("curves")["trial_id"].tolist() == ["a"]
    assert store.read("trials").empty  # no trials row: not finished


def test_rows_outside_the_declared_schema_are_refused(tmp_path: Path) -> None:
    store = SweepStore(str(tmp_path), "s")
    with pytest.raises(ValueError, match="not in the declared schema"):
        store.write_rows("curves", "a", [curve("a", 0.5) | {"fgsm/success@0.1": 0.5}])
    assert not (tmp_path / "s" / "curves").exists()


def test_a_file_of_a_foreign_schema_or_trial_is_never_read_as_rows(tmp_path: Path) -> None:
    import pyarrow as pa

    store = SweepStore(str(tmp_path), "s")
    store.write_rows("curves", "a", [curve("a", 0.5)])
    folder = tmp_path / "s" / "curves"
    pq.write_table(pa.table({"x": [1, 2], "y": ["p", "q"]}), folder / "b.fgsm.parquet")
    pq.write_table(pq.read_table(folder / "a.parquet"), folder / "c.parquet")  # a's rows
    frame = store.read("curves")
    assert frame["trial_id"].tolist() == ["a"]  # no row without a trial, none of a twice
    assert any("b.fgsm.parquet (not a curves file: it has no trial_id column)" in n
               for n in store.damaged)  # fmt: skip
    assert any("c.parquet (holds rows of trial a, not of c)" in n for n in store.damaged)
    lines = store.check_files()
    assert len(lines) == 2 and all("moved to damaged/" in line for line in lines)
    assert sorted(p.name for p in folder.iterdir()) == ["a.parquet"]


def test_a_truncated_training_checkpoint_is_passed_over_and_moved_aside(tmp_path: Path) -> None:
    import io

    import torch

    store = SweepStore(str(tmp_path), "s")
    trial = tmp_path / "s" / "ray" / "run-a" / "t1"
    for steps in (2, 3):
        buffer = io.BytesIO()
        torch.save({"history": list(range(steps)), "weights": torch.ones(64, 64)}, buffer)
        path = trial / f"checkpoint_00000{steps}" / "training.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(buffer.getvalue())
    newest = trial / "checkpoint_000003" / "training.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a full disk's cut
    assert store.latest_checkpoint("t1")["history"] == [0, 1]  # the older, whole one
    (line,) = store.check_files()
    assert line.startswith("ray/run-a/t1/checkpoint_000003/training.pt is damaged (not a complete")
    assert line.endswith("moved to damaged/, its trial restarts without it")
    assert not newest.exists() and (trial / "checkpoint_000002" / "training.pt").exists()
