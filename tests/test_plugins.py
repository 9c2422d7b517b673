"""Your own model and data: a model module and an npz beside the sweep file (not on sys.path),
run through a real Ray Tune sweep over a model_args grid; pretrained weights; bad plug-ins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from advlab import results
from advlab.cli import main
from advlab.sources import load_data
from advlab.sweepfile import parse_sweep
from advlab.trial import TrialContext, run_trial

NETS = """
import math

import torch
from pydantic import Field
from torch import nn

from advlab.attacks.base import finish
from advlab.attacks.registry import AttackDef, Settings


def build(input_shape, num_classes, width=16):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


class GraySettings(Settings):
    steps: int = Field(16, ge=1)


def toward_gray(model, x, y, *, eps, norm, target, generator, steps):
    # The first point on the way from x to the gray image that the model misclassifies.
    best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad():
        for step in range(1, steps + 1):
            point = x + step / steps * (0.5 - x)
            fooled = (model(point).argmax(1) != y) & ~found
            best[fooled], found = point[fooled], found | fooled
    return finish(model, best, y, None, torch.zeros(len(x), dtype=torch.int64))


TOWARD_GRAY = AttackDef(
    "toward_gray", "minimization", ("l2", "rms"), ("untargeted",), GraySettings, toward_gray
)


def broken(input_shape, num_classes):
    raise ValueError("no such architecture")

def wrong_shape(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))
"""

LOADER = """
import numpy as np

def load(n=60, size=6):
    rng = np.random.default_rng(1)
    y = np.arange(n) % 3
    x = rng.random((n, size, size)) * 0.2
    for i, label in enumerate(y):
        x[i, 2 * label : 2 * label + 2, :] += 0.8  # one bright band per class
    return {"x_train": x.clip(0, 1), "y_train": y, "x_test": x[:30].clip(0, 1), "y_test": y[:30]}
"""


def synthetic(n: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of 3 classes, each with a bright band in its own rows, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, size, size))
    for i, label in enumerate(y):
        x[i, 2 * label : 2 * label + 2, :] += 190
    return x.astype(np.uint8), y


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A folder that is not on sys.path, holding a model module, a loader and an npz."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mynets.py").write_text(NETS)
    (folder / "myloader.py").write_text(LOADER)
    x_train, y_train = synthetic(150)
    x_test, y_test = synthetic(60, seed=1)
    np.savez(folder / "bands.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


def sweep_file(folder: Path, **changes: Any) -> Path:
    raw: dict[str, Any] = {
        "name": "mine",
        "dataset": {"name": "npz", "path": "bands.npz"},  # relative to the sweep file
        "model": "mynets:build",
        "grid": {"model_args.width": [8, 32]},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
        "eps": [0.05, 0.1],
        "attack_examples": 10,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 20, "search_steps": 5}],
        "storage": str(folder / "results"),
        "wandb": {"mode": "disabled"},
        "transfer": {"controls": ["constant"]},
    }
    raw.update(changes)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_sweep_of_your_own_model_data_and_attack(ray_local, plugin_dir: Path) -> None:
    """Model, data and a toy attack advlab has never heard of, all from a folder that is not
    on sys.path, through Ray workers, the transfer stage and the report, with no edit to advlab.
    """
    assert str(plugin_dir) not in sys.path
    attacks = [
        {"name": "fgsm"},
        {"name": "lbfgs", "max_iter": 20, "search_steps": 5},
        {"name": "mynets:TOWARD_GRAY", "steps": 8},
    ]
    assert main(["sweep", str(sweep_file(plugin_dir, attacks=attacks))]) == 0
    res = results.load(str(plugin_dir / "results" / "mine"))
    assert res.trials["label"].tolist() == ["width=8", "width=32"]
    assert res.trials["model_args.width"].tolist() == [8, 32]  # an axis column per grid key
    assert (res.trials["status"] == "ok").all()
    assert res.trials["test_error"].max() < 0.5  # the bands are easy to tell apart
    assert set(res.attacks["attack"]) == {"fgsm", "lbfgs", "toward_gray"}
    toy = res.attacks[res.attacks["attack"] == "toward_gray"]
    assert toy["kind"].eq("minimization").all() and toy["norm"].eq("l2").all()
    examples = res.examples()
    assert (examples.loc[examples["attack"] == "toward_gray", "grad_evals"] == 0).all()
    # Transfer ran on the workers too: each model's examples against the other model.
    adversarial = res.transfer[(res.transfer["kind"] == "adversarial")]
    assert set(adversarial["target_label"]) == {"width=8", "width=32", "constant"}
    assert (res.transfer["status"] == "ok").all()
    page = plugin_dir / "report.html"
    assert main(["report", str(plugin_dir / "results" / "mine"), "-o", str(page)]) == 0
    html = page.read_text()
    assert "toward_gray" in html and "width=32" in html


def test_pretrained_weights_with_zero_epochs_give_their_own_clean_error(
    plugin_dir: Path, tmp_path: Path
) -> None:
    sys.path.insert(0, str(plugin_dir))
    try:
        import mynets

        torch.manual_seed(3)
        model = mynets.build((1, 6, 6), 3, width=8)
        torch.save(model.state_dict(), plugin_dir / "weights.pt")
        data = load_data("npz", path=str(plugin_dir / "bands.npz"))
        with torch.no_grad():
            wrong = int((model(data.x_test).argmax(1) != data.y_test).sum())
            expected = wrong / len(data.y_test)  # rates are stored as the exact fraction
        raw = yaml.safe_load(sweep_file(plugin_dir).read_text())
        raw |= {"grid": {}, "model_args": {"width": 8}, "init": "weights.pt"}
        raw["train"]["epochs"] = 0
        spec = parse_sweep(raw, plugin_dir)
        result = run_trial(spec.trials[0], TrialContext(sweep="pre", storage=str(tmp_path)))
    finally:
        sys.path.remove(str(plugin_dir))
    assert result.row["test_error"] == expected
    assert result.row["n_train"] == 150


def test_a_loader_by_import_path_and_attacks_on_the_training_split(
    plugin_dir: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(sweep_file(plugin_dir).read_text())
    raw |= {"grid": {}, "dataset": {"name": "myloader:load", "args": {"n": 90}}}
    raw |= {"attack_split": "train", "subset": "p1", "attacks": [{"name": "fgsm"}]}
    sys.path.insert(0, str(plugin_dir))
    try:
        spec = parse_sweep(raw, plugin_dir)
        result = run_trial(spec.trials[0], TrialContext(sweep="split", storage=str(tmp_path)))
    finally:
        sys.path.remove(str(plugin_dir))
    assert result.row["n_train"] == 45
    examples = results.load(str(tmp_path / "split")).examples()
    assert (examples["split"] == "train").all()
    # Training-split indices, and only of the examples the trial trained on (P1).
    assert examples["dataset_index"].max() < 90
    data = load_data("myloader:load", args={"n": 90})
    from advlab.data import select_subset

    p1 = set(select_subset(data, "p1").train_idx.tolist())
    assert set(examples["dataset_index"]) <= p1


def _npz(folder: Path, **arrays: np.ndarray) -> None:
    x, y = synthetic(30)
    base = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    np.savez(folder / "bands.npz", **{k: v for k, v in (base | arrays).items() if v is not None})


BAD_PLUGINS: list[tuple[str, dict[str, Any], Any, str]] = [
    ("module-missing", {"model": "nosuchmodule:build"}, None, "cannot import module 'nosuch"),
    ("function-missing", {"model": "mynets:nothing"}, None, "has no 'nothing'"),
    ("factory-raises", {"model": "mynets:broken", "grid": {}}, None, "raised ValueError: no such"),
    (
        "wrong-output",
        {"model": "mynets:wrong_shape", "grid": {}},
        None,
        "must return (2, 3) logits",
    ),
    ("npz-missing-array", {}, {"y_test": None}, "no array 'y_test'"),
    ("labels-negative", {}, {"y_train": -np.ones(30, dtype=np.int64)}, "has label -1"),
    ("class-without-examples", {}, {"y_train": np.arange(30) % 3 + 1}, "class 0 has no"),
    ("pixels-outside-box", {}, {"x_train": np.full((30, 6, 6), 7.0)}, "scale them to [0, 1]"),
    ("lengths-differ", {}, {"y_train": np.arange(29) % 3}, "30 images but y_train 29 labels"),
    ("weights-do-not-fit", {"init": "bad.pt"}, None, "init: "),
    (
        "normalize-channels",
        {
            "dataset": {
                "name": "npz",
                "path": "bands.npz",
                "normalize": {"mean": [0, 0], "std": [1, 1]},
            }
        },
        None,
        "2 means for 1-channel",
    ),
    ("model-args-typo", {"model_args": {"widht": 8}, "grid": {}}, None, "unexpected keyword"),
]


@pytest.mark.parametrize(
    ("change", "arrays", "expected"), [c[1:] for c in BAD_PLUGINS], ids=[c[0] for c in BAD_PLUGINS]
)
def test_bad_plugins_are_one_line_exit_2_before_ray_starts(
    change: dict, arrays: Any, expected: str, plugin_dir: Path, capsys, monkeypatch
) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    if arrays is not None:
        _npz(plugin_dir, **arrays)
    torch.save({"0.weight": torch.zeros(2, 2)}, plugin_dir / "bad.pt")
    path = sweep_file(plugin_dir, **change)
    for command in ("validate", "sweep"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("advlab: error: "), err
        assert expected in err
    assert not (plugin_dir / "results").exists()


def test_python_api_example_in_the_docs_runs_as_written(tmp_path: Path) -> None:
    """docs/python-api.md's code blocks, run in order in a fresh process and folder."""
    doc = (Path(__file__).parents[1] / "docs" / "python-api.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    script = tmp_path / "example.py"
    script.write_text("\n".join(textwrap.dedent(b) for b in blocks))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "report.html").is_file()


def test_torchvision_models_by_name_fit_the_data(tmp_path: Path) -> None:
    from advlab.models import build_model

    model = build_model("torchvision:resnet18", (1, 28, 28), 7).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1  # adapted from ImageNet's 3
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_normalisation_lives_inside_the_model(plugin_dir: Path) -> None:
    """Attacks see [0, 1] pixels; the wrapped model standardises them itself, exactly."""
    from advlab.families import ModelRequest, resolve

    sys.path.insert(0, str(plugin_dir))
    try:
        family = resolve("mynets:build")
        request = ModelRequest("mynets:build", (1, 6, 6), 3, args={"width": 8})
        torch.manual_seed(0)
        plain = family.build(request).module
        torch.manual_seed(0)
        wrapped = family.build(replace(request, normalize=([0.2], [0.5]))).module
    finally:
        sys.path.remove(str(plugin_dir))
    x = torch.rand(4, 1, 6, 6)
    torch.testing.assert_close(wrapped(x), plain((x - 0.2) / 0.5))


def test_an_image_folder_is_read_as_a_data_set(tmp_path: Path) -> None:
    from PIL import Image

    x, y = synthetic(24)
    for split, (images, labels) in {"train": (x[:18], y[:18]), "test": (x[18:], y[18:])}.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / "imgs" / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    data = load_data("folder", path=str(tmp_path / "imgs"))
    assert data.x_train.shape == (18, 1, 6, 6) and data.x_test.shape == (6, 1, 6, 6)
    assert data.num_classes == 3
    # Images come back exactly, scaled to [0, 1], each under its class folder's label.
    order = sorted(range(18), key=lambda i: (y[i], f"{i:03d}"))
    expected = torch.tensor(x[order] / 255.0, dtype=torch.float32)[:, None]
    torch.testing.assert_close(data.x_train, expected)
    assert data.y_train.tolist() == [int(y[i]) for i in order]
