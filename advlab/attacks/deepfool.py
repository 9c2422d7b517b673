"""DeepFool under the L2 norm (Moosavi-Dezfooli et al. 2016), batched with per-example state.

Each step linearises the logits at the current point and moves to the nearest linearised class
boundary: untargeted, the nearest boundary between the label and any other class; targeted, the
boundary of the constraint "target beats k" most violated (in linearised distance) among the
classes k currently ahead of the target. The total perturbation is scaled by 1 + overshoot and
clipped to the box; an example stops as soon as it is adversarial, so the batch shrinks as
examples finish and no example's steps depend on another's.

A minimisation attack: one run gives the whole success-vs-budget curve. `refine_steps` > 0 bisects
each result back toward x along its own direction (`shrink_toward_input`), which removes the
overshoot and any overstep; it is off by default (the paper's algorithm).
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
    finish,
    is_adversarial,
    merged_settings,
    prepare,
    run_targets,
    shrink_toward_input,
)


class DeepFoolSettings(Settings):
    steps: int = Field(50, ge=1)  # linearised steps per example (each K class gradients)
    overshoot: float = Field(0.02, ge=0)  # the total perturbation is scaled by 1 + overshoot
    refine_steps: int = Field(0, ge=0)  # bisections of the result back toward x (0: the paper's)
    candidates: int | None = Field(None, ge=1)  # target "all": only the k nearest classes


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    settings: DeepFoolSettings | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """L2 DeepFool. target None/"untargeted" (the paper's), a tensor, "random" or "all".

    `settings` (DeepFoolSettings() when None) with any field replaced by keyword. grad_evals
    counts one per class gradient (one backward pass per class and step, including the pass
    that finds an example already adversarial). `candidates` applies to target="all" (see
    `closest_over_targets`).
    """
    s = merged_settings(DeepFoolSettings, settings, overrides, "deepfool")
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    args = (k, s.steps, s.overshoot, s.refine_steps)
    return run_targets(
        model,
        x,
        y,
        resolved,
        k,
        lambda xs, ys, ts: _deepfool(model, xs, ys, ts, *args),
        candidates=s.candidates,
    )


def class_gradients(model: nn.Module, x: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Logits (n, K) and their input gradients (n, K, D), one backward pass per class."""
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    grads = []
    for c in range(num_classes):
        (g,) = torch.autograd.grad(logits[:, c].sum(), xg, retain_graph=c < num_classes - 1)
        grads.append(g.flatten(1))
    return logits.detach(), torch.stack(grads, dim=1)


def _deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    num_classes: int,
    steps: int,
    overshoot: float,
    refine_steps: int,
) -> AttackResult:
    n = len(x)
    flat = x.flatten(1)
    x_adv = flat.clone()
    r_tot = torch.zeros_like(flat)
    evals = torch.zeros(n, dtype=torch.int64, device=x.device)
    active = torch.arange(n, device=x.device)
    shape = tuple(x.shape[1:])
    for _ in range(steps + 1):
        if active.numel() == 0:
            break
        logits, grads = class_gradients(model, x_adv[active].view(-1, *shape), num_classes)
        ya = y[active]
        ta = None if target is None else target[active]
        done = is_adversarial(logits, ya, ta)
        evals[active] += num_classes
        keep = ~done
        active, logits, grads, ya = active[keep], logits[keep], grads[keep], ya[keep]
        if active.numel() == 0:
            break
        if target is None:
            step = _untargeted_step(logits, grads, ya)
        else:
            step = _targeted_step(logits, grads, target[active])
        r_tot[active] += step
        x_adv[active] = (flat[active] + (1 + overshoot) * r_tot[active]).clamp(0.0, 1.0)
    x_adv = x_adv.view_as(x)
    x_adv = shrink_toward_input(model, x, x_adv, y, target, refine_steps)
    return finish(model, x_adv, y, target, evals)


def _untargeted_step(logits: Tensor, grads: Tensor, y: Tensor) -> Tensor:
    """Step onto the nearest linearised boundary between the label and another class."""
    own_logit = logits.gather(1, y[:, None])  # (n, 1)
    own_grad = grads[torch.arange(len(y), device=y.device), y]  # (n, D)
    f = logits - own_logit  # (n, K) < 0 for every other class while not yet fooled
    w = grads - own_grad[:, None]  # (n, K, D)
    w_norm = w.norm(dim=2).clamp_min(1e-12)
    dist = f.abs() / w_norm
    dist.scatter_(1, y[:, None], math.inf)
    k = dist.argmin(dim=1)
    return _project(f, w, w_norm, k)


def _targeted_step(logits: Tensor, grads: Tensor, target: Tensor) -> Tensor:
    """Step onto the boundary of the most violated linearised constraint "target beats k"."""
    rows = torch.arange(len(target), device=target.device)
    f = logits - logits[rows, target][:, None]  # (n, K) > 0 where k is ahead of the target
    w = grads - grads[rows, target][:, None]
    w_norm = w.norm(dim=2).clamp_min(1e-12)
    dist = torch.where(f >= 0, f / w_norm, -math.inf)
    dist[rows, target] = -math.inf
    k = dist.argmax(dim=1)
    return _project(f, w, w_norm, k)


def _project(f: Tensor, w: Tensor, w_norm: Tensor, k: Tensor) -> Tensor:
    """The minimal step r with f_k + w_k . r = 0 (slightly past it): r = -f_k w_k / ||w_k||^2.

    For the untargeted step f_k < 0 and the step raises z_k - z_y to 0; for the targeted one
    f_k >= 0 and it lowers z_k - z_t to 0. The 1e-4 pushes just past the boundary, as in the
    paper's reference code.
    """
    rows = torch.arange(len(k), device=k.device)
    fk, wk, nk = f[rows, k], w[rows, k], w_norm[rows, k]
    scale = (fk.abs() + 1e-4) / nk.square()
    sign = torch.where(fk < 0, 1.0, -1.0).to(wk.dtype)
    return (sign * scale)[:, None] * wk
