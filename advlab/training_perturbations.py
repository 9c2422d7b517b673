"""The inner maximisations of adversarial training, one batch at a time, and the perturbations
that live across batches: free training's (Shafahi et al.) and the paper's pool (section 4.2).
The training methods that use them are declared in advlab.training_methods.

Every perturbation of the inputs is Linf, inside the eps-ball and the box [0, 1], and computed with
gradients wrt the inputs only, so the model's parameter gradients see nothing but the training
objective.
Step sizes arrive in absolute units: the objective scales them with the epoch's budget.
Random draws come from the objective's own CPU generator, so they never shift the shuffle order
and are the same on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab.attacks.gradient import loss_gradient
from advlab.runtime import eval_mode


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """The nearest point of the eps-ball around x that lies in the box."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def uniform_start(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x.device)
    return (x + eps * (2 * noise - 1)).clamp(0, 1)


def fgsm_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Goodfellow et al.'s one step of exactly eps along the sign of the gradient."""
    with eval_mode(model):  # BatchNorm statistics see only the training forward pass
        return (x + eps * loss_gradient(model, x, y).sign()).clamp(0, 1)


def fast_batch(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step: float, generator: torch.Generator
) -> Tensor:
    """Wong et al. 2020's fast FGSM: a uniform random start in the eps-ball, then one signed
    step of `step`; the random start is what keeps single-step training from overfitting to
    its own attack (catastrophic overfitting)."""
    start = uniform_start(x, eps, generator)
    with eval_mode(model):
        return project(start + step * loss_gradient(model, start, y).sign(), x, eps).detach()


def pgd_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step: float,
    generator: torch.Generator,
) -> Tensor:
    """Madry's inner maximisation: a random start in the eps-ball, then `steps` signed-gradient
    steps of `step`, each projected onto the ball and the box. Unlike the PGD attack, no
    example stops early: training wants the loss maximised for every one."""
    x_adv = uniform_start(x, eps, generator)
    with eval_mode(model):
        for _ in range(steps):
            x_adv = project(x_adv + step * loss_gradient(model, x_adv, y).sign(), x, eps)
    return x_adv.detach()


def kl_to_clean(adv_logits: Tensor, clean_probs: Tensor) -> Tensor:
    """KL(clean || adversarial) summed over the batch, as TRADES' inner and outer losses use."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), clean_probs, reduction="sum")


def trades_batch(
    model: nn.Module,
    x: Tensor,
    eps: float,
    steps: int,
    step: float,
    generator: torch.Generator,
) -> Tensor:
    """TRADES' x' (Zhang et al. 2019): maximise KL(f(x) || f(x')) over the eps-ball with signed
    steps, from x plus 0.001-scale Gaussian noise (at x itself the KL's gradient is zero)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    x_adv = project(x + 0.001 * noise, x, eps)
    with eval_mode(model):
        with torch.no_grad():
            clean = F.softmax(model(x), dim=1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(kl_to_clean(model(x_adv), clean), x_adv)
            x_adv = project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


class FreePerturbation:
    """Shafahi et al. 2019's free training perturbation, kept across minibatches and epochs.

    Each minibatch is replayed several times; every replay's backward pass gives the weights
    their gradient and the perturbation its own, so the perturbation climbs one signed step per
    replay at no extra cost. It starts at zero and carries over to the next minibatch, as in
    the paper (a batch smaller than the first uses the leading rows).
    """

    def __init__(self) -> None:
        self.delta: Tensor | None = None
        self._live: Tensor | None = None  # the rows in use by the current replay, with a grad

    def inputs(self, x: Tensor, eps: float) -> Tensor:
        """x + delta in the box, with delta's gradient tracked for `advance`."""
        if self.delta is None:
            self.delta = torch.zeros_like(x)
        # Clamping to the current budget matters while it warms up.
        self._live = self.delta[: len(x)].clamp(-eps, eps).requires_grad_(True)
        return (x + self._live).clamp(0, 1)

    def advance(self, eps: float, step: float) -> None:
        """One signed step up the loss, using the gradient the training backward left."""
        live, self._live = self._live, None
        if live is None or live.grad is None or self.delta is None:
            return
        moved = (live.detach() + step * live.grad.sign()).clamp(-eps, eps)
        self.delta[: len(moved)] = moved


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
