"""Training: the explicit weight-decay penalty, seeded determinism, autoencoder pretraining."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.runtime import error_rate
from advlab.spec import TrainSpec
from advlab.train import lr_at, pretrain_autoencoder, train_model


def digits_half() -> tuple[torch.Tensor, ...]:
    data = load_dataset("digits")
    split = select_subset(data, "fraction:0.5")
    return data.x_train[split.train_idx], data.y_train[split.train_idx], data.x_test, data.y_test


def test_one_sgd_step_applies_cross_entropy_plus_per_layer_decay_gradient() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 10
    model = build_model("fc5-10", (1, 8, 8), 10)
    before = [p.detach().clone() for p in model.parameters()]
    lambdas = [0.3, 0.05]
    # The expected step: lr * (grad of mean cross-entropy + 2 lambda_k W_k on weights only).
    reference = build_model("fc5-10", (1, 8, 8), 10)
    reference.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(reference(x), y).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    settings = TrainSpec(epochs=1, batch_size=8, optimizer="sgd", lr=0.5, momentum=0.0)
    train_model(model, x, y, x, y, settings, lambdas, seed=0)
    weights = iter(lambdas)
    for (name, after), old, grad in zip(model.named_parameters(), before, grads, strict=True):
        decay = 2 * next(weights) * old if name.endswith("weight") else 0.0
        torch.testing.assert_close(after, old - 0.5 * (grad + decay), rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_and_history() -> None:
    x, y, xt, yt = digits_half()
    settings = TrainSpec(epochs=3, batch_size=32, optimizer="adam", lr=0.01)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("fc16-10", (1, 8, 8), 10)
        history = train_model(model, x, y, xt, yt, settings, 1e-4, seed=1)
        runs.append((model.state_dict(), [(h.loss, h.train_error, h.test_error) for h in history]))
    (w1, h1), (w2, h2) = runs
    assert h1 == h2
    for key in w1:
        assert torch.equal(w1[key], w2[key])


def test_training_learns_and_decay_shrinks_the_weights() -> None:
    x, y, xt, yt = digits_half()
    settings = TrainSpec(epochs=20, batch_size=32, optimizer="adam", lr=0.01)
    norms, errors = [], []
    for decay in (0.0, 0.1):
        torch.manual_seed(0)
        model = build_model("fc10", (1, 8, 8), 10)
        history = train_model(model, x, y, xt, yt, settings, decay, seed=0)
        norms.append(float(model[1].weight.detach().norm()))
        errors.append(history[-1].test_error)
    assert errors[0] < 0.1  # a softmax on digits pixels gets ~4% test error
    assert norms[1] < 0.5 * norms[0]
    assert errors[1] > errors[0]


def test_error_rate_on_a_hand_case() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.9]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 1, 1, 0])
    assert error_rate(model, x, y) == 0.5


def test_autoencoder_pretraining_lowers_reconstruction_error() -> None:
    x, _, _, _ = digits_half()
    torch.manual_seed(0)
    model = build_model("ae32-10", (1, 8, 8), 10)
    before = nn.functional.mse_loss(model.reconstruct(x), x).item()
    settings = TrainSpec(epochs=1, batch_size=32, optimizer="adam", lr=0.01, ae_epochs=10)
    losses = pretrain_autoencoder(model, x, settings, torch.Generator().manual_seed(0))
    after = nn.functional.mse_loss(model.reconstruct(x), x).item()
    assert len(losses) == 10
    assert after < 0.5 * before
    assert losses[-1] < losses[0]


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights() -> None:
    x, y, xt, yt = digits_half()
    settings = TrainSpec(epochs=4, batch_size=32, optimizer="adam", lr=0.01)

    def fresh() -> nn.Module:
        torch.manual_seed(3)
        return build_model("fc16-10", (1, 8, 8), 10)

    straight = fresh()
    full = train_model(straight, x, y, xt, yt, settings, 1e-3, seed=3)

    saved = {}

    def keep_epoch_2(stats, state) -> None:
        if stats.epoch == 2:
            saved.update(state())

    train_model(
        fresh(),
        x,
        y,
        xt,
        yt,
        settings.model_copy(update={"epochs": 2}),
        1e-3,
        3,
        on_epoch=keep_epoch_2,
    )
    resumed = fresh()
    history = train_model(resumed, x, y, xt, yt, settings, 1e-3, seed=3, resume=saved)
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    assert [h.loss for h in history] == [h.loss for h in full]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_learning_rate_schedules_by_hand() -> None:
    cosine = TrainSpec(epochs=4, lr=0.2, lr_schedule="cosine")
    expected = [0.2, 0.1 * (1 + math.sqrt(0.5)), 0.1, 0.1 * (1 - math.sqrt(0.5))]
    for epoch, lr in enumerate(expected, start=1):
        assert lr_at(cosine, epoch) == pytest.approx(lr, rel=1e-12)
    step = TrainSpec(epochs=8, lr=0.2, lr_schedule="step")
    got = [lr_at(step, epoch) for epoch in range(1, 9)]
    assert got == pytest.approx([0.2] * 4 + [0.02] * 2 + [0.002] * 2, rel=1e-12)
    assert {lr_at(TrainSpec(epochs=3, lr=0.2), e) for e in (1, 2, 3)} == {0.2}


def _fc16() -> nn.Module:
    torch.manual_seed(3)
    return build_model("fc16-10", (1, 8, 8), 10)


def test_the_schedule_sets_each_epochs_learning_rate() -> None:
    """Step decay over 2 epochs = epoch 1 at lr, then a resumed run at a tenth of it."""
    x, y, xt, yt = digits_half()
    base = TrainSpec(epochs=2, batch_size=64, optimizer="sgd", lr=0.1)
    scheduled = _fc16()
    train_model(
        scheduled, x, y, xt, yt, base.model_copy(update={"lr_schedule": "step"}), 0.0, seed=1
    )
    saved: dict = {}
    one = base.model_copy(update={"epochs": 1})
    train_model(_fc16(), x, y, xt, yt, one, 0.0, 1, on_epoch=lambda _, s: saved.update(s()))
    by_hand = _fc16()
    train_model(
        by_hand, x, y, xt, yt, base.model_copy(update={"lr": 0.01}), 0.0, seed=1, resume=saved
    )
    for key, value in scheduled.state_dict().items():
        assert torch.equal(value, by_hand.state_dict()[key]), key
    constant = _fc16()
    train_model(constant, x, y, xt, yt, base, 0.0, seed=1)
    assert not torch.equal(constant.state_dict()["1.weight"], scheduled.state_dict()["1.weight"])


def test_a_cosine_run_resumes_to_the_uninterrupted_weights() -> None:
    x, y, xt, yt = digits_half()
    settings = TrainSpec(epochs=4, batch_size=32, optimizer="adam", lr=0.01, lr_schedule="cosine")
    saved: dict = {}

    def keep_epoch_2(stats, state) -> None:
        if stats.epoch == 2:  # a copy: the run goes on training the tensors state() refers to
            saved.update(copy.deepcopy(state()))

    straight = _fc16()
    full = train_model(straight, x, y, xt, yt, settings, 0.0, 3, on_epoch=keep_epoch_2)
    resumed = _fc16()
    history = train_model(resumed, x, y, xt, yt, settings, 0.0, seed=3, resume=saved)
    assert [h.loss for h in history] == [h.loss for h in full]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
