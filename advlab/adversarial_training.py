"""Adversarial training objectives: FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018),
fast FGSM with a random start (Wong et al. 2020), free training (Shafahi et al. 2019), TRADES
(Zhang et al. 2019), the paper's pool of adversarial examples (section 4.2), and any method
registered in advlab.training_methods.

fgsm, pgd, fast and free mix a clean and an adversarial loss, J = mix * J(x) + (1 - mix) *
J(x_adv); trades adds beta * KL(f(x) || f(x')) to the clean loss. The budget follows a linear
warm-up (`budget_at`) and iterative step sizes follow the budget, so a large target budget is
approached instead of imposed on an untrained model. Each method's behaviour is declared in
advlab.training_methods; the inner maximisations live in advlab.training_perturbations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advlab.spec import AdversarialTrainingSpec
from advlab.training_methods import TrainingMethod, budget_at, get, step_size
from advlab.training_perturbations import (
    AdversarialPool,
    FreePerturbation,
    fgsm_batch,
    pgd_batch,
    split_at_layer,
)

__all__ = [
    "AdversarialObjective",
    "AdversarialPool",
    "FreePerturbation",
    "budget_at",
    "fgsm_batch",
    "pgd_batch",
    "split_at_layer",
    "step_size",
]


# advlab before the method registry read these keys from every checkpoint, whatever the method;
# writing them keeps today's checkpoints resumable there (a cluster in mid-upgrade). The pool's
# and free training's own state replaces them.
_STATE_BEFORE_THE_REGISTRY: dict = {"pools": [], "free_delta": None}


class AdversarialObjective:
    """The training loss of one batch under a trial's adversarial-training settings.

    Call `start_epoch` before each epoch (it sets the budget), `loss` per optimizer step,
    `after_backward` after each backward pass and `end_epoch` after each epoch. Each batch is
    trained on `replays` times (free training's replays; 1 for the other methods). What each
    call does is the method's (advlab.training_methods); this class keeps what every method
    shares: the model, the settings, the epoch's budget, the random draws and the count of
    gradient evaluations spent on adversarial examples.
    """

    def __init__(self, model: nn.Module, settings: AdversarialTrainingSpec, seed: int):
        self.model = model
        self.settings = settings
        self.method: TrainingMethod = get(settings.method)
        # Its own generator, so the shuffle order matches standard training with the same seed.
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.eps = budget_at(settings, 1)
        self.grad_evals = 0  # gradient evaluations spent making adversarial examples
        self.behaviour = self.method.behaviour(self)

    @property
    def replays(self) -> int:
        return self.method.optimizer_steps(self.settings)

    def start_epoch(self, epoch: int) -> float:
        """Set the epoch's budget from the warm-up; returns it."""
        self.eps = budget_at(self.settings, epoch)
        self.behaviour.start_epoch(self.eps)
        return self.eps

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial version of a batch (fgsm, pgd and fast make one per step)."""
        return self.behaviour.perturb(x, y)

    def loss(self, x: Tensor, y: Tensor, track: bool = True) -> tuple[Tensor, Tensor | None]:
        """(objective to minimise, clean logits for the running train error). `track=False`
        says the caller will not count this step's error (free training's later replays), so
        logits that would cost a forward pass of their own come back as None."""
        return self.behaviour.loss(x, y, track)

    def after_backward(self) -> None:
        self.behaviour.after_backward()

    def end_epoch(self, x: Tensor, y: Tensor) -> None:
        self.behaviour.end_epoch(x, y)

    def state(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "grad_evals": self.grad_evals,
            **_STATE_BEFORE_THE_REGISTRY,
            **self.behaviour.state(),
        }

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.grad_evals = state["grad_evals"]
        self.behaviour.load_state(state)
