"""Likelihood: how probable an explicit density model of the training set finds clean test images,
their adversarials, Gaussian noise of the same rms and images of another dataset (the critics'
"evaluate the likelihood of the adversarial examples"), beside the kNN distance (density.py).

Per trial, a Gaussian VAE (advlab.likelihood) is fitted to the trial's training images (seeded
by the trial; saved in the measure's shared folder, so the trials of a sweep on one training
set fit it once) and scores, in bits per dimension (the importance-weighted bound on log p(x),
and the ELBO):
- ``train``: training images it was fitted to (its generalisation gap, beside ``clean``);
- ``clean``: the attacked test images;
- ``adversarial`` / ``noise``: per attack run and budget, the successful adversarials, and for
  the same examples Gaussian noise of each one's own rms distortion (density.py's draws);
- ``ood``: test images of another dataset (``ood``), resampled to the trial's resolution with
  advlab.resample (the 8x8 digits go up to 28x28 beside Fashion-MNIST, Fashion-MNIST down to 8x8
  beside the digits), as many as the clean images.
A lower bits/dim is a likelier input. ``vs_clean`` is the mean paired difference from the same
examples' clean images.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator
from torch import Tensor

from advlab.attacks.noise import matched_noise
from advlab.data import DataError, load_dataset, validate_dataset_source
from advlab.likelihood import DensityVAE, bits_per_dim, bounds, dequantize, fit_density
from advlab.measure import distortions
from advlab.measures.density import knn_distance, noise_seed
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.resample import resample
from advlab.strict import Strict


class LikelihoodSettings(Strict):
    latent: int = Field(16, ge=1, le=10_000)  # the density VAE's latent units
    hidden: int = Field(256, ge=0, le=100_000)  # its hidden layer (0: linear, factor analysis)
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    lr: float = Field(3e-3, gt=0, le=1)  # Adam
    max_train: int | None = Field(10_000, ge=1)  # training images it is fitted to (the first)
    samples: int = Field(64, ge=1, le=100_000)  # importance samples per scored image
    ood: Literal["digits", "mnist", "fashion_mnist"] | None = "digits"
    ood_root: str | None = None  # the ood dataset's folder (IDX files), as dataset.root
    k: int = Field(5, ge=1, le=100_000)  # neighbours of the kNN distance beside

    @model_validator(mode="after")
    def _ood_source_exists(self) -> LikelihoodSettings:
        if self.ood is not None:
            try:
                validate_dataset_source(self.ood, self.ood_root)
            except DataError as err:  # its message names dataset.root, here ood_root
                raise ValueError(str(err).replace("dataset.root", "ood_root")) from None
        return self


# (digest of the training images, settings, seed) -> the fitted model; a worker runs a few trials
_FITTED: OrderedDict[str, DensityVAE] = OrderedDict()


def density_model(
    x_train: Tensor, settings: LikelihoodSettings, seed: int, folder: str | None = None
) -> DensityVAE:
    """The density model of these training images, fitted once: kept per process, and saved in
    `folder` (the measure's shared folder) for the other trials of the sweep."""
    images = x_train[: settings.max_train]
    fitting = settings.model_dump_json(exclude={"samples", "ood", "ood_root", "k"})
    digest = hashlib.sha1(images.cpu().numpy().tobytes())
    digest.update(f"{fitting}/{seed}".encode())
    key = digest.hexdigest()[:16]
    if key not in _FITTED:
        path = None if folder is None else os.path.join(folder, f"density-{key}.pt")
        model = _load(path, images, settings)
        if model is None:
            model = fit_density(
                images, latent=settings.latent, hidden=settings.hidden, epochs=settings.epochs,
                batch_size=settings.batch_size, lr=settings.lr, seed=seed,
            )  # fmt: skip
            _save(path, model)
        _FITTED[key] = model
        while len(_FITTED) > 2:
            _FITTED.popitem(last=False)
    return _FITTED[key]


def _load(path: str | None, images: Tensor, settings: LikelihoodSettings) -> DensityVAE | None:
    if path is None or not os.path.isfile(path):
        return None
    model = DensityVAE(int(images[0].numel()), settings.latent, settings.hidden)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a damaged or foreign file: never trusted, fitted again
        return None
    return model.to(images.device).eval()


def _save(path: str | None, model: DensityVAE) -> None:
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"  # written whole, then renamed: never half a file
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)


def ood_images(settings: LikelihoodSettings, like: Tensor) -> Tensor | None:
    """The first len(like) test images of the ood dataset at like's resolution and channels."""
    if settings.ood is None:
        return None
    x = load_dataset(settings.ood, settings.ood_root).x_test[: len(like)]
    x = resample(x, (int(like.shape[2]), int(like.shape[3])))
    if x.shape[1] != like.shape[1]:  # grey <-> colour: the channels' mean, repeated
        x = x.mean(dim=1, keepdim=True).expand(-1, like.shape[1], -1, -1)
    return x.contiguous()


class Scorer:
    """Bits/dim of batches of images under one model, each batch dequantised by its own seed."""

    def __init__(self, model: DensityVAE, settings: LikelihoodSettings, seed: int) -> None:
        self.model, self.samples, self.seed = model, settings.samples, seed
        self.device = next(model.parameters()).device

    def __call__(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """(bits/dim by the importance-weighted bound, by the ELBO), each (N,)."""
        generator = torch.Generator().manual_seed(noise_seed(self.seed, f"likelihood/{name}", None))
        y = dequantize(x.to(self.device, torch.float32), generator)
        found = bounds(self.model, y, self.samples, generator)
        dims = int(x[0].numel())
        return bits_per_dim(found.iwae, dims).cpu(), bits_per_dim(found.elbo, dims).cpu()


def _row(
    inputs: str, scored: tuple[Tensor, Tensor], knn: Tensor, clean: Tensor | None = None
) -> dict[str, object]:
    iwae, elbo = scored
    paired = None if clean is None else _mean(iwae - clean)
    return {
        "inputs": inputs, "examples": len(iwae), "bits_per_dim": _mean(iwae),
        "elbo_bits_per_dim": _mean(elbo), "vs_clean": paired, "knn_distance": _mean(knn),
    }  # fmt: skip


def _mean(values: Tensor) -> float | None:
    return float(values.double().mean()) if len(values) else None


def _adversarials(ctx: MeasureContext) -> list[tuple[str, float | None, Tensor, Tensor]]:
    """(attack, budget, positions of the fooled examples, their adversarials) per attack run."""
    assert ctx.results is not None
    examples = ctx.results("examples")
    shape = (-1, *ctx.attacked.x.shape[1:])
    runs = []
    for (attack, budget), group in examples.groupby(["attack", "budget"], dropna=False):
        fooled = group[group["success"]].sort_values("example")
        key = None if budget is None or math.isnan(budget) else float(budget)
        images = np.stack(fooled["x_adv"].to_numpy()) if len(fooled) else np.zeros((0, 1))
        positions = torch.as_tensor(fooled["example"].to_numpy(), dtype=torch.long)
        runs.append((str(attack), key, positions, torch.from_numpy(images).view(shape)))
    return runs


def _run(ctx: MeasureContext, settings: LikelihoodSettings) -> Rows:
    x_train, clean = ctx.x_train.cpu(), ctx.attacked.x.cpu()
    model = density_model(ctx.x_train, settings, ctx.seed, ctx.shared)
    score = Scorer(model, settings, ctx.seed)

    def knn(x: Tensor) -> Tensor:
        return knn_distance(x_train, x, k=settings.k) if len(x) else x.new_zeros(0)

    train = x_train[: len(clean)]
    clean_scored = score(clean, "clean")
    rows = [_row("train", score(train, "train"), knn(train))]
    rows.append(_row("clean", clean_scored, knn(clean)))
    ood = ood_images(settings, clean)
    if ood is not None:
        rows.append(_row("ood", score(ood, "ood"), knn(ood)) | {"ood": settings.ood})
    for attack, budget, positions, adv in _adversarials(ctx):
        name = attack if budget is None else f"{attack}@{budget:g}"
        at = {"attack": attack, "budget": budget}
        base = clean[positions]
        gen = torch.Generator().manual_seed(noise_seed(ctx.seed, attack, budget))
        rms = distortions(base, adv)["rms"].nan_to_num(0.0)
        noise = matched_noise(base, rms, gen).to(base.dtype)
        paired = clean_scored[0][positions]
        rows.append(at | _row("adversarial", score(adv, name), knn(adv), paired))
        rows.append(at | _row("noise", score(noise, f"{name}/noise"), knn(noise), paired))
    return rows


def _check(settings: LikelihoodSettings, n_train: int) -> str | None:
    if settings.k > n_train:
        return f"k: {settings.k} neighbours, but the subset holds {n_train} training examples"
    return None


def _metrics(rows: Rows) -> dict[str, float]:
    return {
        f"likelihood/bits_per_dim_{r['inputs']}": r["bits_per_dim"]
        for r in rows
        if r["inputs"] in ("train", "clean", "ood") and r["bits_per_dim"] is not None
    }


LIKELIHOOD = MeasureDef(
    name="likelihood",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("inputs", pa.string()),  # train, clean, ood, adversarial or noise
            ("attack", pa.string()),  # the attack run (adversarial and noise rows), else null
            ("budget", pa.float64()),  # null: a minimisation attack's run, or not an attack's
            ("ood", pa.string()),  # the ood rows' dataset
            ("examples", pa.int64()),  # images scored (adversarial: the fooled ones)
            (
                "bits_per_dim",
                pa.float64(),
            ),  # mean, by the importance-weighted bound (lower: likelier)
            ("elbo_bits_per_dim", pa.float64()),  # mean, by the ELBO (never below the one above)
            ("vs_clean", pa.float64()),  # mean paired bits/dim minus the same examples' clean
            ("knn_distance", pa.float64()),  # mean L2 distance to the k nearest training images
        ]
    ),
    run=_run,
    settings=LikelihoodSettings,
    reads_attacks=True,
    check=_check,
    summary="Likelihood: bits/dim under a VAE of the training set, clean, adversarial, noise, ood",
    report_by=("inputs", "attack", "budget", "ood"),
    metrics=_metrics,
)
