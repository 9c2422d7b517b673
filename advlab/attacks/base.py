"""The attack contract: argument checks, the result record and helpers shared by every attack.

An attack takes a model (float32 inputs in [0,1] of shape (B, C, H, W) -> logits (B, K)), inputs
and labels, and returns an `AttackResult`. It never changes the model: it runs it in eval mode,
restores the previous mode afterwards and leaves no gradients on the parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class AttackError(ValueError):
    """A bad argument to an attack; the message names the argument and the fix in one line."""


@dataclass
class AttackResult:
    """What every attack returns, one row per example."""

    x_adv: Tensor  # (B, C, H, W), inside [0, 1]
    success: Tensor  # (B,) bool: targeted -> pred == target, untargeted -> pred != label
    adv_pred: Tensor  # (B,) int64 model prediction on x_adv
    target: Tensor  # (B,) int64 target class, -1 when untargeted
    grad_evals: Tensor  # (B,) int64 gradient evaluations spent on each example


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


def check_inputs(x: Tensor, y: Tensor, target: Tensor | None = None) -> None:
    """Raise AttackError unless x is a finite float batch in [0,1] with matching labels/targets."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise AttackError("x: expected a float tensor of shape (B, C, H, W); convert with .float()")
    batch = x.shape[0]
    if not torch.isfinite(x).all():
        raise AttackError("x: contains NaN or inf; attack finite images with pixels in [0, 1]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AttackError(
            f"x: pixels must lie in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]; "
            "rescale the inputs (e.g. divide by 255) before attacking"
        )
    _check_labels("y", y, batch)
    if target is None:
        return
    _check_labels("target", target, batch)
    if (target == y.to(target.device)).any():
        raise AttackError("target: equals the label for some examples; pick a different class")


def _check_labels(name: str, labels: Tensor, batch: int) -> None:
    """Labels must be a (B,) integer tensor of non-negative classes."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise AttackError(f"{name}: expected an integer tensor of class indices; use .long()")
    if labels.shape != (batch,):
        raise AttackError(
            f"{name}: expected shape ({batch},) to match x, got {tuple(labels.shape)}"
        )
    if labels.numel() and labels.min() < 0:
        raise AttackError(f"{name}: class indices must be >= 0")


def check_num_classes(num_classes: int, *labels: Tensor | None) -> None:
    """Raise AttackError unless every class index is below num_classes (and there are two)."""
    if num_classes < 2:
        raise AttackError(f"num_classes: need at least 2 classes, got {num_classes}")
    for lab in labels:
        if lab is not None and lab.numel() and lab.max() >= num_classes:
            raise AttackError(
                f"labels: class {lab.max().item()} is out of range for {num_classes} classes"
            )


def check_budget(name: str, value: float) -> float:
    """A perturbation budget must be a finite number >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise AttackError(f"{name}: must be a finite number >= 0, got {value}")
    return value


def random_wrong_targets(y: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random class != y per example, drawn from `generator` (CPU) so runs repeat."""
    check_num_classes(num_classes, y)
    # Drawing an offset in [1, K) and wrapping can never land on y and stays uniform.
    offset = torch.randint(1, num_classes, (y.shape[0],), generator=generator, device="cpu")
    return (y.cpu().long() + offset).remainder(num_classes).to(y.device)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Model predictions (B,) int64 for inputs x."""
    return model(x).argmax(dim=1)


def finish(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor | None,
    grad_evals: Tensor,
) -> AttackResult:
    """Build the result, recomputing predictions and success from the model on x_adv."""
    x_adv = x_adv.detach().clamp(0.0, 1.0)
    adv_pred = predict(model, x_adv)
    if target is None:
        success = adv_pred != y
        target_out = torch.full_like(y, -1, dtype=torch.int64)
    else:
        success = adv_pred == target
        target_out = target.long()
    return AttackResult(
        x_adv=x_adv,
        success=success,
        adv_pred=adv_pred.long(),
        target=target_out,
        grad_evals=grad_evals.long().to(x_adv.device),
    )
