"""The adversarial-training method registry: the one place that knows which training methods
exist and what each does (in the shape of advlab.attacks.registry).

Each method declares, once, in a `TrainingMethod`:
- its name and the AdversarialTrainingSpec settings it reads; a method that does not read `eps`
  trains at budget 0 (standard training);
- its default step, a multiple of the epoch's budget (`step_scale`, spread over the `pgd_steps`
  inner steps when `step_split`), used when the spec sets no `step_scale` of its own;
- how many optimizer steps it takes per batch (free training replays each batch);
- its behaviour, a `Behaviour` subclass made once per training run: the adversarial version of
  a batch, the loss, what follows each backward pass and each epoch, the state a checkpoint keeps;
- optionally a check of its settings beyond which ones it reads.

AdversarialObjective (advlab.adversarial_training) and spec validation ask this module; nothing
else lists training methods. A plug-in method is a `TrainingMethod` passed to `register()`, or
named in a sweep file by import path (`method: "mypkg.training:MY_METHOD"`), which also resolves
on Ray workers. Its settings are AdversarialTrainingSpec's fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advlab.plugins import PluginError, import_object
from advlab.training_perturbations import (
    AdversarialPool,
    FreePerturbation,
    fast_batch,
    fgsm_batch,
    kl_to_clean,
    pgd_batch,
    trades_batch,
)

# The spec and the objective ask this module, so it names their types without importing them.
AdversarialTrainingSpec = Any  # advlab.spec.AdversarialTrainingSpec
AdversarialObjective = Any  # advlab.adversarial_training.AdversarialObjective


class TrainingMethodError(ValueError):
    """An unknown or badly declared training method; str() is one line for the user."""


class Behaviour:
    """One training method at work in one training run. The defaults are standard training's:
    the clean loss, no adversarial batches, nothing after a backward pass or an epoch, no state.

    `run` is the AdversarialObjective: its model, settings, generator, the epoch's budget `eps`,
    and `grad_evals`, which a behaviour raises by the gradient evaluations it spends.
    """

    def __init__(self, run: AdversarialObjective) -> None:
        self.run = run

    def start_epoch(self, eps: float) -> None:
        """Called with each epoch's budget before its first batch."""

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial version of a batch."""
        raise TrainingMethodError(f"training method {self.run.method.name} perturbs no batches")

    def loss(self, x: Tensor, y: Tensor, track: bool) -> tuple[Tensor, Tensor | None]:
        """(objective to minimise, clean logits for the running train error). `track=False`
        says the caller will not count this step's error (free training's later replays), so
        logits that would cost a forward pass of their own may come back as None."""
        logits = self.run.model(x)
        return nn.functional.cross_entropy(logits, y), logits

    def after_backward(self) -> None:
        """Called after each backward pass, before the optimizer steps."""

    def end_epoch(self, x: Tensor, y: Tensor) -> None:
        """Called after each epoch with the whole training set."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep for `load_state` to continue bit for bit."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's state (which holds other methods' keys too)."""


def _one_step(settings: AdversarialTrainingSpec) -> int:
    return 1


@dataclass(frozen=True)
class TrainingMethod:
    """Everything advlab needs to know about one adversarial-training method."""

    name: str
    reads: tuple[str, ...]  # the AdversarialTrainingSpec fields it reads
    behaviour: type[Behaviour]
    step_scale: float = 1.0  # the default step, a multiple of the epoch's budget
    step_split: bool = False  # the default step is step_scale * eps / pgd_steps
    # optimizer steps per batch; more than one replays the batch (free training)
    optimizer_steps: Callable[[AdversarialTrainingSpec], int] = _one_step
    # refuses settings that do not fit the method: raises ValueError("key: why")
    check: Callable[[AdversarialTrainingSpec], None] | None = None
    # False: settings it does not read pass unchecked (standard training always took them)
    strict: bool = True
    summary: str = ""  # one line for the docs

    @property
    def adversarial(self) -> bool:
        """Whether it trains on perturbed inputs at all (a method that reads no budget does
        not)."""
        return "eps" in self.reads


# --------------------------------------------------------------------------- the step and budget


def step_size(settings: AdversarialTrainingSpec, eps: float) -> float:
    """The step of iterative methods at budget eps: `step_scale` times eps, by default the
    method's own (pgd and trades 2.5 / pgd_steps after Madry et al., fast 1.25 after Wong et
    al., free 1)."""
    if settings.step_scale is not None:
        return settings.step_scale * eps
    method = get(settings.method)
    if method.step_split:
        return method.step_scale * eps / settings.pgd_steps  # Madry's formula, to the last bit
    return method.step_scale * eps


def budget_at(settings: AdversarialTrainingSpec, epoch: int) -> float:
    """The training budget of a 1-based epoch: eps * epoch / warmup_epochs during the warm-up,
    exactly eps from epoch warmup_epochs on (0 for a method that does not read eps)."""
    if not get(settings.method).adversarial:
        return 0.0
    warmup = settings.warmup_epochs
    if warmup == 0 or epoch >= warmup:
        return settings.eps
    return settings.eps * epoch / warmup


def mixed_loss(
    run: AdversarialObjective, x: Tensor, y: Tensor, x_adv: Tensor, track: bool = True
) -> tuple[Tensor, Tensor | None]:
    """mix * J(x) + (1 - mix) * J(x_adv), and the clean logits (None when untracked at mix 0)."""
    adversarial = nn.functional.cross_entropy(run.model(x_adv), y)
    mix = run.settings.mix
    if mix == 0:
        if not track:
            return adversarial, None
        # The clean pass only feeds the train error: no graph, no backward through it.
        with torch.no_grad():
            return adversarial, run.model(x)
    logits = run.model(x)
    clean = nn.functional.cross_entropy(logits, y)
    return mix * clean + (1 - mix) * adversarial, logits


# --------------------------------------------------------------------------- the behaviours


class AdversarialBatches(Behaviour):
    """Trains on mix * J(x) + (1 - mix) * J(x_adv), x_adv from `perturb`."""

    def loss(self, x: Tensor, y: Tensor, track: bool) -> tuple[Tensor, Tensor | None]:
        # Through the objective, the one place every adversarial batch comes from.
        return mixed_loss(self.run, x, y, self.run.perturb(x, y), track)


class FGSMTraining(AdversarialBatches):
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self.run.grad_evals += len(x)
        return fgsm_batch(self.run.model, x, y, self.run.eps)


class FastTraining(AdversarialBatches):
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        run, eps = self.run, self.run.eps
        run.grad_evals += len(x)
        return fast_batch(run.model, x, y, eps, step_size(run.settings, eps), run.generator)


class PGDTraining(AdversarialBatches):
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        run, s, eps = self.run, self.run.settings, self.run.eps
        run.grad_evals += len(x) * s.pgd_steps
        return pgd_batch(run.model, x, y, eps, s.pgd_steps, step_size(s, eps), run.generator)


class FreeTraining(Behaviour):
    """The perturbation rides on the training backward of every replay (FreePerturbation)."""

    def __init__(self, run: AdversarialObjective) -> None:
        super().__init__(run)
        self.free = FreePerturbation()

    def loss(self, x: Tensor, y: Tensor, track: bool) -> tuple[Tensor, Tensor | None]:
        self.run.grad_evals += len(x)  # the input gradient rides on the training backward
        return mixed_loss(self.run, x, y, self.free.inputs(x, self.run.eps), track)

    def after_backward(self) -> None:
        self.free.advance(self.run.eps, step_size(self.run.settings, self.run.eps))

    def state(self) -> dict[str, Any]:
        return {"free_delta": self.free.delta}

    def load_state(self, state: dict[str, Any]) -> None:
        self.free.delta = state.get("free_delta")


class TradesTraining(Behaviour):
    """CE(f(x), y) + beta * KL(f(x) || f(x')) with x' from trades_batch."""

    def loss(self, x: Tensor, y: Tensor, track: bool) -> tuple[Tensor, Tensor | None]:
        run, s = self.run, self.run.settings
        logits = run.model(x)
        clean = nn.functional.cross_entropy(logits, y)
        if run.eps == 0:
            # x' = x: the KL term and its gradient are zero, but computed they would leave
            # rounding noise in the weights; eps 0 is standard training exactly.
            return clean, logits
        run.grad_evals += len(x) * s.pgd_steps
        x_adv = trades_batch(
            run.model, x, run.eps, s.pgd_steps, step_size(s, run.eps), run.generator
        )
        # Gradients flow through both distributions, as in Zhang et al.'s reference code.
        robust = kl_to_clean(run.model(x_adv), nn.functional.softmax(logits, dim=1)) / len(x)
        return clean + s.beta * robust, logits


class PoolTraining(Behaviour):
    """The clean loss mixed with the mean loss on samples of one pool per layer."""

    def __init__(self, run: AdversarialObjective) -> None:
        super().__init__(run)
        s = run.settings
        self.pools = [
            AdversarialPool(run.model, layer, s.pool_size, s.eps) for layer in s.pool_layers
        ]

    def start_epoch(self, eps: float) -> None:
        for pool in self.pools:
            pool.eps = eps

    def loss(self, x: Tensor, y: Tensor, track: bool) -> tuple[Tensor, Tensor | None]:
        clean, logits = super().loss(x, y, track)
        if self.pools[0].inputs is None:  # pools fill after the first epoch
            return clean, logits
        generator = self.run.generator
        adversarial = sum(p.loss(len(x), generator) for p in self.pools) / len(self.pools)
        return self.run.settings.mix * clean + (1 - self.run.settings.mix) * adversarial, logits

    def end_epoch(self, x: Tensor, y: Tensor) -> None:
        refresh = self.run.settings.pool_refresh
        for pool in self.pools:
            self.run.grad_evals += len(pool.refresh(x, y, refresh, self.run.generator))

    def state(self) -> dict[str, Any]:
        return {
            "pools": [
                {"inputs": p.inputs, "labels": p.labels, "generation": p.generation}
                for p in self.pools
            ]
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for pool, saved in zip(self.pools, state["pools"], strict=True):
            pool.inputs, pool.labels = saved["inputs"], saved["labels"]
            pool.generation = saved["generation"]


def _trades_takes_no_mix(settings: AdversarialTrainingSpec) -> None:
    if settings.mix != type(settings).model_fields["mix"].default:
        raise ValueError("mix: trades weighs its terms with beta; drop mix")


def _replays(settings: AdversarialTrainingSpec) -> int:
    return settings.replays


# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    """Add a training method (a plug-in's, or a test's); its name must be new."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise TrainingMethodError(f"training method {method.name!r} is registered already")
    if not (isinstance(method.behaviour, type) and issubclass(method.behaviour, Behaviour)):
        raise TrainingMethodError(f"training method {method.name!r}: behaviour must be a Behaviour")
    _REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """Every registered training method's name, in the order they were registered."""
    return list(_REGISTRY)


def reading(setting: str) -> list[str]:
    """The registered methods that read an AdversarialTrainingSpec setting."""
    return [name for name, method in _REGISTRY.items() if setting in method.reads]


def get(name: str) -> TrainingMethod:
    """The training method called `name`, or the TrainingMethod at an import path module:object."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_method(name)
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise TrainingMethodError(
        f"{name!r} is no training method; {hint}use one of {', '.join(names())} or module:object"
    )


def _import_method(path: str) -> TrainingMethod:
    try:
        found = import_object(path, "train.adversarial.method")
    except PluginError as err:
        raise TrainingMethodError(
            f"cannot import training method {path!r} ({err}); check the module path"
        ) from None
    if not isinstance(found, TrainingMethod):
        raise TrainingMethodError(f"{path!r} is a {type(found).__name__}, not a TrainingMethod")
    return _REGISTRY.setdefault(path, found)


_ADVERSARIAL = ("eps", "warmup_epochs")  # every method that perturbs reads these
NONE = register(TrainingMethod("none", (), Behaviour, strict=False, summary="standard training"))
FGSM = register(
    TrainingMethod("fgsm", (*_ADVERSARIAL, "mix"), FGSMTraining,
                   summary="FGSM examples, eps along the gradient's sign (Goodfellow et al. 2015)")
)  # fmt: skip
PGD = register(
    TrainingMethod("pgd", (*_ADVERSARIAL, "mix", "pgd_steps", "step_scale"), PGDTraining,
                   step_scale=2.5, step_split=True,
                   summary="PGD examples from a random start (Madry et al. 2018)")
)  # fmt: skip
POOL = register(
    TrainingMethod("pool", (*_ADVERSARIAL, "mix", "pool_size", "pool_refresh", "pool_layers"),
                   PoolTraining, summary="a pool of FGSM examples per layer (the paper, 4.2)")
)  # fmt: skip
TRADES = register(
    TrainingMethod("trades", (*_ADVERSARIAL, "pgd_steps", "step_scale", "beta"), TradesTraining,
                   step_scale=2.5, step_split=True, check=_trades_takes_no_mix,
                   summary="clean loss + beta KL to the worst x' (Zhang et al. 2019)")
)  # fmt: skip
FAST = register(
    TrainingMethod("fast", (*_ADVERSARIAL, "mix", "step_scale"), FastTraining, step_scale=1.25,
                   summary="FGSM from a random start (Wong et al. 2020)")
)  # fmt: skip
FREE = register(
    TrainingMethod("free", (*_ADVERSARIAL, "mix", "step_scale", "replays"), FreeTraining,
                   optimizer_steps=_replays,
                   summary="each batch replayed, the perturbation riding along (Shafahi et al.)")
)  # fmt: skip
