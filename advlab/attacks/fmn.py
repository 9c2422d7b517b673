"""Fast Minimum-Norm attack (FMN; Pintor et al. 2021), L2 and Linf, batched per example.

Each step ascends the logit difference (best wrong class minus the label's logit, untargeted;
the target's logit minus the best other, targeted) along its gradient normalised to unit L2
length, with a step size annealed on a cosine from alpha_init to alpha_final, then clips delta
to the box and projects it onto the norm ball of the example's radius eps. eps is
driven toward the boundary: while no adversarial point was ever found it is set to the current
norm plus the linearised distance to the boundary (|loss| / dual norm of the gradient); after an
adversarial step it shrinks by (1 - gamma) (never above the best norm found), after a
non-adversarial one it grows by (1 + gamma); gamma is annealed on a cosine too. Each example
keeps the closest adversarial point it evaluated, measured in the attack's norm.

Every operation is row-wise, so an example's result never depends on its batch-mates. One
gradient evaluation per step and example.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    Settings,
    Target,
    adversarial_margin,
    check_norm,
    finish,
    merged_settings,
    prepare,
    run_targets,
)
from advlab.attacks.ddn import BestPoints
from advlab.optim import box_move_bounds
from advlab.runtime import RowObjective, chunk_rows, input_gradient


class FMNSettings(Settings):
    steps: int = Field(100, ge=1)  # gradient steps (one evaluation each)
    alpha_init: float = Field(1.0, gt=0)  # first step size (L2 length of the normalised step)
    alpha_final: float | None = Field(None, gt=0)  # last step size; None: alpha_init / 100
    gamma_init: float = Field(0.05, ge=0, lt=1)  # first factor by which eps moves
    gamma_final: float = Field(0.001, ge=0, lt=1)  # last factor
    margin: float = Field(1e-5, ge=0)  # logit lead an iterate needs to be kept as adversarial
    candidates: int | None = Field(None, ge=1)  # target "all": only the k nearest classes

    @property
    def last_alpha(self) -> float:
        """alpha_final, or alpha_init / 100 when it is None."""
        return self.alpha_init / 100 if self.alpha_final is None else self.alpha_final


def fmn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    settings: FMNSettings | None = None,
    *,
    norm: str = "l2",
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """FMN minimising the L2 or Linf norm (`norm`). target None/"untargeted", a tensor,
    "random" or "all" (closest in `norm`).

    `settings` (FMNSettings() when None) with any field replaced by keyword (`steps=50`).
    Returns each example's closest adversarial point seen (x itself where none was found);
    grad_evals is `steps` per example (per target under "all").
    """
    s = merged_settings(FMNSettings, settings, overrides, "fmn")
    norm = check_norm(norm)
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    return run_targets(
        model,
        x,
        y,
        resolved,
        k,
        lambda xs, ys, ts: _fmn(model, xs, ys, ts, s, norm),
        norm=norm,
        candidates=s.candidates,
    )


_AIM = 1e-3  # logits past the boundary that a search from no success aims at


def _norm(v: Tensor, norm: str) -> Tensor:
    return v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)


def _step_into(
    z: Tensor, flat: Tensor, delta: Tensor, bounds: tuple[Tensor, Tensor], eps: Tensor, norm: str
) -> Tensor:
    """Clip delta to the box, project it onto the eps ball in place, z = flat + delta.

    Returns the norm of the new delta. Clipping first drops the push of box-pinned coordinates
    before the projection scales the rest. z needs no clamp: with round-to-nearest,
    flat + fl(1 - flat) never rounds above 1 (fl's error is under half the float spacing above
    1), scaling by <= 1 only shrinks delta, and rounding is monotone.
    """
    delta.clamp_(*bounds)
    size = _norm(delta, norm)
    if norm == "l2":
        scale = (eps / size.clamp_min(1e-12)).clamp(max=1.0)
        delta.mul_(scale[:, None])
        size = size * scale
    else:
        delta.clamp_(min=-eps[:, None], max=eps[:, None])
        size = torch.minimum(size, eps)
    torch.add(flat, delta, out=z)
    return size


def _pin_unfound(z: Tensor, g: Tensor, found: Tensor, out: tuple[Tensor, Tensor]) -> Tensor:
    """g with the box-pinned coordinates zeroed on the rows not yet fooled (in place)."""
    lo, hi = box_move_bounds(z, ascent=True, out=out)
    done = found.nonzero().squeeze(1)
    lo.index_fill_(0, done, -math.inf)
    hi.index_fill_(0, done, math.inf)
    return g.clamp_(lo, hi)


def _cosine(i: int, steps: int, start: float, end: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * i / steps)) / 2


def _gap_objective(
    model: nn.Module, y: Tensor, target: Tensor | None, shape: tuple[int, ...]
) -> RowObjective:
    def gap(leaf: Tensor, rows: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        logits = model(leaf.view(-1, *shape))
        value = adversarial_margin(logits, y[rows], None if target is None else target[rows])
        return value, (value,)

    return gap


def _fmn(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, s: FMNSettings, norm: str
) -> AttackResult:
    flat, shape = x.flatten(1), tuple(x.shape[1:])
    n = len(x)
    delta = torch.zeros_like(flat)
    eps = torch.full((n,), math.inf, dtype=flat.dtype, device=flat.device)
    worst = _norm(torch.maximum(flat, 1 - flat), norm)
    best = BestPoints(flat)
    found, all_found = torch.zeros(n, dtype=torch.bool, device=flat.device), False
    size = torch.zeros_like(eps)  # the norm of delta
    # z = flat + delta, in the box; every (n, D) buffer is reused in place across steps
    # (on small models, fresh (n, D) tensors cost as much as the arithmetic).
    z, lo, hi = flat.clone(), torch.empty_like(flat), torch.empty_like(flat)
    box = (-flat, 1 - flat)  # delta's bounds
    objective, chunk = _gap_objective(model, y, target, shape), chunk_rows(model, x)
    for i in range(s.steps):
        alpha = _cosine(i, s.steps, s.alpha_init, s.last_alpha)
        gamma = _cosine(i, s.steps, s.gamma_init, s.gamma_final)
        g, (gap,) = input_gradient(objective, z, chunk)  # gap > 0: adversarial
        adv = gap > s.margin
        best.keep(z, size, adv)
        if not all_found:  # most steps come after every example was fooled: skip this
            found |= adv
            all_found = bool(found.all())
            # Until a row is fooled its box-pinned coordinates are dropped: they would make the
            # linearised distance to the boundary look shorter than it is. Afterwards its steps
            # are normalised by the whole gradient, as in the original FMN (the box clip in
            # _step_into still stops the pinned push); pinning those too moved no mean L2 of
            # the benchmark nets in the 4th digit and cost three (n, D) passes a step.
            g = _pin_unfound(z, g, found, (lo, hi))
        g_l2 = g.norm(dim=1)
        grown = eps * (1 + gamma)
        if not all_found:
            dual = g_l2 if norm == "l2" else g.abs().sum(dim=1)
            # Aim a little past the linearised boundary: aimed exactly at it, a linear model's
            # iterates land on the boundary itself and tie there forever (argmax either way).
            to_boundary = size + (_AIM + s.margin - gap).clamp_min(0) / dual.clamp_min(1e-12)
            grown = torch.where(found, grown, to_boundary)
        eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best.dist), grown).minimum(worst)
        delta.addcmul_(g, (alpha / g_l2.clamp_min(1e-12))[:, None])
        size = _step_into(z, flat, delta, box, eps, norm)
        del g  # frees its buffer for the next gradient before that is allocated
    evals = torch.full((n,), s.steps, dtype=torch.int64, device=x.device)
    return finish(model, best.x.view_as(x), y, target, evals)
