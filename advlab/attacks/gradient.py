"""Fixed-budget gradient attacks: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018) under
the Linf or L2 norm. Each call runs at one budget; run once per budget for a curve.

Targets (`target=`): None or "untargeted" raises the cross-entropy of the label; a (B,) tensor or
"random" lowers the cross-entropy of the target class; "all" attacks every wrong class and keeps,
per example, the successful image closest to x in the attack's norm.

eps and norm are the threat model, arguments of the call; the settings models tune the search.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    Settings,
    Target,
    check_budget,
    check_norm,
    example_generators,
    example_rand,
    example_randn,
    finish,
    merged_settings,
    prepare,
    run_targets,
)
from advlab.runtime import RowObjective, chunk_rows, input_gradient


class FGSMSettings(Settings):
    """FGSM has no knobs: one signed step of exactly eps."""


class PGDSettings(Settings):
    steps: int = Field(40, ge=1)  # gradient steps per restart
    restarts: int = Field(1, ge=1)  # runs from fresh random starts, for examples not yet fooled
    step_size: float | None = Field(None, ge=0)  # None: 2.5 * eps / steps (Madry et al.)
    random_start: bool = True  # start uniformly in the eps-ball (else at x)


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the cross-entropy wrt x, per example (summed loss, so rows do not interact)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _ascent(grad: Tensor, target: Tensor | None) -> Tensor:
    """The direction that helps the attack: up the label's loss, or down the target's."""
    return grad if target is None else -grad


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    target: Target = None,
    settings: FGSMSettings | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """FGSM: x_adv = clamp(x + eps * sign(grad), 0, 1), up the label's CE or down the target's.

    `settings` and `overrides` exist for the shared calling convention; FGSM has no knobs.
    """
    merged_settings(FGSMSettings, settings, overrides, "fgsm")
    eps = check_budget("eps", eps)
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    return run_targets(
        model, x, y, resolved, k, lambda xs, ys, ts: _fgsm(model, xs, ys, ts, eps), norm="linf"
    )


def _fgsm(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, eps: float
) -> AttackResult:
    if eps == 0:
        # The identity: skip the gradient so eps=0 costs nothing and reports 0 evaluations.
        return finish(model, x, y, target, torch.zeros(len(x), dtype=torch.int64))
    grad = _ascent(loss_gradient(model, x, y if target is None else target), target)
    x_adv = (x + eps * grad.sign()).clamp(0.0, 1.0)
    return finish(model, x_adv, y, target, torch.ones(len(x), dtype=torch.int64))


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    target: Target = None,
    settings: PGDSettings | None = None,
    *,
    norm: str = "linf",
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """PGD: `steps` normalised-gradient steps projected onto the eps-ball (Linf or L2) and the box.

    `settings` (PGDSettings() when None) with any field replaced by keyword (`steps=20`).
    Linf steps along sign(grad); L2 along grad / ||grad||_2. Each restart starts uniformly in
    the eps-ball (when random_start) from a per-example stream seeded by `generator` (seed 0
    when None) and the example's own pixels, so an example's result does not depend on its
    batch. An example keeps its first fooling iterate (success never decreases with more
    steps) and skips later restarts; an example never fooled returns the restart whose end
    point had the highest loss.
    """
    s = merged_settings(PGDSettings, settings, overrides, "pgd")
    eps = check_budget("eps", eps)
    norm = check_norm(norm)
    step = 2.5 * eps / s.steps if s.step_size is None else s.step_size
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    args = (eps, norm, s.steps, step, s.random_start, s.restarts, generator)
    return run_targets(
        model, x, y, resolved, k, lambda xs, ys, ts: _pgd(model, xs, ys, ts, *args), norm=norm
    )


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    eps: float,
    norm: str,
    steps: int,
    step: float,
    random_start: bool,
    restarts: int,
    generator: torch.Generator | None,
) -> AttackResult:
    n = len(x)
    evals = torch.zeros(n, dtype=torch.int64, device=x.device)
    if eps == 0:
        return finish(model, x, y, target, evals)
    # Per-example streams keyed on the example and its target, drawn once for all restarts.
    gens = example_generators(x, generator, target) if random_start else []
    best = x.clone()
    best_loss = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        rows = (~fooled).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        start = x[rows]
        if random_start:
            start = _random_start(x[rows], eps, norm, [gens[i] for i in rows.tolist()])
        x_end, loss, hit, n_evals = _pgd_run(
            model, x[rows], y[rows], None if target is None else target[rows], start, eps, norm,
            steps, step,
        )  # fmt: skip
        evals[rows] += n_evals
        better = hit | (loss > best_loss[rows])
        best[rows[better]] = x_end[better]
        best_loss[rows] = torch.maximum(best_loss[rows], loss)
        fooled[rows[hit]] = True
    return finish(model, best, y, target, evals)


def _random_start(x: Tensor, eps: float, norm: str, gens: list[torch.Generator]) -> Tensor:
    """A point uniform in the eps-ball around each row, clipped to the box (stays in the ball)."""
    shape = tuple(x.shape[1:])
    if norm == "linf":
        return (x + eps * (2 * example_rand(gens, shape, x) - 1)).clamp(0.0, 1.0)
    # Uniform in the L2 ball: a Gaussian direction and a radius eps * U^(1/D).
    direction = example_randn(gens, shape, x).flatten(1)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = torch.stack([torch.rand((), generator=g, dtype=x.dtype) for g in gens]).to(x.device)
    radius = eps * u.pow(1.0 / direction.shape[1])
    return (x + (radius[:, None] * direction).view_as(x)).clamp(0.0, 1.0)


def _ce(model: nn.Module, goal: Tensor) -> RowObjective:
    """Cross-entropy toward `goal` per row; returns the loss and the logits too."""

    def ce(xa: Tensor, rows: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        logits = model(xa)
        loss = F.cross_entropy(logits, goal[rows], reduction="none")
        return loss, (loss, logits)

    return ce


def _pgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    start: Tensor,
    eps: float,
    norm: str,
    steps: int,
    step: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One PGD run from `start`; (end points, their loss, fooled mask, evals per row)."""
    n = len(x)
    goal = y if target is None else target
    x_adv = start.clone()
    evals = torch.zeros(n, dtype=torch.int64, device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    loss_end = torch.zeros(n, dtype=x.dtype, device=x.device)
    view = (-1, *[1] * (x.ndim - 1))
    chunk = chunk_rows(model, x)
    for i in range(steps + 1):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xa = x_adv[active]
        if i == steps:  # the last iterate is only scored: no gradient, no step after it
            with torch.no_grad():
                loss, logits = _ce(model, goal[active])(xa, slice(0, len(xa)))[1]
        else:
            grad, (loss, logits) = input_gradient(_ce(model, goal[active]), xa, chunk)
        hit = logits.argmax(1)
        hit = hit != y[active] if target is None else hit == target[active]
        loss_end[active] = loss if target is None else -loss
        fooled[active[hit]] = True
        if i == steps:
            break
        evals[active] += 1
        # Freeze examples already fooled at their current point; step the others.
        moving = active[~hit]
        g = _ascent(grad[~hit], target)
        if norm == "linf":
            stepped = xa.detach()[~hit] + step * g.sign()
            x0 = x[moving]
            stepped = torch.minimum(torch.maximum(stepped, x0 - eps), x0 + eps).clamp(0.0, 1.0)
        else:
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            stepped = (xa.detach()[~hit] + step * g / gn).clamp(0.0, 1.0)
            delta = stepped - x[moving]
            dn = delta.flatten(1).norm(dim=1).view(view)
            # Scaling toward x keeps the box: x + s * delta (0 <= s <= 1) lies between two points
            # that are in it.
            stepped = x[moving] + delta * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)
        x_adv[moving] = stepped
    return x_adv, loss_end, fooled, evals
