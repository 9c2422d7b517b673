"""Model families: every classifier a trial trains, behind one interface (advlab.families.base).

A trial's `model` resolves here, in one lookup:
- a registered family's name: the prediction-only built-ins logistic, linear_svm, rbf_svm,
  random_forest, knn and constant (advlab.families.estimators), or one you `register()`;
- `module:attribute` naming a ModelFamily (e.g. one made with `estimator_family`), or a factory
  called as `factory(input_shape, num_classes, **model_args)` that returns a torch.nn.Module
  or a scikit-learn-style estimator (fit/predict);
- anything else is a torch architecture (fc<h1>-...-<K>, ae<h>-<K>, cnn, resnet18,
  torchvision:<name>, timm:<name>, robustbench:<name>; advlab.models).

The same lookup serves trials and the transfer stage's controls, so a control is a model like
any other.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from advlab.families.base import FitJob, ModelFamily, ModelNameError, ModelRequest, TrialModel
from advlab.families.estimators import (
    BUILTIN,
    EstimatorModel,
    EstimatorSettings,
    estimator_family,
)
from advlab.families.torch_modules import TORCH, TorchModel, wrap_module
from advlab.plugins import PluginError, call_user, import_object, is_import_path

__all__ = [
    "TORCH",
    "EstimatorModel",
    "FitJob",
    "ModelFamily",
    "ModelNameError",
    "ModelRequest",
    "TorchModel",
    "TrialModel",
    "estimator_family",
    "model_for",
    "names",
    "register",
    "resolve",
]

_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add a family under its name (a plug-in's, or a test's); the name must be new."""
    known = _REGISTRY.get(family.name)
    if known is not None and known is not family:
        raise ModelNameError(f"model family {family.name!r} is registered already; rename it")
    _REGISTRY[family.name] = family
    return family


for _family in BUILTIN:
    register(_family)


def names() -> list[str]:
    """The registered families' names (torch architectures are parsed, not listed)."""
    return sorted(_REGISTRY)


def resolve(name: str) -> ModelFamily:
    """The family a trial's `model` belongs to (see the module docstring)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if is_import_path(name):
        try:
            found = import_object(name, "model")
        except PluginError as err:
            raise ModelNameError(str(err)) from None
        if isinstance(found, ModelFamily):
            return found
        if callable(found):
            return ModelFamily(name, None, partial(_from_factory, found), f"factory {name}")
        raise ModelNameError(
            f"model: {name} is a {type(found).__name__}; name a ModelFamily or a factory"
        )
    return TORCH


def _from_factory(factory: Callable[..., Any], request: ModelRequest) -> TrialModel:
    made = call_user(
        factory, "model", f"{request.name}(input_shape, num_classes, **model_args)",
        request.input_shape, request.num_classes, **request.args, error=ModelNameError,
    )  # fmt: skip
    if isinstance(made, nn.Module):
        return wrap_module(made, request)
    return EstimatorModel(made, request, EstimatorSettings())


def model_for(
    spec: Any, input_shape: tuple[int, int, int], num_classes: int, weights: str = "load"
) -> TrialModel:
    """A TrialSpec's model for its data, untrained (the one place trials, transfer and the
    checks build a trial's model): name, settings, activation, normalisation, init weights;
    `weights` says what a robustbench: model reads (advlab.families.base.ModelRequest)."""
    norm = spec.dataset.normalize
    request = ModelRequest(
        name=spec.model,
        input_shape=tuple(int(s) for s in input_shape),  # type: ignore[arg-type]
        num_classes=num_classes,
        activation=spec.activation,
        args=dict(spec.model_args),
        normalize=None if norm is None else (list(norm.mean), list(norm.std)),
        init=spec.init,
        seed=spec.seed,
        weights=weights,
    )
    family = resolve(spec.model)
    if any(family is builtin for builtin in (TORCH, *BUILTIN)):
        return family.build(request)
    # A family of yours (its build is your code) or a factory: every failure in one line.
    return call_user(family.build, "model", f"building {spec.model}", request, error=ModelNameError)
