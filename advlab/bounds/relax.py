"""Linear relaxations of the nonlinear layers, given bounds l <= z <= u on their inputs
(``lo`` and ``hi`` in the code).

An elementwise activation f gets two lines per neuron, valid on [l, u]:
    lower_slope * z + lower_icpt <= f(z) <= upper_slope * z + upper_icpt.
Max pooling gets a selection and a constant (:func:`maxpool_relaxation`). Each function states
why its lines are valid; all are computed without gradients, in the bounds' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from advlab.bounds.layers import MaxPool

__all__ = [
    "MaxPoolRelaxation",
    "Relaxation",
    "activation_relaxation",
    "maxpool_relaxation",
    "relu_relaxation",
    "s_shaped_relaxation",
]

# Below this width an interval gets the "narrow" relaxation (see s_shaped_relaxation): a chord
# over a narrower interval has a slope dominated by the rounding of f(u) - f(l), and its
# intercept f(l) - k l would lose the digits that make the line valid.
NARROW = 1e-9
# Bisection steps for tangent points; each halves the bracket, and the side kept is the valid
# one, so more steps only tighten.
TANGENT_STEPS = 40


@dataclass(frozen=True)
class Relaxation:
    """Lines for one node's neurons, each (N, *shape). ``unstable``: for ReLU, the neurons whose
    lower slope may be any value in [0, 1] (what alpha-CROWN optimises); None otherwise."""

    lower_slope: Tensor
    lower_icpt: Tensor
    upper_slope: Tensor
    upper_icpt: Tensor
    unstable: Tensor | None = None


@dataclass(frozen=True)
class MaxPoolRelaxation:
    """Per output (N, C, L): the window's input with the largest lower bound (``index`` into
    the window), whether it dominates (its lower bound >= every other input's upper bound) and
    the window's largest upper bound."""

    index: Tensor
    dominant: Tensor
    upper: Tensor


def relu_relaxation(lo: Tensor, hi: Tensor) -> Relaxation:
    """Stable neurons exactly (z or 0). Unstable ones (l < 0 < u): the chord through (l, 0) and
    (u, u) lies above the convex ReLU on [l, u]; any alpha z with alpha in [0, 1] lies below it,
    since max(0, z) >= z and >= 0. CROWN's adaptive choice alpha = 1 if u >= -l else 0."""
    active, inactive = lo >= 0, hi <= 0
    unstable = ~active & ~inactive
    one, zero = torch.ones_like(lo), torch.zeros_like(lo)
    slope = hi / torch.where(unstable, hi - lo, one)
    upper_slope = torch.where(unstable, slope, torch.where(active, one, zero))
    upper_icpt = torch.where(unstable, -lo * slope, zero)
    adaptive = (hi >= -lo).to(lo.dtype)
    lower_slope = torch.where(unstable, adaptive, torch.where(active, one, zero))
    return Relaxation(lower_slope, zero, upper_slope, upper_icpt, unstable)


def _sigmoid_slope(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_slope(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1 - t * t


Fn = Callable[[Tensor], Tensor]


def _tangent(f: Fn, df: Fn, d: Tensor) -> tuple[Tensor, Tensor]:
    slope = df(d)
    return slope, f(d) - slope * d


def _bisect(valid: Callable[[Tensor], Tensor], good: Tensor, bad: Tensor) -> Tensor:
    """The end of [bad, good] (either order) where ``valid`` holds, after TANGENT_STEPS halvings
    that keep ``valid(good)`` true."""
    for _ in range(TANGENT_STEPS):
        mid = (good + bad) / 2
        ok = valid(mid)
        good, bad = torch.where(ok, mid, good), torch.where(ok, bad, mid)
    return good


def s_shaped_relaxation(f: Fn, df: Fn, lo: Tensor, hi: Tensor) -> Relaxation:
    """Lines for an increasing f, convex on z < 0 and concave on z > 0 (sigmoid, tanh).

    Convex part (u <= 0): chord above, tangent at the midpoint below. Concave part (l >= 0): the
    mirror image. Across 0, the upper line is the chord if its slope k <= f'(u) (then chord - f
    is concave on [l, 0] and decreasing to 0 on [0, u], so >= 0), else the tangent at the
    d in [0, u] whose line passes through (l, f(l)): such a tangent is above f on [0, inf) by
    concavity and on [l, 0] because it is there concave minus f with both ends >= 0. The
    bisection keeps the side where the line is at or above f(l), so d errs only towards valid.
    The lower line is the mirror image (chord if k <= f'(l), else a tangent at d in [l, 0]
    through (u, f(u))). Narrow intervals (u - l <= NARROW) get the lines of slope f'(mid)
    through the lowest and highest corners of the box [l, u] x [f(l), f(u)]: valid for any
    slope s >= 0 because f is increasing; at l == u they are exact.
    """
    narrow = (hi - lo) <= NARROW
    fl, fu = f(lo), f(hi)
    k = (fu - fl) / torch.where(narrow, torch.ones_like(lo), hi - lo)
    chord = (k, fl - k * lo)
    mid_tangent = _tangent(f, df, (lo + hi) / 2)
    zero = torch.zeros_like(lo)
    # Upper tangent through (l, f(l)): its value at l is f(d) + f'(d)(l - d) >= f(l).
    d_up = _bisect(lambda d: f(d) + df(d) * (lo - d) >= fl, hi.clamp(min=0), zero)
    d_low = _bisect(lambda d: f(d) + df(d) * (hi - d) <= fu, lo.clamp(max=0), zero)
    up_mixed = _choose(k <= df(hi), chord, _tangent(f, df, d_up))
    low_mixed = _choose(k <= df(lo), chord, _tangent(f, df, d_low))
    upper = _choose(hi <= 0, chord, _choose(lo >= 0, mid_tangent, up_mixed))
    lower = _choose(hi <= 0, mid_tangent, _choose(lo >= 0, chord, low_mixed))
    s = df((lo + hi) / 2)
    upper = _choose(narrow, (s, fu - s * lo), upper)
    lower = _choose(narrow, (s, fl - s * hi), lower)
    return Relaxation(lower[0], lower[1], upper[0], upper[1])


def _choose(
    mask: Tensor, yes: tuple[Tensor, Tensor], no: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    return torch.where(mask, yes[0], no[0]), torch.where(mask, yes[1], no[1])


def activation_relaxation(kind: str, lo: Tensor, hi: Tensor) -> Relaxation:
    if kind == "relu":
        return relu_relaxation(lo, hi)
    if kind == "sigmoid":
        return s_shaped_relaxation(torch.sigmoid, _sigmoid_slope, lo, hi)
    if kind == "tanh":
        return s_shaped_relaxation(torch.tanh, _tanh_slope, lo, hi)
    raise ValueError(f"no relaxation for activation {kind!r}")


def maxpool_relaxation(op: MaxPool, lo: Tensor, hi: Tensor) -> MaxPoolRelaxation:
    """The max of a window is at least each of its inputs, so y >= x_i* (i* the input with the
    largest lower bound) is a valid lower line; it is at most the largest upper bound, a valid
    (constant) upper line; and where x_i* dominates (l_i* >= u_j for every other j) y = x_i*
    exactly. Sound but not the tightest known (DeepPoly's choice)."""
    low, up = op.windows(lo), op.windows(hi)  # (N, C, window, L); padding is -inf
    index = low.argmax(dim=2, keepdim=True)
    others = up.scatter(2, index, torch.full_like(index, float("-inf"), dtype=up.dtype))
    dominant = low.gather(2, index) >= others.amax(dim=2, keepdim=True)
    return MaxPoolRelaxation(index.squeeze(2), dominant.squeeze(2), up.amax(dim=2))
