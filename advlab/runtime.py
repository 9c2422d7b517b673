"""Where a model runs and how it is asked for predictions: the one home of both.

Training, attacks, the trial and the transfer stage all predict through `predict`, so eval mode,
batching and device moves behave the same everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

PREDICT_BATCH = 4096


def pick_device(requested: str) -> torch.device:
    """`auto` is the GPU when one is visible; asking for cuda without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no GPU is visible; use device: auto or cpu")
    return torch.device(requested)


def model_device(model: nn.Module) -> torch.device:
    """The device the model lives on (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = PREDICT_BATCH) -> Tensor:
    """(N,) int64 predicted classes, in eval mode and in batches, on the model's device."""
    device = model_device(model)
    if len(x) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    with eval_mode(model):
        parts = [
            model(x[i : i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts)


def error_rate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of x the model misclassifies; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x) != y.to(model_device(model))).float().mean())
