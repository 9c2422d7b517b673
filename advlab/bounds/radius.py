"""Certified radius per example: the largest eps a bound method certifies, by bisection.

Each example has its own bracket [lower, upper]: ``lower`` is certified (every margin's lower
bound > 0 at that radius, or 0), ``upper`` was tried and not certified. The bracket starts at
[0, top], top = the given upper end (e.g. the best attack's distortion, in the same norm) or the
distance to the box's farthest corner, beyond which the set stops growing. If the method
certifies ``top`` itself, a given top is first raised to the corner; certified at the corner,
the example is certified at every radius (upper = inf). Bisection then halves the bracket until
upper - lower <= rtol * upper. A bound method need not be monotone in eps (CROWN's relaxations
change with it), so only the bracket's two ends are facts, never the points between them.
A misclassified example (a margin <= 0 at eps = 0) gets lower = upper = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advlab.bounds.layers import Chain
from advlab.bounds.propagation import ALPHA_LR, ALPHA_STEPS, NORMS, _as_chain, certified

__all__ = ["MAX_ITER", "RTOL", "CertifiedRadius", "certified_radius", "farthest_corner"]

RTOL = 1e-3  # bisection stops at upper - lower <= RTOL * upper
MAX_ITER = 100  # bisection halvings at most (1e-30 of the start at RTOL's pace)


@dataclass(frozen=True)
class CertifiedRadius:
    """(N,) each, on the model's device: ``lower`` certified, ``upper`` not (inf: certified
    at every radius); ``calls``: batched bound evaluations made, for cost accounting."""

    lower: Tensor
    upper: Tensor
    calls: int


def farthest_corner(x: Tensor, norm: str) -> Tensor:
    """Distance (N,) from each example to the farthest corner of the box [0, 1]^D: the ball of
    this radius covers the whole box."""
    far = torch.maximum(x, 1 - x).flatten(1)
    return far.amax(dim=1) if norm == "linf" else far.norm(dim=1)


def _certify(chain: Chain, x: Tensor, y: Tensor, rows: Tensor, eps: Tensor, opts: dict) -> Tensor:
    """certified() on a subset of rows; (len(rows),) bool."""
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    return certified(chain, x[rows], y[rows], eps[rows], **opts)


def _probe_top(
    chain: Chain, x: Tensor, y: Tensor, low: Tensor, high: Tensor, corner: Tensor, opts: dict
) -> int:
    """Where ``high`` is certified, move the bracket to [high, corner], and where the corner is
    certified too, to [corner, inf]. Updates low and high in place; returns the calls made."""
    calls = 0
    rows = (high > low).nonzero().squeeze(1)  # correctly classified, with a positive top
    for _ in range(2):
        if len(rows) == 0:
            break
        ok = _certify(chain, x, y, rows, high, opts)
        calls += 1
        up = rows[ok]
        low[up] = high[up]
        at_corner = high[up] >= corner[up]
        high[up] = torch.where(at_corner, torch.inf, corner[up])
        rows = up[~at_corner]
    return calls


def certified_radius(
    model: nn.Module | Chain,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "linf",
    method: str = "crown",
    upper: Tensor | None = None,
    rtol: float = RTOL,
    max_iter: int = MAX_ITER,
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
) -> CertifiedRadius:
    """Per example the largest radius ``method`` certifies, bracketed (module docstring).

    ``upper`` (N,): a radius known not to be certifiable, e.g. the best attack's distortion in
    ``norm`` (inf or nan entries fall back to the farthest corner).
    """
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")
    if not 0 < rtol < 1 or max_iter < 0:
        raise ValueError(f"rtol: {rtol} must lie in (0, 1) and max_iter: {max_iter} be >= 0")
    chain = _as_chain(model, x)
    x = x.detach().to(chain.device, chain.dtype)
    y = torch.as_tensor(y).to(chain.device)
    opts = {"norm": norm, "method": method, "steps": steps, "lr": lr}
    corner = farthest_corner(x, norm)
    high = corner.clone()
    if upper is not None:
        given = torch.as_tensor(upper).to(chain.device, chain.dtype).reshape(len(x))
        high = torch.where(torch.isfinite(given), given.clamp(0).minimum(corner), corner)
    low = torch.zeros_like(high)
    right = certified(chain, x, y, low, norm=norm, method="ibp")  # exact margins at eps 0
    high[~right] = 0
    calls = 1 + _probe_top(chain, x, y, low, high, corner, opts)
    for _ in range(max_iter):
        rows = (torch.isfinite(high) & (high - low > rtol * high)).nonzero().squeeze(1)
        if len(rows) == 0:
            break
        mid = (low + high) / 2
        ok = _certify(chain, x, y, rows, mid, opts)
        calls += 1
        low[rows[ok]] = mid[rows[ok]]
        high[rows[~ok]] = mid[rows[~ok]]
    return CertifiedRadius(low, high, calls)
