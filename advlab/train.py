"""Training: minibatch SGD/Adam with the paper's explicit weight-decay penalty.

A training set in memory is one tensor, so a batch is an index, not a DataLoader round trip; a
streaming set (advlab.streaming) is read batch by batch by DataLoader workers. Shuffling and
augmentation use a generator seeded by the trial, which keeps CPU runs deterministic.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from advlab import streaming
from advlab.adversarial_training import AdversarialObjective
from advlab.augment import augment_batch, autocast, grad_scaler
from advlab.models import decay_terms
from advlab.robust_validation import RobustValidation
from advlab.runtime import error_rate
from advlab.spec import TrainSpec


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    loss: float  # mean cross-entropy over the epoch's batches + the penalty at the epoch's end
    train_error: float  # on each batch as it was trained on: free, unlike a second pass
    test_error: float  # after the epoch (NaN on epochs skipped by train.eval_every)
    seconds: float
    adv_grad_evals: int = 0  # gradient evaluations spent on adversarial examples, cumulative
    train_eps: float = math.nan  # the training budget of this epoch (0 for standard training)
    val_robust_error: float = math.nan  # PGD robust error on the validation slice, when due


def penalty_value(model: nn.Module, weight_decay: float | Sequence[float]) -> float:
    """The paper's penalty sum_k lambda_k ||W_k||_F^2 at the model's current weights."""
    with torch.no_grad():
        return float(sum(lam * w.pow(2).sum() for lam, w in decay_terms(model, weight_decay)))


def make_optimizer(
    model: nn.Module, settings: TrainSpec, weight_decay: float | Sequence[float] = 0.0
) -> torch.optim.Optimizer:
    """An optimizer whose parameter groups carry the paper's penalty as its exact gradient.

    torch's SGD and Adam add `weight_decay * W` to the gradient (coupled L2, not AdamW), so a
    group with weight_decay = 2 lambda_k optimises CE + lambda_k ||W_k||^2 exactly, inside the
    optimizer's fused update instead of as extra autograd work at every step.
    """
    terms = decay_terms(model, weight_decay)
    decayed = {id(w) for _, w in terms}
    groups: list[dict] = [{"params": [w], "weight_decay": 2 * lam} for lam, w in terms]
    rest = [p for p in model.parameters() if id(p) not in decayed]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return optimizer_for(groups, settings)


def optimizer_for(params: list, settings: TrainSpec) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)


def lr_at(settings: TrainSpec, epoch: int) -> float:
    """The learning rate of epoch `epoch` (1-based) under settings.lr_schedule.

    A function of the epoch alone, so a resumed run needs no scheduler state to continue."""
    if settings.lr_schedule == "cosine":
        return settings.lr * (1 + math.cos(math.pi * (epoch - 1) / settings.epochs)) / 2
    if settings.lr_schedule == "step":
        done = (epoch - 1) / settings.epochs
        return settings.lr * (0.1 if done >= 0.5 else 1.0) * (0.1 if done >= 0.75 else 1.0)
    return settings.lr


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> list[Tensor]:
    """A seeded shuffle drawn on the CPU (same order on any device), split into batches."""
    order = torch.randperm(n, generator=generator).to(device)
    return list(order.split(batch_size))


def pretrain_autoencoder(
    model: nn.Module, x: Tensor, settings: TrainSpec, generator: torch.Generator
) -> list[float]:
    """Fit encoder and decoder by the model's own pretraining loss (plain, denoising, contractive
    or variational: advlab.autoencoders); returns the loss per epoch. The classifier is left."""
    params = [p for name, p in model.named_parameters() if not name.startswith("classifier")]
    optimizer = optimizer_for(params, settings)
    losses = []
    model.train()
    for _ in range(settings.ae_epochs):
        total = torch.zeros((), device=x.device)
        order = batches(len(x), settings.batch_size, generator, x.device)
        for idx in order:
            loss = _pretraining_loss(model, x[idx], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        losses.append(total.item() / len(order))
    return losses


def _pretraining_loss(model: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    own = getattr(model, "pretraining_loss", None)
    if callable(own):
        return own(x, generator)
    return nn.functional.mse_loss(model.reconstruct(x), x)  # a module of yours with reconstruct


EpochHook = Callable[[EpochStats, Callable[[], dict[str, Any]]], None]


def train_model(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    settings: TrainSpec,
    weight_decay: float | Sequence[float],
    seed: int,
    on_epoch: EpochHook | None = None,
    resume: dict[str, Any] | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
) -> list[EpochStats]:
    """Train in place; the data must already be on the model's device.

    After each epoch `on_epoch(stats, state)` is called; `state()` builds a checkpoint only if
    asked, and passing it as `resume` continues to the same weights as an uninterrupted run.
    `validation` (x, y), held out of the training data, turns robust validation on; under
    `keep: best` the model ends with its best robust validation epoch's weights."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, settings, weight_decay)
    objective = AdversarialObjective(model, settings.adversarial, seed)
    validator = None if validation is None else RobustValidation(settings, *validation, seed)
    history: list[EpochStats] = []
    if resume is not None:
        history = restore(resume, model, optimizer, generator, objective, validator)
    elif hasattr(model, "reconstruct") and settings.ae_epochs > 0:
        pretrain_autoencoder(model, x_train, settings, generator)

    state = functools.partial(
        checkpoint, model, optimizer, generator, objective, validator, history
    )
    for epoch in range(len(history) + 1, settings.epochs + 1):
        train_eps = objective.start_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, epoch)
        stats = train_epoch(
            model, objective, optimizer, x_train, y_train, settings, generator, epoch
        )
        objective.end_epoch(x_train, y_train)
        history.append(
            replace(
                stats,
                loss=stats.loss + penalty_value(model, weight_decay),
                test_error=test_error_now(model, x_test, y_test, epoch, settings),
                adv_grad_evals=objective.grad_evals,
                train_eps=train_eps,
                val_robust_error=math.nan if validator is None else validator.check(model, epoch),
            )
        )
        if on_epoch is not None:
            on_epoch(history[-1], state)
    if validator is not None:
        validator.finish(model)
    model.eval()
    return history


def checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    objective: AdversarialObjective,
    validator: RobustValidation | None,
    history: list[EpochStats],
) -> dict[str, Any]:
    """Everything `restore` needs to continue training exactly where it stopped."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "adversarial": objective.state(),
        "validation": None if validator is None else validator.state(),
        "history": [asdict(h) for h in history],
    }


def restore(
    saved: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    objective: AdversarialObjective,
    validator: RobustValidation | None,
) -> list[EpochStats]:
    """Put every piece of training state back from a checkpoint; returns the history so far."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    objective.load_state(saved["adversarial"])
    if validator is not None:
        validator.load_state(saved["validation"])
    return [EpochStats(**row) for row in saved["history"]]


def step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    objective: AdversarialObjective,
) -> None:
    """Backward and the optimizer's step; under float16, with the loss scaled (GradScaler) and
    the step skipped where the scaled gradients overflowed."""
    if scaler is None:
        loss.backward()
        objective.after_backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    objective.after_backward()
    scaler.step(optimizer)
    scaler.update()


def test_error_now(
    model: nn.Module, x: Tensor, y: Tensor, epoch: int, settings: TrainSpec
) -> float:
    """Test error after this epoch if it is due (every `eval_every` epochs and the last)."""
    due = epoch == settings.epochs or (settings.eval_every and epoch % settings.eval_every == 0)
    return error_rate(model, x, y) if due else math.nan


def train_epoch(
    model: nn.Module,
    objective: AdversarialObjective,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    settings: TrainSpec,
    generator: torch.Generator,
    epoch: int,
) -> EpochStats:
    """One pass over the shuffled data; loss is the mean objective over the optimizer steps
    (penalty added later). Free training steps `replays` times per batch; its train error
    counts each batch once, at its first replay, as the model first met it."""
    start = time.perf_counter()
    model.train()
    device = y.device
    # Accumulate on the device: a .item() per step would sync a GPU every batch.
    total = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    order = batches(len(x), settings.batch_size, generator, device)
    scaler = grad_scaler(settings.precision, device)
    for xb, yb in streaming.batches(x, y, order):
        xb = augment_batch(xb, settings.augment, generator)
        for replay in range(objective.replays):
            with autocast(settings.precision, device):
                loss, logits = objective.loss(xb, yb, track=replay == 0)
            optimizer.zero_grad(set_to_none=True)
            step(loss, optimizer, scaler, objective)
            total += loss.detach().float()
            if replay == 0 and logits is not None:
                wrong += (logits.detach().argmax(1) != yb).sum()
    return EpochStats(
        epoch=epoch,
        loss=total.item() / (len(order) * objective.replays),
        train_error=wrong.item() / len(x),
        test_error=math.nan,
        seconds=time.perf_counter() - start,
    )
