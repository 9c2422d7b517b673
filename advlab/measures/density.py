"""Density: how far inputs sit from the training data (the review's open question), as the
mean L2 distance to the k nearest training images (and optionally the residual off the training
set's top principal components), for clean inputs, each attack run's adversarial examples and
Gaussian noise of each example's own per-pixel rms distortion.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from torch import Tensor

from advlab.attacks.noise import matched_noise
from advlab.measure import distortions
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.strict import Strict


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def knn_distance(x_train: Tensor, x: Tensor, k: int = 5, chunk: int = 1024) -> Tensor:
    """(N,) mean L2 distance from each x to its k nearest training images (pixels flattened).

    Both sides are chunked and a running k-best kept, so memory stays at chunk x chunk distances
    whatever the training set's size.
    """
    train = x_train.flatten(1).to(torch.float32)
    query = x.flatten(1).to(device=train.device, dtype=torch.float32)
    if train.shape[1] != query.shape[1]:
        raise ValueError(f"knn_distance: {query.shape[1]} pixels per image vs {train.shape[1]}")
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"knn_distance: k={k} must lie in [1, {train.shape[0]}] training images")
    out = []
    for q in _chunks(query.shape[0], chunk):
        best = query.new_full((q.stop - q.start, 0), math.inf)
        for t in _chunks(train.shape[0], chunk):
            dist = torch.cdist(query[q], train[t])
            best = torch.cat([best, dist], dim=1)
            best = best.topk(min(k, best.shape[1]), dim=1, largest=False).values
        out.append(best.mean(dim=1))
    return torch.cat(out) if out else query.new_zeros(0)


def _pca(x_train: Tensor, components: int) -> tuple[Tensor, Tensor]:
    """(mean, basis): the training images' mean and top principal directions as rows."""
    train = x_train.flatten(1).to(torch.float64)
    mean = train.mean(dim=0)
    _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)  # strongest first
    return mean, vh[:components]


def _pca_residual(mean: Tensor, basis: Tensor, x: Tensor) -> Tensor:
    centred = x.flatten(1).to(device=mean.device, dtype=torch.float64) - mean
    return (centred - (centred @ basis.T) @ basis).norm(dim=1)


def pca_error(x_train: Tensor, x: Tensor, components: int) -> Tensor:
    """(N,) L2 norm of what the training set's top principal components leave of each x."""
    if components < 1:
        raise ValueError(f"pca_error: components={components} must be >= 1")
    return _pca_residual(*_pca(x_train, components), x)


def density_rows(
    x_train: Tensor,
    clean: Tensor,
    adversarial: dict[float | None, Tensor],
    *,
    attack: str,
    k: int = 5,
    seed: int = 0,
    pca_components: int | None = None,
) -> Rows:
    """Mean distances to the training set of the clean inputs (budget null), then per budget of
    one attack run (null for a minimisation attack) its adversarials and matched noise.

    ``adversarial[budget]`` must align row for row with ``clean``. Each noise draw is seeded by
    the trial seed, the attack and the budget alone, so adding an attack changes no other row.
    """
    for budget, adv in adversarial.items():
        if adv.shape != clean.shape:
            raise ValueError(
                f"density_rows: {attack} adversarials at budget {budget} have shape "
                f"{tuple(adv.shape)}, clean {tuple(clean.shape)}; one per clean example"
            )
    measured = _measures(x_train, k, pca_components)
    rows = [{"budget": None, "inputs": "clean", **measured(clean)}]
    for budget, adv in adversarial.items():
        gen = torch.Generator().manual_seed(noise_seed(seed, attack, budget))
        rms = distortions(clean, adv)["rms"].nan_to_num(0.0).cpu()
        noise = matched_noise(clean.cpu(), rms, gen).to(clean.dtype)
        rows.append({"budget": budget, "inputs": "adversarial", **measured(adv)})
        rows.append({"budget": budget, "inputs": "noise", **measured(noise)})
    return rows


def noise_seed(seed: int, attack: str, budget: float | None) -> int:
    name = attack if budget is None else f"{attack}@{budget:g}"  # hashed, never read back
    return seed * 1_000_003 + zlib.crc32(name.encode())


def _measures(
    x_train: Tensor, k: int, pca_components: int | None
) -> Callable[[Tensor], dict[str, float | None]]:
    mean_basis = _pca(x_train, pca_components) if pca_components else None  # fitted once

    def measured(batch: Tensor) -> dict[str, float | None]:
        pca = None if mean_basis is None else float(_pca_residual(*mean_basis, batch).mean())
        return {"knn_distance": float(knn_distance(x_train, batch, k=k).mean()), "pca_error": pca}

    return measured


class DensitySettings(Strict):
    k: int = Field(5, ge=1, le=100_000)  # neighbours averaged
    pca: int = Field(0, ge=0, le=100_000)  # > 0: also the residual off this many components


def _run(ctx: MeasureContext, settings: DensitySettings) -> Rows:
    assert ctx.results is not None
    examples = ctx.results("examples")
    shape = (-1, *ctx.attacked.x.shape[1:])
    adversarial: dict[float | None, Tensor] = {}
    for budget, group in examples.groupby("budget", dropna=False, sort=False):
        images = np.stack(group.sort_values("example")["x_adv"].to_numpy())
        key = None if budget is None or math.isnan(budget) else float(budget)
        adversarial[key] = torch.from_numpy(images).view(shape)
    return density_rows(
        ctx.x_train.cpu(), ctx.attacked.x.cpu(), adversarial, attack=ctx.attack.key, k=settings.k,
        seed=ctx.seed, pca_components=settings.pca or None,
    )  # fmt: skip


def _check(settings: DensitySettings, n_train: int) -> str | None:
    if settings.k > n_train:
        return f"k: {settings.k} neighbours, but the subset holds {n_train} training examples"
    return None


DENSITY = MeasureDef(
    name="density",
    scope="attack",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("attack", pa.string()),
            ("budget", pa.float64()),  # null: a minimisation attack's run, or the clean row
            ("inputs", pa.string()),  # clean, adversarial or noise (same rms as adversarial)
            ("knn_distance", pa.float64()),  # mean L2 distance to the k nearest training images
            ("pca_error", pa.float64()),  # mean residual off the top components; null: pca 0
        ]
    ),
    run=_run,
    settings=DensitySettings,
    check=_check,
    report_by=("attack", "budget", "inputs"),
    summary="Density: distance to the training data of clean, adversarial and noisy inputs",
)
