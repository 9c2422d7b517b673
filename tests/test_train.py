"""Training: the explicit weight-decay penalty, seeded determinism, autoencoder pretraining."""

from __future__ import annotations

import torch
from torch import nn

from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.runtime import error_rate
from advlab.spec import TrainSpec
from advlab.train import pretrain_autoencoder, train_model


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
