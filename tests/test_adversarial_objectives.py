"""TRADES, fast and free training, the budget warm-up and the step rule: known answers; a method
added through the registry trains, validates and resumes like the built-in ones."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import sweep_files, tiny_sweep
from torch import nn

import advlab.adversarial_training as adv
import advlab.training_methods as methods
from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.spec import (
    AdversarialTrainingSpec,
    SpecError,
    TrainSpec,
    TrialSpec,
)
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import load_sweep, parse_sweep
from advlab.train import batches, make_optimizer, train_model
from advlab.training_methods import (
    AdversarialBatches,
    TrainingMethod,
    TrainingMethodError,
    mixed_loss,
)
from advlab.training_perturbations import fast_batch, kl_to_clean, trades_batch
from advlab.trial import run_trial

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    data = load_dataset("digits")
    split = select_subset(data, "fraction:0.5")
    return data.x_train[split.train_idx], data.y_train[split.train_idx], data.x_test, data.y_test


def settings(epochs: int = 3, **adversarial) -> TrainSpec:
    return TrainSpec(
        epochs=epochs,
        batch_size=32,
        optimizer="adam",
        lr=0.01,
        adversarial=AdversarialTrainingSpec(**adversarial),
    )


def train(digits, train_settings: TrainSpec, **kw) -> tuple[nn.Module, list]:
    x, y, xt, yt = digits
    torch.manual_seed(0)
    model = build_model("fc16-10", (1, 8, 8), 10)
    history = train_model(model, x, y, xt, yt, train_settings, 1e-4, seed=0, **kw)
    return model, history


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.fixture(scope="module")
def standard(digits) -> nn.Module:
    return train(digits, settings())[0]


@pytest.mark.parametrize(
    "adversarial",
    [
        {"method": "fgsm", "mix": 0.0},
        {"method": "pgd", "mix": 0.0, "pgd_steps": 2},
        {"method": "fast"},
        {"method": "fast", "mix": 0.0, "step_scale": 2.0},
        {"method": "trades", "pgd_steps": 2},
        {"method": "free", "replays": 1},
        {"method": "free", "replays": 1, "mix": 0.0},
        {"method": "pgd", "warmup_epochs": 2, "pgd_steps": 2},
    ],
    ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()),
)
def test_eps_zero_is_standard_training_bit_for_bit(digits, standard, adversarial) -> None:
    model, history = train(digits, settings(eps=0.0, **adversarial))
    assert_same_weights(standard, model)
    assert [h.train_eps for h in history] == [0.0, 0.0, 0.0]


def test_free_training_at_eps_zero_is_each_batch_replayed(digits) -> None:
    """With no budget, free training is plain training that steps `replays` times per batch."""
    x, y, _, _ = digits
    model, _ = train(digits, settings(epochs=2, method="free", eps=0.0, replays=3, mix=0.0))
    torch.manual_seed(0)
    by_hand = build_model("fc16-10", (1, 8, 8), 10)
    plain = settings(epochs=2)
    optimizer = make_optimizer(by_hand, plain, 1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in batches(len(x), 32, generator, x.device):
            for _ in range(3):
                loss = nn.functional.cross_entropy(by_hand(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    assert_same_weights(by_hand, model)


def test_trades_with_beta_zero_is_standard_training_bit_for_bit(digits, standard) -> None:
    model, history = train(digits, settings(method="trades", eps=0.2, beta=0.0, pgd_steps=2))
    assert_same_weights(standard, model)
    assert history[-1].adv_grad_evals == 3 * 2 * len(digits[0])  # the KL term was computed


def test_trades_beta_moves_the_weights_and_x_prime_raises_the_kl(digits) -> None:
    x = digits[0]
    model, _ = train(digits, settings(method="trades", eps=0.2, beta=6.0, pgd_steps=2))
    generator = torch.Generator().manual_seed(0)
    x_adv = trades_batch(model, x[:64], 0.2, steps=10, step=0.05, generator=generator)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x[:64]).abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        clean = torch.softmax(model(x[:64]), 1)
        noise = (x[:64] + 0.2 * (2 * torch.rand(x[:64].shape, generator=generator) - 1)).clamp(0, 1)
        kl_found = float(kl_to_clean(model(x_adv), clean))
        kl_random = float(kl_to_clean(model(noise), clean))
    assert kl_found > 3 * kl_random > 0  # the inner maximisation climbs, well past a random point


def test_warmup_reaches_the_target_eps_at_the_stated_epoch(digits, monkeypatch) -> None:
    spec = AdversarialTrainingSpec(method="fgsm", eps=0.3, warmup_epochs=3)
    budgets = [adv.budget_at(spec, epoch) for epoch in range(1, 6)]
    assert budgets == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3], abs=1e-12)
    assert budgets[2:] == [0.3, 0.3, 0.3] and budgets[1] < 0.3  # exactly eps from epoch 3 on
    largest: dict[int, float] = {}
    original = adv.AdversarialObjective.perturb

    def recording(self, x, y):
        x_adv = original(self, x, y)
        epoch = round(self.eps / 0.1)
        largest[epoch] = max(largest.get(epoch, 0.0), float((x_adv - x).abs().max()))
        return x_adv

    monkeypatch.setattr(adv.AdversarialObjective, "perturb", recording)
    _, history = train(digits, settings(epochs=5, method="fgsm", eps=0.3, warmup_epochs=3))
    assert [h.train_eps for h in history] == budgets
    # FGSM steps exactly the epoch's budget: the perturbation's largest entry is that budget.
    assert largest == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3}, abs=1e-6)


def test_step_size_is_a_multiple_of_the_epochs_budget(digits, monkeypatch) -> None:
    rules = [
        (AdversarialTrainingSpec(method="pgd", pgd_steps=10), 0.25),
        (AdversarialTrainingSpec(method="trades", pgd_steps=5), 0.5),
        (AdversarialTrainingSpec(method="fast"), 1.25),
        (AdversarialTrainingSpec(method="free"), 1.0),
        (AdversarialTrainingSpec(method="fast", step_scale=0.5), 0.5),
    ]
    for spec, multiple in rules:
        assert adv.step_size(spec, 0.2) == pytest.approx(multiple * 0.2, rel=1e-12), spec.method
    seen = set()

    def recording(model, x, y, eps, step, generator):
        seen.add((round(eps, 9), round(step, 9)))
        return fast_batch(model, x, y, eps, step, generator)

    monkeypatch.setattr(methods, "fast_batch", recording)
    train(digits, settings(epochs=4, method="fast", eps=0.2, warmup_epochs=4))
    assert seen == {(0.05, 0.0625), (0.1, 0.125), (0.15, 0.1875), (0.2, 0.25)}


def test_fast_step_moves_exactly_the_step_from_its_random_start() -> None:
    torch.manual_seed(0)
    model = build_model("fc16-10", (1, 8, 8), 10)
    x = torch.rand(32, 1, 8, 8) * 0.4 + 0.3  # far from the box's faces
    y = torch.arange(32) % 10
    start = x + 0.2 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) - 1)
    x_adv = fast_batch(model, x, y, 0.2, 0.05, torch.Generator().manual_seed(5))
    moved = (x_adv - start).abs()
    inside = (start - x).abs() <= 0.15  # a step of 0.05 cannot leave the ball from here
    torch.testing.assert_close(moved[inside], torch.full_like(moved[inside], 0.05))
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6


def test_free_perturbation_stays_in_budget_and_box_and_counts_replays(digits) -> None:
    x, _, _, _ = digits
    seen = []
    original = adv.FreePerturbation.advance

    def recording(self, eps, step):
        original(self, eps, step)
        seen.append(self.delta.clone())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adv.FreePerturbation, "advance", recording)
        _, history = train(digits, settings(epochs=1, method="free", eps=0.1, replays=3))
    assert len(seen) == 3 * -(-len(x) // 32)  # one step per replay of every batch
    assert all(d.abs().max() <= 0.1 + 1e-7 for d in seen)
    assert seen[-1].abs().max() == pytest.approx(0.1)  # it climbed to the budget
    assert history[-1].adv_grad_evals == 3 * len(x)


@pytest.mark.parametrize(
    ("adversarial", "message"),
    [
        ({"method": "fgsm", "step_scale": 0.5}, r"train\.adversarial\.step_scale: method fgsm"),
        ({"method": "pgd", "replays": 2}, r"train\.adversarial\.replays: method pgd"),
        ({"method": "pgd", "beta": 1.0}, r"train\.adversarial\.beta: method pgd"),
        ({"method": "trades", "mix": 0.0}, r"train\.adversarial\.mix: trades weighs"),
        ({"method": "pgd", "warmup_epochs": 9}, r"train\.adversarial\.warmup_epochs: 9 is more"),
        ({"method": "trades", "beta": -1}, r"train\.adversarial\.beta"),
    ],
)
def test_bad_adversarial_settings_are_one_line_errors(adversarial, message) -> None:
    raw = tiny_sweep(train={"epochs": 3, "adversarial": adversarial})
    with pytest.raises(SpecError, match=message) as caught:
        parse_sweep(raw)
    assert "\n" not in str(caught.value)


def test_every_sweep_files_trials_survive_the_trip_to_a_ray_worker() -> None:
    """tune_trainable rebuilds each TrialSpec from its full JSON dump, defaults and all."""
    for path in sweep_files():
        for trial in load_sweep(path).trials:
            again = TrialSpec.model_validate(trial.model_dump(mode="json"))
            assert again.trial_id() == trial.trial_id(), path


def test_standard_training_ignores_adversarial_settings_as_before() -> None:
    raw = tiny_sweep(train={"epochs": 3, "adversarial": {"method": "none", "beta": 1.0}})
    assert parse_sweep(raw).trials


def test_new_settings_leave_existing_trial_ids_and_training_keys_alone() -> None:
    spec = load_sweep(REPO / "sweeps" / "adversarial_training.yaml")
    # Recorded before TRADES, fast, free, warm-up, validation and strong attacks existed.
    assert [(t.trial_id(), t.training_key()) for t in spec.trials] == [
        ("33ab8b116f", "e6480be998"),
        ("3e2c683dac", "a5d31f0e11"),
        ("218b43f0e0", "d3d386a099"),
        ("9d10e81aa9", "8e01b420cc"),
        ("1ed6974a26", "4d959609dd"),
        ("6601016007", "4a0a8c3fc8"),
    ]


class SignNoiseTraining(AdversarialBatches):
    """A method no file of advlab knows: x moved eps along the sign of Gaussian noise. It counts
    the rows it perturbed and keeps the count in checkpoints."""

    def __init__(self, run) -> None:
        super().__init__(run)
        self.rows = 0
        self.budgets: list[float] = []

    def start_epoch(self, eps: float) -> None:
        self.budgets.append(eps)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        noise = torch.randn(x.shape, generator=self.run.generator).sign()
        return (x + self.run.eps * noise).clamp(0, 1)

    def state(self) -> dict:
        return {"sign_noise_rows": self.rows, "sign_noise_budgets": list(self.budgets)}

    def load_state(self, state: dict) -> None:
        self.rows, self.budgets = state["sign_noise_rows"], list(state["sign_noise_budgets"])


SIGN_NOISE = methods.register(
    TrainingMethod(
        "sign_noise", ("eps", "mix", "warmup_epochs"), SignNoiseTraining,
        optimizer_steps=lambda settings: 2,
    )
)  # fmt: skip


def test_a_method_added_through_the_registry_trains_and_resumes(digits, standard) -> None:
    x = digits[0]
    steps = 2 * -(-len(x) // 32)  # two optimizer steps per batch, as the method declares
    train_settings = settings(method="sign_noise", eps=0.2, warmup_epochs=2)
    seen = {}

    def keep(stats, state) -> None:
        seen[stats.epoch] = copy.deepcopy(state())  # later epochs train its tensors in place

    model, history = train(digits, train_settings, on_epoch=keep)
    assert [h.train_eps for h in history] == [0.1, 0.2, 0.2]  # the shared warm-up
    assert [seen[e]["adversarial"]["sign_noise_rows"] for e in (1, 2, 3)] == [
        2 * len(x),
        4 * len(x),
        6 * len(x),
    ]
    assert seen[3]["adversarial"]["sign_noise_budgets"] == [0.1, 0.2, 0.2]
    assert seen[3]["optimizer"]["state"][0]["step"] == 3 * steps
    assert history[-1].test_error < 0.5  # it learns
    assert any(not torch.equal(v, standard.state_dict()[k]) for k, v in model.state_dict().items())
    # eps 0 leaves x as it is: standard training that steps twice per batch.
    zero, _ = train(digits, settings(method="sign_noise", eps=0.0, mix=0.0))
    doubled, _ = train(digits, settings(method="free", eps=0.0, mix=0.0, replays=2))
    assert_same_weights(doubled, zero)
    resumed, again = train(digits, train_settings, resume=seen[1])
    assert_same_weights(model, resumed)
    assert [(h.loss, h.train_error) for h in again] == [(h.loss, h.train_error) for h in history]


def test_a_registered_method_is_checked_like_the_built_in_ones(tmp_path: Path) -> None:
    assert methods.reading("mix")[-1] == "sign_noise" and "sign_noise" in methods.names()
    for bad, message in [
        (
            {"beta": 1.0},
            r"train\.adversarial\.beta: method sign_noise does not use it \(only trades\)",
        ),
        ({"step_scale": 2.0}, r"step_scale: method sign_noise does not use it \(only pgd, trades,"),
    ]:
        raw = tiny_sweep(train={"epochs": 3, "adversarial": {"method": "sign_noise", **bad}})
        with pytest.raises(SpecError, match=message):
            parse_sweep(raw)
    train_cfg = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01}
    raw = tiny_sweep(
        name="noise", grid={"seed": [0]}, attacks=[{"name": "fgsm"}],
        train=train_cfg | {"adversarial": {"method": "sign_noise", "eps": 0.1}},
    )  # fmt: skip
    spec = parse_sweep(raw)
    row = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled")).row
    assert row["status"] == "ok"
    epochs = SweepStore(str(tmp_path), "noise").read("epochs")
    assert epochs["train_eps"].tolist() == [0.1, 0.1]


def test_the_registry_refuses_unknown_and_clashing_methods() -> None:
    assert methods.get("advlab.training_methods:FAST") is methods.FAST  # by import path
    with pytest.raises(
        TrainingMethodError, match=r"'trades-x' is no training method; did you mean 'trades'\?"
    ):
        methods.get("trades-x")
    with pytest.raises(TrainingMethodError, match=r"is a function, not a TrainingMethod"):
        methods.get("advlab.training_methods:mixed_loss")
    with pytest.raises(
        TrainingMethodError, match=r"cannot import training method 'no_such_module:X'"
    ):
        methods.get("no_such_module:X")
    with pytest.raises(TrainingMethodError, match=r"'pgd' is registered already"):
        methods.register(TrainingMethod("pgd", ("eps",), AdversarialBatches))
    with pytest.raises(TrainingMethodError, match=r"behaviour must be a Behaviour"):
        methods.register(TrainingMethod("odd", ("eps",), mixed_loss))  # type: ignore[arg-type]
    with pytest.raises(TrainingMethodError, match=r"training method none perturbs no batches"):
        adv.AdversarialObjective(nn.Linear(2, 2), AdversarialTrainingSpec(), 0).perturb(
            torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
        )
