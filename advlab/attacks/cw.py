"""Carlini & Wagner (2017) L2 attack, batched with per-example state.

The box is removed by the tanh reparametrisation x_adv = (tanh(w) + 1) / 2, and for a weight c
Adam minimises over w

    ||x_adv - x||_2^2 + c * max(max_{j != t} z_j - z_t, -kappa)     (targeted, class t)
    ||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)     (untargeted)

A per-example binary search on c (start c_init; x10 while an example has never succeeded, then
bisect between the largest failing and the smallest successful c) runs `search_steps` rounds of
`steps` Adam iterations, each round restarting from w = atanh(2x - 1) as in the authors' code.
Every example keeps the closest adversarial iterate seen in any round. Early abort is per
example: every steps // 10 iterations an example whose objective has not dropped by 0.01%
stops for that round. Adam is element-wise, so rows never interact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    Target,
    adversarial_margin,
    finish,
    prepare,
    run_targets,
)

# Keeps atanh finite at pixels 0 and 1 (the authors' code uses the same factor).
_TANH_SHRINK = 1 - 1e-6


def carlini_wagner(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    *,
    steps: int = 1000,
    search_steps: int = 9,
    c_init: float = 1e-3,
    lr: float = 1e-2,
    kappa: float = 0.0,
    abort_early: bool = True,
    margin: float = 1e-5,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    candidates: int | None = None,
) -> AttackResult:
    """C&W-L2. target None/"untargeted", a tensor, "random" or "all" (`candidates` applies).

    Defaults follow the authors' code except steps (1000, not 10000). An iterate counts as
    adversarial when it is so by more than `margin` logits, so a kept image cannot flip under
    another batch size's round-off. grad_evals counts Adam iterations (one gradient each).
    """
    for name, value in (("steps", steps), ("search_steps", search_steps)):
        if int(value) < 1:
            raise AttackError(f"{name}: must be an integer >= 1, got {value}")
    for name, value in (("c_init", c_init), ("lr", lr)):
        if not (math.isfinite(value) and value > 0):
            raise AttackError(f"{name}: must be a finite number > 0, got {value}")
    for name, value in (("kappa", kappa), ("margin", margin)):
        if not (math.isfinite(value) and value >= 0):
            raise AttackError(f"{name}: must be a finite number >= 0, got {value}")
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="untargeted"
    )
    settings = (int(steps), int(search_steps), c_init, lr, kappa, abort_early, margin)
    return run_targets(
        model,
        x,
        y,
        resolved,
        k,
        lambda xs, ys, ts: _cw(model, xs, ys, ts, *settings),
        candidates=candidates,
    )


def _cw(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    steps: int,
    search_steps: int,
    c_init: float,
    lr: float,
    kappa: float,
    abort_early: bool,
    margin: float,
) -> AttackResult:
    n = len(x)
    flat = x.flatten(1)
    dev = x.device
    w0 = torch.atanh((2 * flat - 1) * _TANH_SHRINK)
    c = torch.full((n,), c_init, dtype=torch.float64, device=dev)
    lo = torch.zeros(n, dtype=torch.float64, device=dev)  # largest c that failed
    hi = torch.full((n,), math.inf, dtype=torch.float64, device=dev)  # smallest that succeeded
    best_sq = torch.full((n,), math.inf, dtype=x.dtype, device=dev)
    best_x = flat.clone()
    evals = torch.zeros(n, dtype=torch.int64, device=dev)
    shape = tuple(x.shape[1:])
    # An input that is already adversarial is its own closest success.
    with torch.no_grad():
        already = adversarial_margin(model(x), y, target) > margin
    best_sq[already] = 0.0
    rows_left = (~already).nonzero().squeeze(1)
    for _ in range(search_steps):
        if rows_left.numel() == 0:
            break
        found = _cw_round(
            model, flat, y, target, w0, c, rows_left, steps, lr, kappa, abort_early, margin,
            best_sq, best_x, evals, shape,
        )  # fmt: skip
        r = rows_left
        hi[r] = torch.where(found, torch.minimum(hi[r], c[r]), hi[r])
        lo[r] = torch.where(found, lo[r], torch.maximum(lo[r], c[r]))
        c[r] = torch.where(torch.isinf(hi[r]), c[r] * 10, (lo[r] + hi[r]) / 2)
    return finish(model, best_x.view_as(x), y, target, evals)


def _cw_round(
    model: nn.Module,
    flat: Tensor,
    y: Tensor,
    target: Tensor | None,
    w0: Tensor,
    c_all: Tensor,
    rows: Tensor,
    steps: int,
    lr: float,
    kappa: float,
    abort_early: bool,
    margin: float,
    best_sq: Tensor,
    best_x: Tensor,
    evals: Tensor,
    shape: tuple[int, ...],
) -> Tensor:
    """One round of Adam at fixed c for `rows`; updates the bests in place; (found (m,),)."""
    m = len(rows)
    found = torch.zeros(m, dtype=torch.bool, device=flat.device)
    live = torch.arange(m, device=flat.device)  # positions in `rows` still iterating
    w = w0[rows].clone()
    x0, yy = flat[rows], y[rows]
    tt = None if target is None else target[rows]
    c = c_all[rows].to(flat.dtype)
    m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
    prev = torch.full((m,), math.inf, dtype=flat.dtype, device=flat.device)
    check_every = max(1, steps // 10)
    beta1, beta2 = 0.9, 0.999
    for i in range(1, steps + 1):
        wv = w.detach().requires_grad_(True)
        xa = (torch.tanh(wv) + 1) / 2
        logits = model(xa.view(-1, *shape))
        gap = adversarial_margin(logits, yy[live], None if tt is None else tt[live])
        dist = (xa - x0[live]).square().sum(dim=1)
        loss = dist + c[live] * (-gap).clamp_min(-kappa)
        (grad,) = torch.autograd.grad(loss.sum(), wv)
        evals[rows[live]] += 1
        # Keep the closest adversarial point of this iterate (before the step).
        adv = gap.detach() > margin
        d = dist.detach()
        glob = rows[live]
        closer = adv & (d < best_sq[glob])
        if bool(closer.any()):
            best_sq[glob[closer]] = d[closer]
            best_x[glob[closer]] = xa.detach()[closer]
        found[live[adv]] = True
        # Adam, element-wise, with bias correction (so the rows never interact).
        m1.mul_(beta1).add_(grad, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = lr / (1 - beta1**i)
        denom = (m2 / (1 - beta2**i)).sqrt_().add_(1e-8)
        w = w - step * m1 / denom
        if abort_early and i % check_every == 0:
            current = loss.detach()
            stuck = current > prev[live] * 0.9999
            prev[live] = current
            if bool(stuck.any()):
                keep = ~stuck
                live, w, m1, m2 = live[keep], w[keep], m1[keep], m2[keep]
                if live.numel() == 0:
                    break
    return found
