"""Write a synthetic CIFAR-shaped data set: 32x32 RGB uint8 images in (N, H, W, C), 10 classes,
as an uncompressed npz (the form `dataset.streaming` memory-maps) and, with --png, as PNG
folders (train/<class>/, test/<class>/).

Each class is a colour and a stripe orientation; an image is its class's stripes at a random
phase and contrast, under a random colour cast and pixel noise, so a small conv net learns it
in a few epochs without it being trivial. Deterministic in --seed.

    python sweeps/cifar_like.py                          # sweeps/data/cifar_like.npz, 5,000 + 1,000
    python sweeps/cifar_like.py --train 50000 --test 10000 --out big.npz   # CIFAR-10's size
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIZE, CLASSES = 32, 10


def images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, CLASSES, n)
    angle = labels * np.pi / CLASSES  # each class its own stripe orientation
    hue = np.stack(
        [np.cos(labels * 2.4), np.cos(labels * 2.4 + 2.1), np.cos(labels * 2.4 + 4.2)], 1
    )
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n)
    freq = rng.uniform(0.35, 0.6, n)
    wave = np.sin(
        freq[:, None, None]
        * (np.cos(angle)[:, None, None] * rows + np.sin(angle)[:, None, None] * cols)
        + phase[:, None, None]
    )  # (N, H, W)
    contrast = rng.uniform(0.15, 0.35, (n, 1, 1, 1))
    cast = rng.normal(0, 0.08, (n, 1, 1, 3))
    x = 0.5 + 0.25 * hue[:, None, None, :] * 0.6 + contrast * wave[..., None] + cast
    x += rng.normal(0, 0.06, x.shape)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_pngs(arrays: dict[str, np.ndarray], root: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for i, (image, label) in enumerate(
            zip(arrays[f"x_{split}"], arrays[f"y_{split}"], strict=True)
        ):
            folder = root / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")


DEFAULT = Path(__file__).parent / "data" / "cifar_like.npz"  # what cifar_like.yaml reads


def write(out: Path = DEFAULT, train: int = 5000, test: int = 1000, seed: int = 0) -> dict:
    """The data set's arrays, written to `out` as an uncompressed npz (streaming maps its
    arrays in place), to a temporary name then renamed: a reader never sees half a file."""
    rng = np.random.default_rng(seed)
    (x_train, y_train), (x_test, y_test) = images(train, rng), images(test, rng)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.npz")
    np.savez(partial, **arrays)
    partial.replace(out)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT)
    parser.add_argument("--png", type=Path, default=None, help="also write PNG folders here")
    args = parser.parse_args()
    arrays = write(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.out}: x_train {arrays['x_train'].shape}, x_test {arrays['x_test'].shape}")
    if args.png is not None:
        write_pngs(arrays, args.png)
        print(f"wrote {args.png}/{{train,test}}/<class>/*.png")


if __name__ == "__main__":
    main()
