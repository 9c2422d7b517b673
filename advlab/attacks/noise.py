"""The paper's control: Gaussian noise of a given standard deviation, clipped to the box.

Szegedy et al. compare adversarial distortion with random noise of similar or larger magnitude
(Tables 1, 2 and 4): noise rarely changes a prediction, adversarial perturbations always do.
A fixed-budget, untargeted "attack": success means the noisy image is misclassified.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    Settings,
    check_budget,
    eval_mode,
    example_generators,
    example_randn,
    finish,
    merged_settings,
    prepare,
)


class NoiseSettings(Settings):
    """The noise control has no knobs: its budget is the stddev."""


def gaussian_noise(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    stddev: float,
    settings: NoiseSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """x_adv = clamp(x + stddev * N(0, I), 0, 1); success = the prediction leaves the label.

    The noise for each example comes from a stream seeded by `generator` (seed 0 when None) and
    the example's own pixels, so it does not depend on the batch. grad_evals is 0. Untargeted
    only; `settings` and `overrides` exist for the shared calling convention (no knobs).
    """
    merged_settings(NoiseSettings, settings, overrides, "noise")
    stddev = check_budget("stddev", stddev)
    x, y, _, _ = prepare(
        model, x, y, "untargeted", num_classes=None, generator=generator, default="untargeted"
    )
    zeros = torch.zeros(len(x), dtype=torch.int64)
    with eval_mode(model):
        if stddev == 0:
            return finish(model, x, y, None, zeros)
        noise = example_randn(example_generators(x, generator), tuple(x.shape[1:]), x)
        return finish(model, (x + stddev * noise).clamp(0.0, 1.0), y, None, zeros)


def add_noise(clean: Tensor, stddev: Tensor, generator: torch.Generator) -> Tensor:
    """clean + Gaussian noise of each row's own stddev (one draw for the batch), clipped."""
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    view = (-1, *[1] * (clean.ndim - 1))
    return (clean + noise * stddev.to(clean.dtype).view(view)).clamp(0.0, 1.0)


def amplify(clean: Tensor, adversarial: Tensor, rms: float | Tensor, steps: int = 60) -> Tensor:
    """Rescale each row's perturbation so that, after clipping to [0,1], its per-pixel rms is
    `rms` (one number, or one per row).

    Clipping shrinks a perturbation, so the scale is found per row by bisection on the clipped
    result (the rms of clip(x + s*r) - x grows with s). A row whose clipped perturbation cannot
    reach `rms` (it saturates against the box) gets the largest it can.
    """
    delta = adversarial - clean
    view = (-1, *[1] * (clean.ndim - 1))
    size = delta.flatten(1).pow(2).mean(1).sqrt()
    rms = torch.as_tensor(rms, dtype=size.dtype).expand_as(size)
    hi = torch.where(size > 0, rms / size.clamp_min(1e-12), torch.zeros_like(size))
    lo = torch.zeros_like(hi)
    hi = hi * 4  # clipping only ever needs a larger scale than the unclipped one

    def clipped_rms(scale: Tensor) -> Tensor:
        moved = (clean + scale.view(view) * delta).clamp(0, 1)
        return (moved - clean).flatten(1).pow(2).mean(1).sqrt()

    for _ in range(steps):
        mid = (lo + hi) / 2
        short = clipped_rms(mid) < rms
        lo = torch.where(short, mid, lo)
        hi = torch.where(short, hi, mid)
    return (clean + hi.view(view) * delta).clamp(0, 1)


def matched_noise(clean: Tensor, rms: Tensor, generator: torch.Generator) -> Tensor:
    """A random Gaussian direction per row, scaled so its clipped perturbation has exactly the
    row's `rms`: the fair "same distortion, no adversary" control of the paper's Tables 1-2."""
    direction = clean + torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    return amplify(clean, direction, rms)
