"""The model-family contract: what a trial, its attacks and measures, and the transfer stage
need of a classifier, whatever it is.

A `TrialModel` owns fit, predict, save (`state`) and load (`load_state`), says whether input
gradients exist (`gradients`), and shows itself to torch code as `module`: the network itself
for torch models, a parameter-free module returning one-hot scores of the predictions for
prediction-only classifiers (enough for decision-based attacks and every prediction; gradient
attacks are refused before they meet it). A `ModelFamily` builds TrialModels from a request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advlab.measure import fraction
from advlab.models import ModelNameError
from advlab.runtime import predict

__all__ = ["FitJob", "ModelFamily", "ModelNameError", "ModelRequest", "TrialModel"]


@dataclass(frozen=True)
class ModelRequest:
    """What a family needs to build one trial's model (from advlab.families.model_for)."""

    name: str  # the trial's `model`
    input_shape: tuple[int, int, int]
    num_classes: int
    activation: str = "sigmoid"
    args: dict[str, Any] = field(default_factory=dict)  # the trial's model_args
    normalize: tuple[list[float], list[float]] | None = None  # (mean, std) per channel
    init: str | None = None  # starting weights (torch models)
    seed: int = 0
    # robustbench: models' checkpoints: "load" (a trial: downloaded when missing), "local"
    # (the checks: read when on disk), "none" (weights loaded after, as the transfer does).
    weights: str = "load"


@dataclass
class FitJob:
    """A trial's training data (on the model's device) and how to train on it."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    train: Any  # advlab.spec.TrainSpec
    weight_decay: float | list[float]
    seed: int
    on_epoch: Callable[..., None] | None = None  # (EpochStats, checkpoint builder)
    resume: dict[str, Any] | None = None
    validation: tuple[Tensor, Tensor] | None = None


class TrialModel(ABC):
    """A classifier of any family, as the rest of advlab sees it."""

    gradients: bool = False  # input gradients exist: gradient attacks and measures apply
    module: nn.Module

    @abstractmethod
    def fit(self, job: FitJob) -> list[Any]:
        """Train on the job's data; returns the per-epoch history (advlab.train.EpochStats)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What `load_state` needs to rebuild the fitted model (saved with torch.save and
        loaded with weights_only: tensors, numbers, strings and containers of them only)."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None: ...

    def predict(self, x: Tensor) -> Tensor:
        """(N,) int64 predicted classes, on the module's device."""
        return predict(self.module, x)

    def error_rate(self, x: Tensor, y: Tensor) -> float:
        """Fraction of x misclassified; NaN for an empty set."""
        if len(x) == 0:
            return float("nan")
        labels = self.predict(x)
        return fraction(labels != y.to(labels.device))

    def to(self, device: torch.device | str) -> TrialModel:
        self.module.to(device)
        return self


@dataclass(frozen=True)
class ModelFamily:
    """A kind of classifier a trial can train: `build` makes an untrained TrialModel."""

    name: str
    gradients: bool | None  # None: known once built (a factory named by import path)
    build: Callable[[ModelRequest], TrialModel]
    summary: str = ""
    settings: type | None = None  # the Strict model its model_args are validated against
    estimator: bool = False  # fitted by itself (scikit-learn style): a possible control
