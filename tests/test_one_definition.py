"""One sweep definition per storage and name: a second, unrelated sweep file under the same
name is refused before anything runs; the same sweep moved or grown continues; a sweep that
holds trials of two data sets transfers within each, with no failed target."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_sweep

from advlab import manifest, results
from advlab.cli import main
from advlab.store import SweepStore
from advlab.sweepfile import load_sweep


def _record(path: Path) -> None:
    """What a finished run of `path` leaves in sweep.json (its version and trials)."""
    spec = load_sweep(path)
    store = SweepStore(spec.settings.storage, spec.name)
    store.write_manifest(manifest.record_version(store.read_manifest(), spec))


def _no_ray(monkeypatch) -> None:
    import ray

    def must_not_start(*a: object, **k: object) -> None:
        raise AssertionError("Ray started despite bad input")

    monkeypatch.setattr(ray, "init", must_not_start)


@pytest.mark.parametrize("command", ["sweep", "validate", "trial"])
def test_an_unrelated_sweep_file_under_the_same_name_is_refused(
    command: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    storage = str(tmp_path / "results")
    first = tmp_path / "a" / "s.yaml"
    first.parent.mkdir()
    first.write_text(yaml.safe_dump(tiny_sweep(name="same", storage=storage)))
    _record(first)
    other = tiny_sweep(name="same", storage=storage, grid={"model": ["fc32-10"]}, seed=5)
    second = tmp_path / "b" / "s.yaml"
    second.parent.mkdir()
    second.write_text(yaml.safe_dump(other))
    _no_ray(monkeypatch)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    start = time.monotonic()
    assert main([command, str(second)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("advlab: error: ")
    assert f"holds sweep 'same' of {first}, which shares no trial" in err
    assert "give this sweep its own name" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_same_sweep_moved_or_grown_continues(tmp_path: Path, capsys) -> None:
    storage = str(tmp_path / "results")
    first = tmp_path / "a" / "s.yaml"
    first.parent.mkdir()
    first.write_text(yaml.safe_dump(tiny_sweep(name="same", storage=storage)))
    _record(first)
    moved = tmp_path / "b" / "s.yaml"
    moved.parent.mkdir()
    grown = tiny_sweep(name="same", storage=storage)
    grown["grid"]["weight_decay"] = [1.0e-4, 1.0e-3]
    moved.write_text(yaml.safe_dump(grown))
    assert main(["validate", str(moved)]) == 0
    _record(moved)
    recorded = json.loads((tmp_path / "results" / "same" / "sweep.json").read_text())
    assert [v["file"] for v in recorded["versions"]] == [str(first), str(moved)]


@pytest.mark.slow
def test_a_sweep_over_two_data_sets_transfers_within_each(
    ray_local, tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = (rng.random((60, 6, 6)) * 0.2 + (y[:, None, None] == 1) * 0.7).astype(np.float32)
    np.savez(tmp_path / "small.npz", x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    raw = tiny_sweep(name="two", storage=str(tmp_path / "results"), grid={})
    raw |= {"cases": [{"model": "fc10"}, {"model": "fc3", "dataset": {"name": "npz",
            "path": "small.npz"}}], "attacks": [{"name": "fgsm"}], "measures": []}  # fmt: skip
    raw["transfer"] = {"controls": ["constant"]}
    raw["wandb"] = {"mode": "disabled"}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    assert "failed" not in capsys.readouterr().out.replace("0 failed", "")
    res = results.load(str(tmp_path / "results" / "two"))
    digits, small = load_sweep(path).ids
    rows = res.transfer
    assert (rows["status"] == "ok").all()
    trials = rows[rows["target_kind"] == "trial"]
    pairs = set(zip(trials["source_trial"], trials["target"], strict=True))
    assert pairs == {(digits, digits), (small, small)}


def test_an_axis_a_later_version_fixed_is_labelled_with_its_fixed_value() -> None:
    """Version 1 varied model and resolution, version 2 fixed the model: its trial is named by
    the model it ran, never 'None'."""
    versions = [
        {
            "version": 1,
            "trial_ids": ["a", "b"],
            "axes": ["model", "dataset.resolution"],
            "definition": {"weight_decay": 0.001},
        },
        {
            "version": 2,
            "trial_ids": ["c"],
            "axes": ["dataset.resolution", "weight_decay"],
            "definition": {"model": "cnn", "weight_decay": 0.5},
        },
    ]
    res = "dataset.resolution"
    trials = {
        "a": {"version": 1, "index": 0, "model": "fc10", "values": {"model": "fc10", res: 7}},
        "b": {"version": 1, "index": 1, "model": "fc10", "values": {"model": "fc10", res: 14}},
        "c": {"version": 2, "index": 0, "model": "cnn", "values": {res: 7, "weight_decay": 0.5}},
    }
    labels = manifest.labels({"versions": versions, "trials": trials})
    assert labels == {
        "a": "fc10 resolution=7 wd=0.001",
        "b": "fc10 resolution=14 wd=0.001",
        "c": "cnn resolution=7 wd=0.5",
    }
