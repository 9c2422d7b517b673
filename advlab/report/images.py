"""Example images as embedded PNG: the clean test image, the adversarial one, and the
perturbation magnified x10 around gray 0.5, as in the paper's figures."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

MIN_PIXELS = 56  # small images are scaled up (nearest neighbour) to at least this
MAGNIFY = 10.0


def image_shape(size: int, channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a flattened square image when the data set is not at hand."""
    for c in [channels] if channels else [1, 3]:
        side = math.isqrt(size // c)
        if c * side * side == size:
            return c, side, side
    raise ValueError(f"cannot tell the shape of an image of {size} values")


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
    """Test images of each data set a trial names, loaded once; None (and why) if unavailable."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str | None], Any] = {}
        self.problems: dict[str, str] = {}

    def test_set(self, dataset: dict[str, Any]) -> np.ndarray | None:
        key = (str(dataset.get("name", "digits")), dataset.get("root"))
        if key not in self._loaded:
            self._loaded[key] = self._load(*key)
        return self._loaded[key]

    def _load(self, name: str, root: str | None) -> np.ndarray | None:
        from advlab.data import load_dataset

        try:
            return load_dataset(name, root).x_test.numpy()
        except Exception as err:  # the data may live on another machine: show what we have
            self.problems[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            return None
