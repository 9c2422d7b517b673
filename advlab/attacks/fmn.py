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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    Target,
    adversarial_margin,
    check_norm,
    finish,
    prepare,
    run_targets,
)
from advlab.attacks.ddn import BestPoints
from advlab.optim import box_move_bounds
from advlab.runtime import RowObjective, chunk_rows, input_gradient


@dataclass(frozen=True)
class FMNSettings:
    norm: str = "l2"  # the norm minimised: "l2" or "linf"
    steps: int = 100  # gradient steps (one evaluation each)
    alpha_init: float = 1.0  # first step size (L2 length of the normalised gradient step)
    alpha_final: float | None = None  # last step size; None: alpha_init / 100
    gamma_init: float = 0.05  # first factor by which eps moves
    gamma_final: float = 0.001  # last factor
    margin: float = 1e-5  # logit lead an iterate needs to be kept as adversarial

    def validated(self) -> FMNSettings:
        check_norm(self.norm)
        if int(self.steps) < 1:
            raise AttackError(f"steps: must be an integer >= 1, got {self.steps}")
        final = self.alpha_init / 100 if self.alpha_final is None else self.alpha_final
        for name, value in (("alpha_init", self.alpha_init), ("alpha_final", final)):
            if not (math.isfinite(value) and value > 0):
                raise AttackError(f"{name}: must be a finite number > 0, got {value}")
        for name in ("gamma_init", "gamma_final"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise AttackError(f"{name}: must be a number in [0, 1), got {value}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise AttackError(f"margin: must be a finite number >= 0, got {self.margin}")
        return FMNSettings(
            self.norm, int(self.steps), float(self.alpha_init), float(final),
            float(self.gamma_init), float(self.gamma_final), float(self.margin),
        )  # fmt: skip


def fmn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    *,
    norm: str = "l2",
    steps: int = 100,
    alpha_init: float = 1.0,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    margin: float = 1e-5,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    candidates: int | None = None,
) -> AttackResult:
    """FMN minimising the L2 or Linf norm (`norm`). target None/"untargeted", a tensor,
    "random" or "all" (closest in `norm`).

    Returns each example's closest adversarial point seen (x itself where none was found);
    grad_evals is `steps` per example (per target under "all").
    """
    s = FMNSettings(
        norm, steps, alpha_init, alpha_final, gamma_init, gamma_final, margin
    ).validated()
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    return run_targets(
        model,
        x,
        y,
        resolved,
        k,
        lambda xs, ys, ts: _fmn(model, xs, ys, ts, s),
        norm=s.norm,
        candidates=candidates,
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
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, s: FMNSettings
) -> AttackResult:
    flat, shape = x.flatten(1), tuple(x.shape[1:])
    n = len(x)
    delta = torch.zeros_like(flat)
    eps = torch.full((n,), math.inf, dtype=flat.dtype, device=flat.device)
    worst = _norm(torch.maximum(flat, 1 - flat), s.norm)
    best = BestPoints(flat)
    found, all_found = torch.zeros(n, dtype=torch.bool, device=flat.device), False
    size = torch.zeros_like(eps)  # the norm of delta
    # z = flat + delta, in the box; every (n, D) buffer is reused in place across steps
    # (on small models, fresh (n, D) tensors cost as much as the arithmetic).
    z, lo, hi = flat.clone(), torch.empty_like(flat), torch.empty_like(flat)
    box = (-flat, 1 - flat)  # delta's bounds
    objective, chunk = _gap_objective(model, y, target, shape), chunk_rows(model, x)
    for i in range(s.steps):
        alpha = _cosine(i, s.steps, s.alpha_init, s.alpha_final)  # type: ignore[arg-type]
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
            dual = g_l2 if s.norm == "l2" else g.abs().sum(dim=1)
            # Aim a little past the linearised boundary: aimed exactly at it, a linear model's
            # iterates land on the boundary itself and tie there forever (argmax either way).
            to_boundary = size + (_AIM + s.margin - gap).clamp_min(0) / dual.clamp_min(1e-12)
            grown = torch.where(found, grown, to_boundary)
        eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best.dist), grown).minimum(worst)
        delta.addcmul_(g, (alpha / g_l2.clamp_min(1e-12))[:, None])
        size = _step_into(z, flat, delta, box, eps, s.norm)
        del g  # frees its buffer for the next gradient before that is allocated
    evals = torch.full((n,), s.steps, dtype=torch.int64, device=x.device)
    return finish(model, best.x.view_as(x), y, target, evals)
