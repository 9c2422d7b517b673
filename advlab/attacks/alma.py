"""Augmented Lagrangian attack (ALMA; Rony et al. 2021), L2, batched with per-example state.

Minimises ||delta||_2 subject to a constraint g(x + delta) <= 0 that holds on adversarial
points: g is the difference of logits ratio (DLR, Croce & Hein 2020), the logit margin by which
the point is *not* adversarial (plus a small tolerance) divided by a spread of the top logits,
so its scale does not depend on the logits'. Each step descends ||delta|| + P2(g; rho, mu) (the
penalty-Lagrangian of Birgin et al. 2005) with RMSProp and momentum, clipped to the box; the
first step descends the penalty alone (the norm has no gradient at delta = 0). The multiplier mu
follows an average of the penalty's slope dP2/dg, and the penalty weight rho grows by gamma every
`check_steps` steps while an example has never been adversarial and g has not fallen by a
factor tau. The step size decays exponentially from lr_init to lr_init * lr_reduction over the
steps left after an example's first success. Each example keeps the closest adversarial point
it evaluated.

The penalty's slope is written out in closed form, so each step costs one gradient of g (one
evaluation); every operation is row-wise and nothing is random, so an example's result never
depends on its batch-mates or on a generator.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    Settings,
    Target,
    adversarial_margin,
    finish,
    merged_settings,
    prepare,
    run_targets,
)
from advlab.attacks.ddn import BestPoints
from advlab.runtime import RowObjective, chunk_rows, input_gradient


class ALMASettings(Settings):
    steps: int = Field(1000, ge=1)  # gradient steps (one evaluation each)
    lr_init: float = Field(0.1, gt=0)  # RMSProp step size until the first success
    lr_reduction: float = Field(0.01, gt=0, le=1)  # the last step's size, a fraction of lr_init
    mu_init: float = Field(1.0, gt=0)  # Lagrange multiplier
    rho_init: float = Field(1.0, gt=0)  # penalty weight
    check_steps: int = Field(10, ge=1)  # steps between checks of the constraint's progress
    tau: float = Field(0.95, gt=0, le=1)  # the constraint must shrink by this factor per check...
    gamma: float = Field(1.2, ge=1)  # ...or rho grows by this factor (until a success)
    alpha: float = Field(0.9, gt=0, le=1)  # averaging weight of mu, RMSProp's squares, momentum
    margin: float = Field(1e-5, ge=0)  # logit lead an iterate needs to be kept as adversarial
    candidates: int | None = Field(None, ge=1)  # target "all": only the k nearest classes


def alma(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    settings: ALMASettings | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """ALMA-L2. target None/"untargeted" (default), a tensor, "random" or "all".

    `settings` (ALMASettings() when None) with any field replaced by keyword (`steps=50`,
    `mu_init=0.5`). Returns each example's closest adversarial point seen (x itself where none
    was found); grad_evals is `steps` per example (per target under "all"). The generator only
    draws random targets.
    """
    s = merged_settings(ALMASettings, settings, overrides, "alma")
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    return run_targets(
        model, x, y, resolved, k, lambda xs, ys, ts: _alma(model, xs, ys, ts, s),
        candidates=s.candidates,
    )  # fmt: skip


def dlr_constraint(logits: Tensor, y: Tensor, target: Tensor | None, margin: float) -> Tensor:
    """(B,) g: (margin - adversarial margin) / logit spread; g < 0 exactly where adversarial.

    The spread (top logit minus the third, untargeted; minus the mean of the third and fourth,
    targeted) makes g invariant to scaling the logits. With too few classes for it (fewer than
    3, or 4 targeted) the spread is taken as 1.
    """
    gap = adversarial_margin(logits, y, target)
    need = 3 if target is None else 4
    if logits.shape[1] < need:
        return margin - gap
    top = logits.topk(need, dim=1).values
    low = top[:, 2] if target is None else (top[:, 2] + top[:, 3]) / 2
    return (margin - gap) / (top[:, 0] - low + 1e-8)


def p2_slope_parts(g: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) with dP2/dg = mu * scale + shift, for the penalty-Lagrangian
    P2(g) = mu g + mu rho g^2 + rho^2 g^3 / 6 (g >= 0), mu g / (1 - rho g) (g < 0).

    Split so that a step's slope at the old and the new mu costs one evaluation.
    """
    above = g >= 0
    scale = torch.where(above, 1 + 2 * rho * g, (1 - rho * g.clamp(max=0)) ** -2)
    return scale, torch.where(above, 0.5 * (rho * g) ** 2, 0.0)


def _constraint(
    model: nn.Module, y: Tensor, target: Tensor | None, shape: tuple[int, ...], margin: float
) -> RowObjective:
    def g(leaf: Tensor, rows: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        t = None if target is None else target[rows]
        value = dlr_constraint(model(leaf.view(-1, *shape)), y[rows], t, margin)
        return value, (value,)

    return g


def _alma(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, s: ALMASettings
) -> AttackResult:
    flat, shape, n = x.flatten(1), tuple(x.shape[1:]), len(x)
    opts = {"dtype": flat.dtype, "device": flat.device}
    delta, z = torch.zeros_like(flat), flat.clone()
    square_avg, momentum, root = torch.ones_like(flat), torch.zeros_like(flat), flat.clone()
    mu, rho = torch.full((n,), s.mu_init, **opts), torch.full((n,), s.rho_init, **opts)
    size, decay = torch.full((n,), s.lr_init, **opts), torch.ones(n, **opts)
    found = torch.zeros(n, dtype=torch.bool, device=flat.device)
    best, previous = BestPoints(flat), None
    objective, chunk = _constraint(model, y, target, shape, s.margin), chunk_rows(model, x)
    for i in range(s.steps):
        dg, (g,) = input_gradient(objective, z, chunk)
        if previous is None:
            previous = g
        elif (i + 1) % s.check_steps == 0:
            rho, previous = grown_penalty_weight(rho, g, previous, found, s), g
        scale, shift = p2_slope_parts(g, rho)
        if i > 0:
            mu = mu.lerp(mu * scale + shift, 1 - s.alpha).clamp(1e-6, 1e12)
        adv, dist = g < 0, delta.norm(dim=1)
        # From a row's first success its step size decays to lr_reduction at the last step
        # (no host sync to test for one: on a GPU that would stall every step).
        decay = torch.where(adv & ~found, s.lr_reduction ** (1 / (s.steps - i)), decay)
        found |= adv
        best.keep(z, dist, adv)
        step = dg.mul_((mu * scale + shift)[:, None])
        if i > 0:  # the norm has no gradient at delta = 0, where the first step starts
            step.addcdiv_(delta, dist.clamp_min(1e-12)[:, None])
        _rmsprop(step, square_avg, momentum, root, s.alpha)
        z.addcmul_(momentum, size[:, None], value=-1).clamp_(0.0, 1.0)
        torch.sub(z, flat, out=delta)
        size.mul_(decay)
    evals = torch.full((n,), s.steps, dtype=torch.int64, device=x.device)
    return finish(model, best.x.view_as(x), y, target, evals)


def grown_penalty_weight(
    rho: Tensor, g: Tensor, previous: Tensor, found: Tensor, s: ALMASettings
) -> Tensor:
    """rho times gamma on rows never adversarial whose g has not fallen below tau * previous."""
    return torch.where(~found & (g >= s.tau * previous), rho * s.gamma, rho)


def _rmsprop(g: Tensor, square_avg: Tensor, momentum: Tensor, root: Tensor, alpha: float) -> None:
    """RMSProp with momentum, in place (square_avg starts at ones, momentum at zeros; root is
    scratch space)."""
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    momentum.mul_(alpha).addcdiv_(g, torch.sqrt(square_avg, out=root).add_(1e-8))
