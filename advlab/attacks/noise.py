"""The paper's control: Gaussian noise of a given standard deviation, clipped to the box.

Szegedy et al. compare adversarial distortion with random noise of similar or larger magnitude
(Tables 1, 2 and 4): noise rarely changes a prediction, adversarial perturbations always do.
A fixed-budget, untargeted "attack": success means the noisy image is misclassified.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    check_budget,
    eval_mode,
    example_generators,
    example_randn,
    finish,
    prepare,
)


def gaussian_noise(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    stddev: float,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """x_adv = clamp(x + stddev * N(0, I), 0, 1); success = the prediction leaves the label.

    The noise for each example comes from a stream seeded by `generator` (seed 0 when None) and
    the example's own pixels, so it does not depend on the batch. grad_evals is 0.
    """
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
