"""Adversarial training objectives: FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018),
fast FGSM with a random start (Wong et al. 2020), free training (Shafahi et al. 2019), TRADES
(Zhang et al. 2019) and the paper's pool of adversarial examples (section 4.2).

fgsm, pgd, fast and free mix a clean and an adversarial loss, J = mix * J(x) + (1 - mix) *
J(x_adv); trades adds beta * KL(f(x) || f(x')) to the clean loss. The budget follows a linear
warm-up (`budget_at`) and iterative step sizes follow the budget, so a large target budget is
approached instead of imposed on an untrained model. The inner maximisations live in
advlab.training_perturbations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advlab.spec import AdversarialTrainingSpec
from advlab.training_perturbations import (
    AdversarialPool,
    FreePerturbation,
    fast_batch,
    fgsm_batch,
    kl_to_clean,
    pgd_batch,
    split_at_layer,
    trades_batch,
)

__all__ = [
    "AdversarialObjective",
    "AdversarialPool",
    "budget_at",
    "fgsm_batch",
    "pgd_batch",
    "split_at_layer",
    "step_size",
]


def step_size(settings: AdversarialTrainingSpec, eps: float) -> float:
    """The step of iterative methods at budget eps: `step_scale` times eps, by default 2.5 /
    pgd_steps for pgd and trades (Madry et al.), 1.25 for fast (Wong et al.), 1 for free."""
    if settings.step_scale is not None:
        return settings.step_scale * eps
    if settings.method in ("pgd", "trades"):
        return 2.5 * eps / settings.pgd_steps  # PGD training's formula, kept to the last bit
    return {"fast": 1.25, "free": 1.0}.get(settings.method, 1.0) * eps


def budget_at(settings: AdversarialTrainingSpec, epoch: int) -> float:
    """The training budget of a 1-based epoch: eps * epoch / warmup_epochs during the warm-up,
    exactly eps from epoch warmup_epochs on (0 for standard training)."""
    if settings.method == "none":
        return 0.0
    warmup = settings.warmup_epochs
    if warmup == 0 or epoch >= warmup:
        return settings.eps
    return settings.eps * epoch / warmup


class AdversarialObjective:
    """The training loss of one batch under a trial's adversarial-training settings.

    Call `start_epoch` before each epoch (it sets the budget), `loss` per optimizer step, and
    `after_backward` after each backward pass (free training advances its perturbation there).
    Free training replays each batch `replays` times; the others take one step per batch.
    """

    def __init__(self, model: nn.Module, settings: AdversarialTrainingSpec, seed: int):
        self.model = model
        self.settings = settings
        # Its own generator, so the shuffle order matches standard training with the same seed.
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.eps = budget_at(settings, 1)
        self.pools = [
            AdversarialPool(model, layer, settings.pool_size, settings.eps)
            for layer in (settings.pool_layers if settings.method == "pool" else [])
        ]
        self.free = FreePerturbation() if settings.method == "free" else None
        self.grad_evals = 0  # gradient evaluations spent making adversarial examples

    @property
    def replays(self) -> int:
        return self.settings.replays if self.settings.method == "free" else 1

    def start_epoch(self, epoch: int) -> float:
        """Set the epoch's budget from the warm-up; returns it."""
        self.eps = budget_at(self.settings, epoch)
        for pool in self.pools:
            pool.eps = self.eps
        return self.eps

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial version of a batch (fgsm, pgd and fast)."""
        s, eps = self.settings, self.eps
        if s.method == "fgsm":
            self.grad_evals += len(x)
            return fgsm_batch(self.model, x, y, eps)
        if s.method == "fast":
            self.grad_evals += len(x)
            return fast_batch(self.model, x, y, eps, step_size(s, eps), self.generator)
        self.grad_evals += len(x) * s.pgd_steps
        return pgd_batch(self.model, x, y, eps, s.pgd_steps, step_size(s, eps), self.generator)

    def loss(self, x: Tensor, y: Tensor, track: bool = True) -> tuple[Tensor, Tensor | None]:
        """(objective to minimise, clean logits for the running train error). `track=False`
        says the caller will not count this step's error (free training's later replays), so
        logits that would cost a forward pass of their own come back as None."""
        method = self.settings.method
        if method == "trades":
            return self._trades(x, y)
        if method == "free":
            assert self.free is not None
            self.grad_evals += len(x)  # the input gradient rides on the training backward
            return self._mixed(x, y, self.free.inputs(x, self.eps), track)
        if method in ("fgsm", "pgd", "fast"):
            return self._mixed(x, y, self.perturb(x, y))
        logits = self.model(x)
        clean = nn.functional.cross_entropy(logits, y)
        if method == "none" or self.pools[0].inputs is None:  # pools fill after the first epoch
            return clean, logits
        adversarial = sum(p.loss(len(x), self.generator) for p in self.pools) / len(self.pools)
        return self.settings.mix * clean + (1 - self.settings.mix) * adversarial, logits

    def _mixed(
        self, x: Tensor, y: Tensor, x_adv: Tensor, track: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        adversarial = nn.functional.cross_entropy(self.model(x_adv), y)
        mix = self.settings.mix
        if mix == 0:
            if not track:
                return adversarial, None
            # The clean pass only feeds the train error: no graph, no backward through it.
            with torch.no_grad():
                return adversarial, self.model(x)
        logits = self.model(x)
        clean = nn.functional.cross_entropy(logits, y)
        return mix * clean + (1 - mix) * adversarial, logits

    def _trades(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        clean = nn.functional.cross_entropy(logits, y)
        if self.eps == 0:
            # x' = x: the KL term and its gradient are zero, but computed they would leave
            # rounding noise in the weights; eps 0 is standard training exactly.
            return clean, logits
        s = self.settings
        self.grad_evals += len(x) * s.pgd_steps
        x_adv = trades_batch(
            self.model, x, self.eps, s.pgd_steps, step_size(s, self.eps), self.generator
        )
        # Gradients flow through both distributions, as in Zhang et al.'s reference code.
        robust = kl_to_clean(self.model(x_adv), nn.functional.softmax(logits, dim=1)) / len(x)
        return clean + s.beta * robust, logits

    def after_backward(self) -> None:
        if self.free is not None:
            self.free.advance(self.eps, step_size(self.settings, self.eps))

    def end_epoch(self, x: Tensor, y: Tensor) -> None:
        for pool in self.pools:
            self.grad_evals += len(pool.refresh(x, y, self.settings.pool_refresh, self.generator))

    def state(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "grad_evals": self.grad_evals,
            "pools": [
                {"inputs": p.inputs, "labels": p.labels, "generation": p.generation}
                for p in self.pools
            ],
            "free_delta": None if self.free is None else self.free.delta,
        }

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.grad_evals = state["grad_evals"]
        for pool, saved in zip(self.pools, state["pools"], strict=True):
            pool.inputs, pool.labels = saved["inputs"], saved["labels"]
            pool.generation = saved["generation"]
        if self.free is not None:
            self.free.delta = state.get("free_delta")
