"""The Gaussian-noise link (Ford et al. 2019): per model, the error rate mu under Gaussian noise
of scale sigma, the L2 distance to the nearest error it predicts, -sigma * Phi^-1(mu), and beside
them the trial's minimum-norm attacks' distortion.

Why the formula: for a half-space error set at distance r from x, a noisy point x + sigma * z
lands in it with probability mu = Phi(-r / sigma), so r = -sigma * Phi^-1(mu) exactly; for other
error sets it is what a half-space with the same error rate in noise would give. It is only an
estimate where mu is strictly between 0 and 1/2: mu = 0 (no draw erred) says the distance is
beyond what the draws resolve (roughly -sigma * Phi^-1(1 / draws)), and mu >= 1/2 would put a
correctly classified point at distance <= 0, which the half-space picture cannot (the noise is
too large or the error set is no half-space). Both give a null prediction and a `note`.

The points are the trial's attacked examples (correctly classified), so noise and attacks are
measured on the same images. Noise is not clipped to the [0, 1] box by default: the relation
is for unclipped Gaussian noise (`clip: true` clips, as an image pipeline would).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator
from torch import Tensor

from advlab.attacks.registry import MINIMIZATION
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.strict import Strict

if TYPE_CHECKING:
    import pandas as pd

BLOCK = 2**20  # pixels of noisy images per model call (4 MB of float32)
NO_ERRORS = "no errors in noise: the distance is beyond what the draws resolve"
HALF_OR_MORE = "error rate >= 0.5: no half-space at distance > 0 gives it"


def noise_errors(
    predict: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    sigma: float,
    draws: int,
    generator: torch.Generator,
    clip: bool = False,
) -> Tensor:
    """(N,) int64: how many of `draws` noisy copies x + sigma * z of each x are misclassified.
    Draws go to the model in blocks of about BLOCK pixels; the block size follows from x's
    shape alone, so the same x, seed and draws give the same counts."""
    per_block = max(1, BLOCK // max(1, x.numel()))
    clean, labels = x.detach().cpu().float(), y.cpu()
    wrong = torch.zeros(len(x), dtype=torch.int64)
    for start in range(0, draws, per_block):
        k = min(per_block, draws - start)
        noisy = clean + sigma * torch.randn((k, *clean.shape), generator=generator)
        if clip:
            noisy = noisy.clamp_(0.0, 1.0)
        predicted = predict(noisy.flatten(0, 1).to(x.device)).cpu().view(k, len(x))
        wrong += (predicted != labels).sum(dim=0)
    return wrong


def predicted_distance(mu: float, sigma: float) -> float | None:
    """-sigma * Phi^-1(mu), the half-space's distance; None outside 0 < mu < 0.5."""
    if not 0.0 < mu < 0.5:
        return None
    return -sigma * NormalDist().inv_cdf(mu)


def per_example_distances(wrong: Tensor, draws: int, sigma: float) -> np.ndarray:
    """Each example's predicted distance from its own error rate: +inf where no draw erred (too
    far to resolve), 0 where half or more did (clamped: a distance is never negative)."""
    out = np.empty(len(wrong))
    for i, count in enumerate(wrong.tolist()):
        mu = count / draws
        found = predicted_distance(mu, sigma)
        out[i] = math.inf if count == 0 else (0.0 if found is None else found)
    return out


def noise_row(wrong: Tensor, draws: int, sigma: float) -> dict[str, object]:
    """A sigma's row: the pooled error rate (the exact count / (N * draws)), its prediction,
    and the per-example predictions' median (infinite ones counted, as beyond reach) and mean
    (over those strictly resolved, 0 < mu_i < 0.5)."""
    total = len(wrong) * draws
    mu = int(wrong.sum()) / total if total else math.nan
    each = per_example_distances(wrong, draws, sigma)
    resolved = each[np.isfinite(each) & (each > 0)]
    median = float(np.median(each)) if len(each) else math.nan
    note = NO_ERRORS if mu == 0 else HALF_OR_MORE if mu >= 0.5 else ""
    return {
        "source": "noise", "attack": None, "sigma": sigma, "draws": draws, "n": len(wrong),
        "error_rate": mu, "predicted_l2": predicted_distance(mu, sigma),
        "median_l2": median if math.isfinite(median) else None,
        "mean_l2": float(resolved.mean()) if len(resolved) else None,
        "n_resolved": len(resolved), "note": note,
    }  # fmt: skip


def attack_rows(examples: pd.DataFrame, attacks: list[str]) -> Rows:
    """Per minimum-norm attack run: its success rate and the median and mean L2 distortion of
    the examples it fooled (the attacks table's own convention: distances over successes)."""
    rows = []
    for key in attacks:
        found = examples[examples["attack"] == key]
        fooled = found.loc[found["success"].astype(bool), "dist_l2"].to_numpy(float)
        rows.append(
            {
                "source": "attack", "attack": key, "n": len(found),
                "error_rate": len(fooled) / len(found) if len(found) else None,
                "median_l2": float(np.median(fooled)) if len(fooled) else None,
                "mean_l2": float(fooled.mean()) if len(fooled) else None,
                "n_resolved": len(fooled), "note": "",
            }
        )  # fmt: skip
    return rows


class GaussianNoiseSettings(Strict):
    # Noise scales: the std per pixel, in the [0, 1] units of the images.
    sigmas: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    draws: int = Field(100, ge=1, le=1_000_000)  # noisy copies per example and sigma
    clip: bool = False  # clip noisy images to [0, 1] (the relation is for unclipped noise)

    @field_validator("sigmas")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(not math.isfinite(s) or s <= 0 for s in value):
            raise ValueError("give at least one sigma, each a finite number > 0")
        return sorted(set(value))


def _noise_seed(seed: int, sigma: float) -> int:
    """Each sigma's draws depend on the trial seed and that sigma alone (hashed, never read
    back), so adding a sigma changes no other row."""
    return seed * 1_000_003 + zlib.crc32(f"gaussian_noise@{sigma!r}".encode())


def _run(ctx: MeasureContext, settings: GaussianNoiseSettings) -> Rows:
    x, y = ctx.attacked.x, ctx.attacked.y
    rows: Rows = []
    for sigma in settings.sigmas:
        gen = torch.Generator().manual_seed(_noise_seed(ctx.seed, sigma))
        wrong = noise_errors(ctx.model.predict, x, y, sigma, settings.draws, gen, settings.clip)
        rows.append(noise_row(wrong, settings.draws, sigma))
    minimum_norm = [a.key for a in ctx.attacks if a.defn.kind == MINIMIZATION]
    if minimum_norm and ctx.results is not None:
        rows += attack_rows(ctx.results("examples"), minimum_norm)
    return rows


def _metrics(rows: Rows) -> dict[str, float]:
    return {
        f"noise_predicted_l2@{r['sigma']:g}": r["predicted_l2"]
        for r in rows
        if r["source"] == "noise" and r["predicted_l2"] is not None
    }


GAUSSIAN_NOISE = MeasureDef(
    name="gaussian_noise",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("source", pa.string()),  # noise (a row per sigma) or attack (per minimum-norm run)
            ("attack", pa.string()),  # the attack's label; null for noise rows
            ("sigma", pa.float64()),  # null for attack rows
            ("draws", pa.int64()),  # noisy copies per example; null for attack rows
            ("n", pa.int64()),  # examples (the trial's attacked ones)
            ("error_rate", pa.float64()),  # noise: mu over n * draws; attack: success rate
            ("predicted_l2", pa.float64()),  # -sigma * Phi^-1(mu); null unless 0 < mu < 0.5
            ("median_l2", pa.float64()),  # noise: of per-example predictions; attack: fooled
            ("mean_l2", pa.float64()),  # noise: over resolved examples; attack: over fooled
            ("n_resolved", pa.int64()),  # noise: examples with 0 < mu_i < 0.5; attack: fooled
            ("note", pa.string()),  # why predicted_l2 is null, else empty
        ]
    ),
    run=_run,
    settings=GaussianNoiseSettings,
    reads_attacks=True,
    metrics=_metrics,
    report_by=("source", "attack", "sigma"),
    summary="Gaussian noise (Ford et al.): error rate in noise, the distance it predicts, "
    "and the minimum-norm attacks' distortion",
)
