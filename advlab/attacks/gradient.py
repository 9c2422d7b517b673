"""Fixed-budget gradient attacks under the Linf norm: FGSM (Goodfellow et al. 2015) and PGD
(Madry et al. 2018). Each call runs at one budget; run once per budget for a curve."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    check_budget,
    check_inputs,
    eval_mode,
    finish,
    model_device,
)


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the cross-entropy wrt x, per example (summed loss, so rows do not interact)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> AttackResult:
    """Untargeted FGSM: x_adv = clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)."""
    eps = check_budget("eps", eps)
    check_inputs(x, y)
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    with eval_mode(model):
        if eps == 0:
            # The identity: skip the gradient so eps=0 costs nothing and reports 0 evaluations.
            return finish(model, x, y, None, torch.zeros(len(x), dtype=torch.int64))
        grad = loss_gradient(model, x, y)
        x_adv = (x + eps * grad.sign()).clamp(0.0, 1.0)
        return finish(model, x_adv, y, None, torch.ones(len(x), dtype=torch.int64))


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Untargeted Linf PGD: `steps` signed-gradient steps projected onto the eps-ball and the box.

    step_size defaults to 2.5 * eps / steps (Madry et al.); the random start is uniform in the
    eps-ball, drawn from `generator` (seed 0 when None) so runs are reproducible. The returned
    image is the last iterate, except that an example already fooled keeps its first fooling
    iterate (so success never decreases with more steps).
    """
    eps = check_budget("eps", eps)
    if steps < 1:
        raise AttackError(f"steps: must be >= 1, got {steps}")
    step = 2.5 * eps / steps if step_size is None else check_budget("step_size", step_size)
    check_inputs(x, y)
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    with eval_mode(model):
        x_adv = x.clone()
        if random_start and eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu")
            x_adv = (x + eps * (2 * noise.to(device) - 1)).clamp(0.0, 1.0)
        evals = torch.zeros(len(x), dtype=torch.int64, device=device)
        fooled = torch.zeros(len(x), dtype=torch.bool, device=device)
        for _ in range(steps):
            active = ~fooled
            if not active.any():
                break
            xa = x_adv[active].detach().requires_grad_(True)
            logits = model(xa)
            loss = F.cross_entropy(logits, y[active], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            evals[active] += 1
            # Freeze examples already fooled at their current point before stepping.
            now_fooled = logits.detach().argmax(1) != y[active]
            idx = active.nonzero().squeeze(1)
            fooled[idx[now_fooled]] = True
            moving = idx[~now_fooled]
            stepped = xa.detach()[~now_fooled] + step * grad[~now_fooled].sign()
            stepped = torch.minimum(torch.maximum(stepped, x[moving] - eps), x[moving] + eps)
            x_adv[moving] = stepped.clamp(0.0, 1.0)
        return finish(model, x_adv, y, None, evals)
