"""Torch modules as trial models: the paper's architectures, torchvision's and your own
factories' (advlab.models builds them), trained by advlab.train and saved as a state_dict."""

from __future__ import annotations

from typing import Any

from torch import nn

from advlab.families.base import FitJob, ModelFamily, ModelRequest, TrialModel
from advlab.models import build_model, finish
from advlab.train import train_model


class TorchModel(TrialModel):
    gradients = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def fit(self, job: FitJob) -> list[Any]:
        if not job.train.epochs:
            return []  # evaluate the `init` weights as they are
        return train_model(
            self.module, job.x_train, job.y_train, job.x_test, job.y_test, job.train,
            job.weight_decay, job.seed, job.on_epoch, job.resume, job.validation,
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])


def wrap_module(module: nn.Module, request: ModelRequest) -> TorchModel:
    """A module a factory returned, normalised and started from `init` as the trial asks."""
    return TorchModel(finish(module, request.normalize, request.init))


def _build(request: ModelRequest) -> TrialModel:
    module = build_model(
        request.name, request.input_shape, request.num_classes, request.activation, request.args,
        weights=request.weights,
    )  # fmt: skip
    return wrap_module(module, request)


TORCH = ModelFamily(
    name="torch",
    gradients=True,
    build=_build,
    summary="torch modules: fc<h1>-...-<K>, ae<h>-<K>, cnn, resnet18, torchvision:<name>, "
    "timm:<name>, robustbench:<name>",
)
