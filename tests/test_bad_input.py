"""Every user mistake: one line naming the key and the fix, exit code 2, nothing written.

Each case is a sweep file change or a command line; the sweep must fail before Ray starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_sweep

from advlab.cli import main

# (id, change to the tiny sweep or a raw file text, extra command-line args, text in the error)
CASES: list[tuple[str, Any, list[str], str]] = [
    ("yaml-syntax", "name: x\ngrid: {model: [fc10\n", [], "YAML syntax error at line"),
    ("yaml-not-a-mapping", "- name: x\n", [], "must be a mapping"),
    ("unknown-key", {"modle": "fc10"}, [], "modle: unknown key; did you mean 'model'?"),
    ("unknown-nested-key", {"train": {"lrr": 0.1}}, [], "train.lrr: unknown key"),
    ("epochs-wrong-type", {"train": {"epochs": "ten"}}, [], "train.epochs:"),
    ("eps-wrong-type", {"eps": "big"}, [], "eps:"),
    ("empty-grid-axis", {"grid": {"model": []}}, [], "grid.model: empty list"),
    ("grid-axis-unknown", {"grid": {"modl": ["fc10"]}}, [], "did you mean 'model'"),
    ("negative-eps", {"eps": [0.1, -0.1]}, [], "eps: budget -0.1 must be a finite number >= 0"),
    ("nan-eps", {"eps": [float("nan")]}, [], "eps.0: Input should be a finite number"),
    ("negative-attack-eps", {"attacks": [{"name": "fgsm", "eps": -1}]}, [], "attacks.0.eps"),
    ("unknown-model", {"grid": {"model": ["fc10", "mlp9"]}}, [], "model: 'mlp9'"),
    ("model-class-count", {"grid": {"model": ["fc100-7"]}}, [], "end the name in 10"),
    ("decay-per-layer-count", {"grid": {"weight_decay": [[1e-5, 1e-5]]}}, [], "weight_decay:"),
    ("unknown-dataset", {"dataset": {"name": "imagenet"}}, [], "dataset.name:"),
    ("unknown-attack", {"attacks": [{"name": "jsma"}]}, [], "attacks.0.name"),
    ("fgsm-l2", {"attacks": [{"name": "fgsm", "norm": "l2"}]}, [], "attacks.0.norm: fgsm takes"),
    ("bad-subset", {"subset": "p3"}, [], "subset:"),
    ("subset-too-large", {"subset": "per_class:500"}, [], "per_class"),
    (
        "missing-data-folder",
        {"dataset": {"name": "fashion_mnist", "root": "/no/such/folder"}},
        [],
        "/no/such/folder",
    ),
    ("data-folder-without-files", {"dataset": {"name": "mnist", "root": "@empty"}}, [], "dataset"),
    ("bad-name", {"name": "a/b"}, [], "name:"),
    ("zero-cpus", {"resources": {"cpu": 0}}, [], "resources.cpu:"),
    ("gpu-requested-none-here", {"resources": {"cpu": 1, "gpu": 1}}, [], "resources.gpu:"),
    ("cuda-device-none-here", {"device": "cuda"}, [], "resources.gpu:"),
    ("unwritable-storage", {"storage": "@file/results"}, [], "storage: cannot write"),
    (
        "attack-setting-typo",
        {"attacks": [{"name": "pgd", "stpes": 5}]},
        [],
        "attacks.0.stpes: not a setting of pgd; did you mean 'steps'?",
    ),
    ("set-without-equals", {}, ["--set", "train.epochs"], "--set train.epochs: expected KEY=VALUE"),
    ("set-unknown-key", {}, ["--set", "trian.epochs=3"], "trian: unknown key"),
    ("max-concurrent-zero", {}, ["--max-concurrent", "0"], "--max-concurrent"),
]


@pytest.mark.parametrize(
    ("change", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    change: Any, args: list[str], expected: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import ray

    def must_not_start(*a: object, **k: object) -> None:
        raise AssertionError("Ray started despite bad input")

    monkeypatch.setattr(ray, "init", must_not_start)
    monkeypatch.setattr("advlab.tuning.trainable", must_not_start)
    storage = tmp_path / "results"
    path = tmp_path / "sweep.yaml"
    if isinstance(change, str):
        path.write_text(change)
    else:
        raw = {**tiny_sweep(), "storage": str(storage), **change}
        raw = json.loads(json.dumps(raw).replace('"@empty"', json.dumps(str(tmp_path))))
        if raw["storage"] == "@file/results":
            (tmp_path / "a-file").write_text("not a folder")
            raw["storage"] = str(tmp_path / "a-file" / "results")
        path.write_text(yaml.safe_dump(raw))
    before = sorted(p for p in tmp_path.rglob("*"))

    assert main(["sweep", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("advlab: error: ")
    assert expected in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_trial_index_outside_the_grid(write_sweep, capsys) -> None:
    assert main(["trial", str(write_sweep(tiny_sweep())), "--index", "5"]) == 2
    assert "--index: 5 is outside the grid; use 0..1" in capsys.readouterr().err


def test_missing_sweep_file(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err
