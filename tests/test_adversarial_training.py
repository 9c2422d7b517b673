"""Adversarial training: eps=0 is standard training, budgets are respected, the pool refreshes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import advlab.adversarial_training as adv
from advlab.attacks.gradient import fgsm
from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.spec import AdversarialTrainingSpec, TrainSpec
from advlab.train import train_model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    data = load_dataset("digits")
    split = select_subset(data, "fraction:0.5")
    return data.x_train[split.train_idx], data.y_train[split.train_idx], data.x_test, data.y_test


def train(digits, model_name: str = "fc16-10", epochs: int = 3, **adversarial) -> nn.Module:
    x, y, xt, yt = digits
    settings = TrainSpec(
        epochs=epochs,
        batch_size=32,
        optimizer="adam",
        lr=0.01,
        adversarial=AdversarialTrainingSpec(**adversarial),
    )
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10)
    train_model(model, x, y, xt, yt, settings, 1e-4, seed=0)
    return model


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_eps_zero_is_standard_training_exactly(digits, method: str) -> None:
    standard = train(digits)
    adversarial = train(digits, method=method, eps=0.0, mix=0.5, pgd_steps=3)
    for key, value in standard.state_dict().items():
        assert torch.equal(value, adversarial.state_dict()[key]), key


@pytest.mark.parametrize(("method", "eps"), [("fgsm", 0.1), ("pgd", 0.2)])
def test_every_training_batch_stays_in_the_box_and_the_budget(
    digits, method: str, eps: float, monkeypatch
) -> None:
    seen = []
    original = adv.AdversarialObjective.perturb

    def recording(self, x, y):
        x_adv = original(self, x, y)
        seen.append((x.clone(), x_adv.detach().clone()))
        return x_adv

    monkeypatch.setattr(adv.AdversarialObjective, "perturb", recording)
    train(digits, epochs=1, method=method, eps=eps, pgd_steps=4)
    assert len(seen) == -(-len(digits[0]) // 32)  # one adversarial batch per training batch
    for x, x_adv in seen:
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= eps + 1e-6
    assert any((x_adv - x).abs().max() > eps / 2 for x, x_adv in seen)  # it did move


def test_pool_refreshes_exactly_the_requested_fraction(digits) -> None:
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = build_model("fc16-10", (1, 8, 8), 10)
    pool = adv.AdversarialPool(model, layer=0, size=40, eps=0.1)
    generator = torch.Generator().manual_seed(0)
    first = pool.refresh(x, y, 0.25, generator)
    assert len(first) == 40 and (pool.generation == 1).all()  # an empty pool fills whole
    second = pool.refresh(x, y, 0.25, generator)
    assert len(second) == 10
    assert int((pool.generation == 2).sum()) == 10
    assert pool.inputs.min() >= 0 and pool.inputs.max() <= 1


def test_hidden_layer_pool_trains_only_the_layers_above(digits) -> None:
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = build_model("fc16-12-10", (1, 8, 8), 10)
    pool = adv.AdversarialPool(model, layer=1, size=20, eps=0.5)
    pool.refresh(x, y, 1.0, torch.Generator().manual_seed(0))
    assert pool.inputs.shape == (20, 16)  # outputs of the first hidden layer
    pool.loss(8, torch.Generator().manual_seed(1)).backward()
    assert model[1].weight.grad is None  # below the pool's layer: untouched
    assert model[3].weight.grad is not None and model[5].weight.grad is not None
    with pytest.raises(ValueError, match=r"hidden layers 1\.\.2"):
        adv.split_at_layer(model, 3)


def test_pool_training_runs_and_counts_its_gradient_evaluations(digits) -> None:
    x, y, xt, yt = digits
    settings = TrainSpec(
        epochs=3,
        batch_size=32,
        optimizer="adam",
        lr=0.01,
        adversarial=AdversarialTrainingSpec(
            method="pool", eps=0.1, pool_size=50, pool_refresh=0.2, pool_layers=[0, 1]
        ),
    )
    torch.manual_seed(0)
    model = build_model("fc16-10", (1, 8, 8), 10)
    history = train_model(model, x, y, xt, yt, settings, 1e-4, seed=0)
    # Two pools: filled after epoch 1 (50 each), then 10 fresh each after epochs 2 and 3.
    assert [h.adv_grad_evals for h in history] == [100, 120, 140]
    assert history[-1].test_error < 0.5  # it still learns


def test_pgd_training_makes_the_model_more_robust(digits) -> None:
    _, _, xt, yt = digits
    standard = train(digits, model_name="fc32-10", epochs=20)
    robust = train(digits, model_name="fc32-10", epochs=20, method="pgd", eps=0.1, mix=0.0)
    rates = [float(fgsm(m, xt, yt, 0.1).success.float().mean()) for m in (standard, robust)]
    assert rates[1] < 0.75 * rates[0]  # ~0.40 -> ~0.25 on this small sigmoid net
