"""Adversarial training: the batch objectives of FGSM training (Goodfellow et al. 2015), PGD
training (Madry et al. 2018) and the paper's pool of adversarial examples (section 4.2).

Every method mixes a clean and an adversarial loss, J = mix * J(x) + (1 - mix) * J(x_adv); the
perturbations are Linf, inside the box, and computed with gradients wrt the inputs only, so the
model's parameter gradients see nothing but the final objective.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advlab.attacks.gradient import loss_gradient
from advlab.spec import AdversarialTrainingSpec


def fgsm_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    return (x + eps * loss_gradient(model, x, y).sign()).clamp(0, 1)


def pgd_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """Madry's inner maximisation: a random start in the eps-ball, then `steps` signed-gradient
    steps of 2.5 * eps / steps, each projected onto the ball and the box. Unlike the PGD
    attack, no example stops early: training wants the loss maximised for every one."""
    step = 2.5 * eps / steps
    start = torch.rand(x.shape, generator=generator).to(x.device)
    x_adv = (x + eps * (2 * start - 1)).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv + step * loss_gradient(model, x_adv, y).sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def split_at_layer(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
    """(features, head) around hidden layer `layer` of an fc net (0: the input itself).

    fc nets are Sequential(Flatten, Linear, act, Linear, act, ..., Linear): hidden layer k's
    output is after the first 1 + 2k modules.
    """
    if layer == 0:
        return nn.Identity(), model
    if not isinstance(model, nn.Sequential):
        raise ValueError("adversarial pools on hidden layers need an fc<h1>-...-<K> model")
    hidden = (len(model) - 2) // 2
    if not 1 <= layer <= hidden:
        raise ValueError(f"pool layer {layer}: the model has hidden layers 1..{hidden}")
    return model[: 1 + 2 * layer], model[1 + 2 * layer :]


class AdversarialPool:
    """A fixed-size pool of adversarial examples on one layer's outputs (the paper, 4.2).

    After each epoch a random `refresh` fraction of the pool (all of it the first time) is
    replaced by fresh FGSM examples made on the current model from random training examples.
    The layers above `layer` then train on pool samples as well as on clean batches.
    """

    def __init__(self, model: nn.Module, layer: int, size: int, eps: float):
        self.features, self.head = split_at_layer(model, layer)
        self.layer, self.size, self.eps = layer, size, eps
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None
        self.generation = torch.zeros(size, dtype=torch.long)  # which refresh made each entry

    def make(self, x: Tensor, y: Tensor) -> Tensor:
        """FGSM on this layer's outputs, wrt the layers above (inputs stay in the box)."""
        with torch.no_grad():
            h = self.features(x)
        h_adv = h + self.eps * loss_gradient(self.head, h, y).sign()
        return h_adv.clamp(0, 1) if self.layer == 0 else h_adv.detach()

    def refresh(self, x: Tensor, y: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
        """Replace a random `fraction` of the pool (all of it while empty); returns the slots."""
        first = self.inputs is None
        count = self.size if first else round(fraction * self.size)
        slots = torch.randperm(self.size, generator=generator)[:count]
        sources = torch.randint(len(x), (count,), generator=generator).to(x.device)
        fresh = self.make(x[sources], y[sources])
        if first:
            self.inputs = fresh.new_empty((self.size, *fresh.shape[1:]))
            self.labels = y.new_empty(self.size)
        slots_dev = slots.to(x.device)
        self.inputs[slots_dev] = fresh
        self.labels[slots_dev] = y[sources]
        self.generation[slots] = int(self.generation.max()) + 1
        return slots

    def loss(self, count: int, generator: torch.Generator) -> Tensor:
        """Cross-entropy of the layers above on a random sample of the pool."""
        assert self.inputs is not None and self.labels is not None
        pick = torch.randint(self.size, (count,), generator=generator).to(self.inputs.device)
        return nn.functional.cross_entropy(self.head(self.inputs[pick]), self.labels[pick])


class AdversarialObjective:
    """The training loss of one batch under a trial's adversarial-training settings."""

    def __init__(self, model: nn.Module, settings: AdversarialTrainingSpec, seed: int):
        self.model = model
        self.settings = settings
        # Its own generator, so the shuffle order matches standard training with the same seed.
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.pools = [
            AdversarialPool(model, layer, settings.pool_size, settings.eps)
            for layer in (settings.pool_layers if settings.method == "pool" else [])
        ]
        self.grad_evals = 0  # gradient evaluations spent making adversarial examples

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial version of a batch (fgsm or pgd methods)."""
        s = self.settings
        if s.method == "fgsm":
            self.grad_evals += len(x)
            return fgsm_batch(self.model, x, y, s.eps)
        self.grad_evals += len(x) * s.pgd_steps
        return pgd_batch(self.model, x, y, s.eps, s.pgd_steps, self.generator)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(objective to minimise, clean logits for the running train error)."""
        logits = self.model(x)
        clean = nn.functional.cross_entropy(logits, y)
        s = self.settings
        if s.method == "none":
            return clean, logits
        if s.method == "pool":
            if self.pools[0].inputs is None:  # pools fill after the first epoch
                return clean, logits
            adversarial = sum(p.loss(len(x), self.generator) for p in self.pools) / len(self.pools)
        else:
            adversarial = nn.functional.cross_entropy(self.model(self.perturb(x, y)), y)
        return s.mix * clean + (1 - s.mix) * adversarial, logits

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
        }

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.grad_evals = state["grad_evals"]
        for pool, saved in zip(self.pools, state["pools"], strict=True):
            pool.inputs, pool.labels = saved["inputs"], saved["labels"]
            pool.generation = saved["generation"]
