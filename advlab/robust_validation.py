"""Robust validation during training (Rice et al. 2020, "Overfitting in adversarially robust deep
learning"): PGD robust error on a slice held out of the training subset, and the weights of the
epoch where it was lowest.

Robust test error of adversarially trained nets often bottoms out early and then climbs while
the training loss keeps falling; choosing the epoch on held-out training data (never on the
test set) recovers most of the gap, which is early stopping in all but name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from advlab.attacks.registry import run_attack
from advlab.measure import robust_error
from advlab.runtime import eval_mode
from advlab.spec import TrainSpec


def carve_validation(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, validation) positions into a training subset of n examples, both sorted.

    Seeded by the data split's seed, not the trial's, so every trial of a sweep that trains on
    the same subset holds out the same examples and their validation errors compare.
    """
    count = round(fraction * n)
    if fraction > 0 and not 0 < count < n:
        raise ValueError(
            f"train.validation.fraction: {fraction} of {n} training examples leaves "
            f"{count} for validation and {n - count} for training; pick a fraction that "
            "leaves both non-empty"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def pgd_robust_error(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, seed: int
) -> float:
    """measure.robust_error of PGD within eps (Linf) with every example of (x, y) attacked:
    the fraction misclassified at PGD's point. NaN for an empty set.

    Unlike a trial's attacks, which attack only correctly classified examples and count every
    clean mistake as wrong, validation attacks its clean mistakes too, so one that PGD's random
    start puts back on the right class (and that stays there) does not count. That is the
    number robust validation has always recorded and chosen epochs by, kept as it was."""
    with eval_mode(model):
        result = run_attack(
            "pgd", model, x, y, eps=eps, steps=steps, generator=torch.Generator().manual_seed(seed)
        )
    error = robust_error(result.success, clean_wrong=0)
    # The exact fraction (count / n in float64), like every rate advlab stores. Earlier versions
    # rounded it to float32; a checkpoint of theirs compares a hair lower on a tie.
    return math.nan if error is None else error


class RobustValidation:
    """Validates every `every` epochs (and the last) and keeps the best weights seen.

    The best weights are a copy taken when the robust error strictly improves, so ties keep
    the earlier epoch. The state travels with training checkpoints, so a resumed run keeps the
    same best epoch as an uninterrupted one.
    """

    def __init__(self, settings: TrainSpec, x: Tensor, y: Tensor, seed: int):
        self.every = settings.validation.every
        self.steps = settings.validation.steps
        self.keep = settings.validation.keep
        given = settings.validation.eps
        self.eps = settings.adversarial.eps if given is None else given
        self.last_epoch = settings.epochs
        self.x, self.y, self.seed = x, y, seed
        self.best_epoch = 0
        self.best_error = math.inf
        self.best_weights: dict[str, Tensor] | None = None

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0 or epoch == self.last_epoch

    def check(self, model: nn.Module, epoch: int) -> float:
        """The robust validation error after this epoch, NaN when it is not due."""
        if not self.due(epoch):
            return math.nan
        error = pgd_robust_error(model, self.x, self.y, self.eps, self.steps, self.seed)
        if error < self.best_error:
            self.best_epoch, self.best_error = epoch, error
            if self.keep == "best":
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return error

    def finish(self, model: nn.Module) -> None:
        """Load the best weights into the model when asked to keep them."""
        if self.keep == "best" and self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.best_epoch, "error": self.best_error, "weights": self.best_weights}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_epoch, self.best_error = state["epoch"], state["error"]
        self.best_weights = state["weights"]


def evaluated_epoch(history: list[dict[str, Any]], settings: TrainSpec) -> int | None:
    """The epoch whose weights a trial evaluates: the best robust validation epoch under
    `keep: best` (first of equals), else the last. None without a history."""
    if not history:
        return None
    last = int(history[-1]["epoch"])
    if settings.validation.fraction == 0 or settings.validation.keep == "last":
        return last
    scored = [(h["val_robust_error"], h["epoch"]) for h in history]
    scored = [(e, n) for e, n in scored if e is not None and not math.isnan(e)]
    return int(min(scored)[1]) if scored else last
