"""The report's example cards pair each adversarial image with the image it was made from, for
both attacked splits and every kind of data source (built-in, npz, image folder, your own
loader), and the sweep's fixed-stddev noise rows are drawn on the split its trials attack.

Each sweep here runs its trials in this process on tiny data: about a second a trial.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import advlab.sources
from advlab import manifest, results
from advlab.report import build_report
from advlab.sources import load_data
from advlab.spec import TrialSpec
from advlab.store import SweepStore
from advlab.sweep_settings import TransferSpec
from advlab.sweepfile import add_plugin_dirs, parse_sweep
from advlab.transfer import fixed_noise_sets
from advlab.trial import TrialContext, run_trial

SPLITS = ["test", "train"]
SIDE = 8  # every sweep here has 8x8 images
LOADER_MODULE = "advlab_test_bands_loader"  # a name no other test imports
LOADER = """
import numpy as np


def load(size=8):
    # Train and test images differ, so showing one split's image for the other's is visible.
    rng = np.random.default_rng(5)
    out = {}
    for split, n in (("train", 90), ("test", 45)):
        y = np.arange(n) % 3
        x = rng.random((n, size, size)) * 0.3
        for i, label in enumerate(y):
            x[i, 2 * label : 2 * label + 2, :] += 0.7
        out[f"x_{split}"], out[f"y_{split}"] = x.clip(0, 1), y
    return out
"""


def bands(n: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of 3 classes, each with a bright band in its own rows, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 80, (n, size, size))
    for i, label in enumerate(y):
        x[i, 2 * label : 2 * label + 2, :] += 170
    return x.astype(np.uint8), y


def write_image_folder(root: Path) -> None:
    """root/{train,test}/<class>/<n>.png; the reader orders files by name, so zero-padded."""
    for split, n, seed in (("train", 90, 1), ("test", 45, 2)):
        x, y = bands(n, seed)
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")


def run_in_process(raw: dict[str, Any], folder: Path) -> str:
    """Every trial of a sweep run here, as a sweep would (its manifest first); the sweep's uri."""
    spec = parse_sweep(raw, folder)
    store = SweepStore(str(folder / "results"), spec.name)
    recorded = manifest.record_version(None, spec)
    store.write_manifest(recorded)
    labels = manifest.labels(recorded)
    for index, trial in enumerate(spec.trials):
        ctx = TrialContext(
            sweep=spec.name, storage=str(folder / "results"), trial_index=index,
            label=labels[spec.ids[index]], grid_values=spec.grid_values(trial),
        )  # fmt: skip
        run_trial(trial, ctx)
    return store.uri


def small_sweep(name: str, dataset: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": dataset,
        "model": model,
        "grid": {"attack_split": SPLITS},
        "subset": "fraction:0.5",
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.02},
        "attack_examples": 3,
        "attacks": [{"name": "lbfgs", "max_iter": 10, "search_steps": 4}],
        "wandb": {"mode": "disabled"},
        "transfer": {"controls": [], "noise_stddev": [0.3]},
    }


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, str]:
    """One sweep per source kind, each attacking the test split in one trial and the training
    split in the other; the loader's folder leaves sys.path once they ran."""
    folder = tmp_path_factory.mktemp("sources")
    x_train, y_train = bands(90, 3)
    x_test, y_test = bands(45, 4)
    np.savez(folder / "bands.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    write_image_folder(folder / "images")
    (folder / f"{LOADER_MODULE}.py").write_text(LOADER)
    add_plugin_dirs([str(folder)])  # as load_sweep does for a sweep file in this folder
    try:
        return {
            "digits": run_in_process(small_sweep("digits", {"name": "digits"}, "fc10"), folder),
            "npz": run_in_process(
                small_sweep("npz", {"name": "npz", "path": "bands.npz"}, "fc3"), folder
            ),
            "folder": run_in_process(
                small_sweep("folder", {"name": "folder", "path": "images"}, "fc3"), folder
            ),
            "function": run_in_process(
                small_sweep("function", {"name": f"{LOADER_MODULE}:load"}, "fc3"), folder
            ),
        }
    finally:  # the report must find the loader through sweep.json's plugin_dirs alone
        sys.path.remove(str(folder))
        sys.modules.pop(LOADER_MODULE, None)
        advlab.sources._load_cached.cache_clear()


@pytest.fixture(scope="module")
def page(sweeps: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("page") / "report.html"
    return build_report(list(sweeps.values()), str(out)).read_text(encoding="utf-8")


class Cards(HTMLParser):
    """Every shown example: its trial, attack, example number and images by data-kind."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self._card: dict[str, str] = {}
        self._in_note = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div" and "trial-examples" in a.get("class", ""):
            self._card = a
        elif tag == "div" and a.get("class") == "example":
            self.examples.append({"card": self._card, "example": a, "images": {}})
        elif tag == "img" and self.examples:
            self.examples[-1]["images"][a["data-kind"]] = decode(a["src"])
        self._in_note = tag == "p" and a.get("class") == "note"

    def handle_data(self, data: str) -> None:
        if self._in_note:
            self.notes.append(data)


def decode(uri: str) -> np.ndarray:
    """A shown image back in [0, 1] at its own size: the page scales it up by nearest
    neighbour, so every scale-th pixel is one image pixel."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))
    scale = pixels.shape[0] // SIDE
    assert pixels.shape[:2] == (SIDE * scale, SIDE * scale) and scale > 1
    return pixels[::scale, ::scale].astype(np.float64) / 255


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# Each shown image is its true image rounded to the nearest 1/255, so each pixel of the shown
# difference is within 1/255 of the true difference; rms is a norm, so the shown rms is within
# the rms of that error, at most 1/255, of the true one (plus float32 slack in the stored value).
TOLERANCE = 1 / 255 + 1e-6


@pytest.mark.parametrize("kind", ["digits", "npz", "folder", "function"])
def test_each_card_shows_the_image_its_adversarial_was_made_from(
    kind: str, sweeps: dict[str, str], page: str
) -> None:
    stored = results.load(sweeps[kind]).examples()
    parsed = Cards()
    parsed.feed(page)
    trials = set(stored["trial_id"])
    shown = [e for e in parsed.examples if e["card"]["data-trial"] in trials]
    splits = set()
    for example in shown:
        card, images = example["card"], example["images"]
        row = stored[
            (stored["trial_id"] == card["data-trial"])
            & (stored["attack"] == card["data-attack"])
            & (stored["example"] == int(example["example"]["data-example"]))
        ]
        assert len(row) == 1, example["example"]
        assert set(images) == {"original", "adversarial", "perturbation ×10"}
        shown_rms = rms(images["original"], images["adversarial"])
        assert abs(shown_rms - float(row["dist_rms"].iloc[0])) <= TOLERANCE, (card, shown_rms)
        splits.add(row["split"].iloc[0])
    assert len({e["card"]["data-trial"] for e in shown}) == 2  # one card per trial
    assert splits == set(SPLITS)


def test_data_that_cannot_be_read_leaves_adversarial_images_and_says_why(
    sweeps: dict[str, str], tmp_path: Path
) -> None:
    npz = Path(json.loads(results.load(sweeps["npz"]).trials["spec"].iloc[0])["dataset"]["path"])
    away = npz.rename(npz.with_suffix(".moved"))  # as if the data were on another machine
    try:
        html = build_report([sweeps["npz"]], str(tmp_path / "report.html")).read_text("utf-8")
    finally:
        away.rename(npz)
    parsed = Cards()
    parsed.feed(html)
    assert len(parsed.examples) == 2 * 3  # two trials, three examples each
    assert all(set(e["images"]) == {"adversarial"} for e in parsed.examples)
    note = " ".join(parsed.notes)
    assert f"No clean images for npz at {npz} (DataError: dataset.path: {npz} is no" in note


def test_fixed_noise_rows_of_a_training_split_sweep_are_drawn_on_training_images(
    sweeps: dict[str, str],
) -> None:
    trials = results.load(sweeps["digits"]).trials
    (spec,) = [
        TrialSpec.model_validate_json(s)
        for s, split in zip(trials["spec"], trials["attack_split"], strict=True)
        if split == "train"
    ]
    (noise,) = fixed_noise_sets([spec], TransferSpec(noise_stddev=[0.3]))
    data = load_data("digits")
    first, labels = data.x_train[:3].flatten(1).numpy(), data.y_train[:3].numpy()
    np.testing.assert_array_equal(noise.clean, first)
    np.testing.assert_array_equal(noise.y, labels)
    assert noise.x.shape == first.shape and not np.array_equal(noise.x, first)
