"""Example images as embedded PNG: the clean image an example was made from (of the split its
trial attacked), the adversarial one, and the perturbation magnified x10 around gray 0.5, as in
the paper's figures."""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image

from advlab.sources import attacked_split
from advlab.spec import DatasetSpec
from advlab.sweepfile import add_plugin_dirs

MIN_PIXELS = 56  # small images are scaled up (nearest neighbour) to at least this
MAGNIFY = 10.0


def image_shape(size: int) -> tuple[int, int, int] | None:
    """(C, H, W) of a flattened square image (gray, else RGB) when the data set is not at hand;
    None when no square fits."""
    for c in (1, 3):
        side = math.isqrt(size // c)
        if c * side * side == size:
            return c, side, side
    return None


def png_uri(image: np.ndarray) -> str:
    """A (C, H, W) image in [0, 1] as a data: URI, scaled up to be visible."""
    pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    pixels = np.rint(pixels * 255).astype(np.uint8)
    pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    scale = max(1, math.ceil(MIN_PIXELS / pixels.shape[0]))
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def magnified(clean: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + MAGNIFY * (adversarial - clean), 0, 1)


class CleanImages:
    """The images examples were made from, read through advlab.sources (the route the trials
    read them by), each (data set, split) once; None, and why, where they cannot be read."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], np.ndarray | None] = {}
        self.problems: dict[str, str] = {}

    def original(
        self, spec: dict[str, Any], row: dict[str, Any], plugin_dirs: list[str]
    ) -> np.ndarray | None:
        """The (C, H, W) image an examples row was made from: its split (the trial's
        attack_split) of its trial's data at its dataset_index. `plugin_dirs` (sweep.json's)
        hold the modules of `module:function` loaders."""
        dataset = spec.get("dataset", {})
        split = row.get("split")
        split = split if isinstance(split, str) else spec.get("attack_split", "test")
        images = self._split(dataset, split, plugin_dirs)
        if images is None:
            return None
        index = int(row["dataset_index"])
        if index >= len(images) or images[0].size != np.asarray(row["x_adv"]).size:
            self.problems[_named(dataset)] = (
                f"the {split} split no longer matches the stored examples; the data changed "
                "since the sweep ran"
            )
            return None
        return images[index]

    def _split(
        self, dataset: dict[str, Any], split: str, plugin_dirs: list[str]
    ) -> np.ndarray | None:
        key = (json.dumps(dataset, sort_keys=True), split)
        if key not in self._loaded:
            self._loaded[key] = self._load(dataset, split, plugin_dirs)
        return self._loaded[key]

    def _load(
        self, dataset: dict[str, Any], split: str, plugin_dirs: list[str]
    ) -> np.ndarray | None:
        add_plugin_dirs(plugin_dirs)
        try:
            source = DatasetSpec.model_validate_json(json.dumps(dataset))
            return attacked_split(source, split)[0].numpy()
        except Exception as err:  # the data may live on another machine: show what we have
            self.problems[_named(dataset)] = f"{type(err).__name__}: {err}".splitlines()[0]
            return None


def _named(dataset: dict[str, Any]) -> str:
    """A data set as the notes name it: its name, and its file or folder where it has one."""
    name = str(dataset.get("name", "digits"))
    where = dataset.get("path") or dataset.get("root")
    return f"{name} at {where}" if where else name
