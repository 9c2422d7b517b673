"""Distortion norms and success at perturbation budgets; the one place distances are defined."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

NORMS = ("rms", "l2", "linf")


def distortions(x: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
    """Per-example distances between x and x_adv, each of shape (B,).

    rms is the paper's measure, sqrt(mean((x_adv - x)^2)) over all pixels (so on MNIST
    l2 = 28 * rms); l2 and linf are the plain vector norms of the flattened difference.
    """
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv: shape {tuple(x_adv.shape)} must equal x's {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError("x: needs a leading batch dimension")
    diff = (x_adv - x).flatten(1) if x.ndim > 1 else (x_adv - x)[:, None]
    if diff.shape[1] == 0:
        zeros = diff.new_zeros(diff.shape[0])
        return {"rms": zeros, "l2": zeros.clone(), "linf": zeros.clone()}
    sq = diff.square().sum(dim=1)
    return {
        "rms": (sq / diff.shape[1]).sqrt(),
        "l2": sq.sqrt(),
        "linf": diff.abs().amax(dim=1),
    }


def success_at_budgets(success: Tensor, distance: Tensor, budgets: Sequence[float]) -> Tensor:
    """(len(budgets), B) bool: success & (distance <= eps) for each budget eps.

    For a minimisation attack one run is scored at every budget; a NaN distance never counts.
    """
    if success.shape != distance.shape or success.ndim != 1:
        raise ValueError(
            f"success and distance: need equal (B,) shapes, got {tuple(success.shape)} "
            f"and {tuple(distance.shape)}"
        )
    values = [float(b) for b in budgets]
    bad = [b for b in values if math.isnan(b) or b < 0]
    if bad:
        raise ValueError(f"budgets: must be numbers >= 0, got {bad}")
    # Compare in the distance's own precision: a float32 distance of 0.1 must count at budget 0.1,
    # which it would not against the float64 0.1 (float32(0.1) > float64(0.1)).
    dtype = distance.dtype if distance.is_floating_point() else torch.float64
    eps = torch.tensor(values, dtype=dtype, device=distance.device)
    within = distance.to(dtype)[None, :] <= eps[:, None]
    return success.bool()[None, :] & within


def fraction(mask: Tensor) -> float:
    """The share of True in `mask` as the exact fraction it is (count / n, correctly rounded
    to float64: 2/25 is 0.08, not float32's 0.07999999821); NaN for an empty mask."""
    n = mask.numel()
    return int(mask.sum()) / n if n else math.nan


def robust_error(fooled: Tensor, clean_wrong: int) -> float | None:
    """Fraction of the scanned examples that are wrong under attack: clean mistakes + fooled.

    `fooled` (n,) bool marks which of the n attacked examples the attack fooled within a budget;
    those n were found by scanning the data in order for correctly classified examples, and the
    scan met `clean_wrong` misclassified ones on the way, so n + clean_wrong were scanned. None
    when nothing was scanned. A caller that attacks every example, clean mistakes included
    (robust validation), passes clean_wrong=0: a clean mistake then counts where the attack's
    point is misclassified.
    """
    if fooled.ndim != 1 or clean_wrong < 0:
        raise ValueError("robust_error: need a (n,) fooled mask and clean_wrong >= 0")
    scanned = len(fooled) + clean_wrong
    return (clean_wrong + int(fooled.sum())) / scanned if scanned else None
