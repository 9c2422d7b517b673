"""End to end on RGB data: a real Ray Tune sweep over one (N, H, W, C) data set written as an
uncompressed npz and as PNG folders, both streamed with a DataLoader worker and augmented,
attacked, read back from parquet, and reported (the page as headless Chromium draws it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from browser import CHROMIUM, open_page
from test_streaming import rgb_arrays, write_pngs

from advlab.cli import main
from advlab.report.images import png_uri
from advlab.sources import load_data
from advlab.store import SweepStore


@pytest.mark.slow
def test_rgb_npz_and_png_folders_sweep_streamed_attacked_and_reported(
    ray_local: None, tmp_path: Path
) -> None:
    arrays = rgb_arrays(n_train=64, n_test=24)
    np.savez(tmp_path / "rgb.npz", **arrays)
    write_pngs(arrays, tmp_path / "pngs")
    common = {"streaming": True, "workers": 1}
    sweep = {
        "name": "rgb",
        "storage": "results",  # relative to this file's folder
        "grid": {
            "dataset": [
                {"name": "npz", "path": "rgb.npz", **common},
                {"name": "folder", "path": "pngs", **common},
            ]
        },
        "model": "cnn",
        "activation": "relu",
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01,
                  "augment": {"crop_padding": 2, "flip": True}},
        "eps": [0.05],
        "attack_examples": 4,
        "attacks": [{"name": "fgsm"}],
        "measures": [],
        "transfer": {"controls": ["constant"], "noise": False, "amplify_rms": []},
        "resources": {"cpu": 1},
        "wandb": {"mode": "disabled"},
    }  # fmt: skip
    path = tmp_path / "rgb.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path)]) == 0

    store = SweepStore(str(tmp_path / "results"), "rgb")
    trials = store.read("trials")
    assert list(trials["status"]) == ["ok", "ok"]
    assert (trials["n_attacked"] == 4).all()
    examples = store.read("examples")
    # Each trial's examples are of its own images (the folder lists them by class, the npz
    # in its order): the stored distortions are those of the images its source holds.
    sources = {t.trial_id: json.loads(t.spec)["dataset"] for t in trials.itertuples()}
    assert sorted(s["name"] for s in sources.values()) == ["folder", "npz"]
    data = {trial: load_data(s["name"], path=s["path"]) for trial, s in sources.items()}
    assert [d.input_shape for d in data.values()] == [(3, 8, 8)] * 2
    for row in examples.itertuples():
        x = data[row.trial_id].x_test[row.dataset_index].numpy().ravel()
        rms = np.sqrt(((np.asarray(row.x_adv, np.float64) - x) ** 2).mean())
        assert rms == pytest.approx(row.dist_rms, rel=1e-4, abs=1e-6)
    assert len(store.read("transfer")) > 0

    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "results" / "rgb"), "-o", str(out)]) == 0
    html = out.read_text()
    assert "No clean images" not in html
    wanted = {
        png_uri(data[row.trial_id].x_test[row.dataset_index].numpy())
        for row in examples.itertuples()
    }
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium to draw the report")
    with open_page(out) as page:
        shown = page.evaluate(
            "[...document.querySelectorAll('img[data-kind=original]')].map(i => i.src)"
        )
        assert page.problems() == []
    assert len(shown) >= 2 and set(shown) <= wanted  # the clean images of both data sets
