"""Robust validation: a deterministic slice of the training subset, the best robust checkpoint
kept and evaluated, and both surviving a checkpoint and resume."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_sweep
from torch import nn

from advlab.attacks.registry import run_attack
from advlab.data import load_dataset, select_subset
from advlab.measure import robust_error
from advlab.models import build_model
from advlab.robust_validation import carve_validation, evaluated_epoch, pgd_robust_error
from advlab.runtime import predict
from advlab.spec import AdversarialTrainingSpec, TrainSpec, ValidationSpec
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.train import train_model
from advlab.trial import run_trial


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    data = load_dataset("digits")
    split = select_subset(data, "fraction:0.5")
    x, y = data.x_train[split.train_idx], data.y_train[split.train_idx]
    fit, held = carve_validation(len(x), 0.25, seed=0)
    return x[fit], y[fit], x[held], y[held], data.x_test, data.y_test


def settings(epochs: int = 5, keep: str = "best", every: int = 1, **adversarial) -> TrainSpec:
    return TrainSpec(
        epochs=epochs,
        batch_size=32,
        optimizer="adam",
        lr=0.03,
        adversarial=AdversarialTrainingSpec(**adversarial),
        validation=ValidationSpec(fraction=0.25, every=every, eps=0.1, steps=5, keep=keep),
    )


def fresh() -> nn.Module:
    torch.manual_seed(2)
    return build_model("fc16-10", (1, 8, 8), 10)


def test_the_slice_is_deterministic_disjoint_and_sized() -> None:
    fit, held = carve_validation(200, 0.1, seed=3)
    again = carve_validation(200, 0.1, seed=3)
    assert torch.equal(fit, again[0]) and torch.equal(held, again[1])
    assert len(held) == 20 and len(fit) == 180
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(200))
    assert not torch.equal(held, carve_validation(200, 0.1, seed=4)[1])  # the split seed decides
    everything, nothing = carve_validation(200, 0.0, seed=3)
    assert torch.equal(everything, torch.arange(200)) and len(nothing) == 0  # order kept
    with pytest.raises(ValueError, match=r"train\.validation\.fraction: 0\.001 of 200"):
        carve_validation(200, 0.001, seed=0)


def test_validation_measures_without_changing_training(digits) -> None:
    x, y, xv, yv, xt, yt = digits
    plain = fresh()
    train_model(plain, x, y, xt, yt, settings(keep="last", every=2, method="fgsm"), 1e-4, 0)
    validated = fresh()
    history = train_model(
        validated, x, y, xt, yt, settings(keep="last", every=2, method="fgsm"), 1e-4, 0,
        validation=(xv, yv),
    )  # fmt: skip
    for key, value in plain.state_dict().items():
        assert torch.equal(value, validated.state_dict()[key]), key
    errors = [h.val_robust_error for h in history]
    assert [math.isnan(e) for e in errors] == [True, False, True, False, False]  # 2, 4, last
    # The recorded number is the robust error of the weights at that epoch, recomputed.
    assert errors[-1] == pgd_robust_error(validated, xv, yv, eps=0.1, steps=5, seed=0)
    assert 0 < errors[-1] < 1


def test_keep_best_evaluates_the_weights_of_the_best_robust_epoch(digits) -> None:
    x, y, xv, yv, xt, yt = digits
    snapshots = {}

    def keep_weights(stats, state) -> None:
        snapshots[stats.epoch] = {k: v.clone() for k, v in state()["model"].items()}

    model = fresh()
    history = train_model(
        model, x, y, xt, yt, settings(epochs=6, method="fgsm", eps=0.3), 1e-4, 0,
        on_epoch=keep_weights, validation=(xv, yv),
    )  # fmt: skip
    errors = [h.val_robust_error for h in history]
    best = errors.index(min(errors)) + 1
    assert best < 6, errors  # FGSM training at eps 0.3: robust error rises again after epoch 5
    assert evaluated_epoch([vars(h) for h in history], settings(epochs=6)) == best
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[best][key]), key
    assert pgd_robust_error(model, xv, yv, eps=0.1, steps=5, seed=0) == min(errors)


def test_resume_keeps_the_best_checkpoint_and_the_free_perturbation(digits) -> None:
    x, y, xv, yv, xt, yt = digits
    train_settings = settings(epochs=4, method="free", eps=0.2, replays=2)
    straight = fresh()
    full = train_model(straight, x, y, xt, yt, train_settings, 1e-4, 0, validation=(xv, yv))
    saved = {}

    def keep_epoch_2(stats, state) -> None:
        if stats.epoch == 2:  # serialised as sweep.py does, so later epochs cannot touch it
            buffer = io.BytesIO()
            torch.save(state(), buffer)
            buffer.seek(0)
            saved.update(torch.load(buffer, weights_only=True))

    train_model(
        fresh(), x, y, xt, yt, train_settings, 1e-4, 0, on_epoch=keep_epoch_2,
        validation=(xv, yv),
    )  # fmt: skip
    assert saved["adversarial"]["free_delta"].abs().max() > 0
    resumed = fresh()
    history = train_model(
        resumed, x, y, xt, yt, train_settings, 1e-4, 0, resume=saved, validation=(xv, yv)
    )
    assert [(h.loss, h.val_robust_error) for h in history] == [
        (h.loss, h.val_robust_error) for h in full
    ]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_trial_records_the_slice_the_budgets_and_the_evaluated_epoch(tmp_path: Path) -> None:
    train = {
        "epochs": 4,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.01,
        "adversarial": {"method": "pgd", "eps": 0.1, "pgd_steps": 2, "warmup_epochs": 2},
        "validation": {"fraction": 0.2, "every": 3, "steps": 3},
    }
    spec = parse_sweep(tiny_sweep(name="val", grid={"seed": [0]}, train=train, eps=[0.1]))
    row = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled")).row
    assert row["n_validation"] == 135 and row["n_train"] == 539  # 674 = digits' half subset
    epochs = SweepStore(str(tmp_path), "val").read("epochs").set_index("epoch")
    assert epochs["train_eps"].tolist() == [0.05, 0.1, 0.1, 0.1]
    assert epochs["val_robust_error"].isna().tolist() == [True, True, False, False]
    best = int(epochs["val_robust_error"].idxmin())
    assert row["evaluated_epoch"] == best
    assert row["val_robust_error"] == epochs.loc[best, "val_robust_error"]


def test_validation_robust_error_is_measure_robust_error_with_every_example_attacked(digits):
    x, y, xv, yv, xt, yt = digits
    model = fresh()
    train_model(model, x, y, xt, yt, settings(epochs=2), 1e-4, 0)
    clean_wrong = predict(model, xv) != yv
    assert 0 < int(clean_wrong.sum()) < len(yv)  # the slice holds clean mistakes and others
    success = run_attack(
        "pgd", model.eval(), xv, yv, eps=0.1, steps=5, generator=torch.Generator().manual_seed(0)
    ).success
    error = pgd_robust_error(model, xv, yv, eps=0.1, steps=5, seed=0)
    wrong = int(success.sum())
    # measure.robust_error with nothing skipped, the exact fraction (not float32's rounding).
    assert error == robust_error(success, clean_wrong=0) == wrong / len(yv)
    # Here PGD leaves every clean mistake misclassified, so a trial's convention (attack the
    # correct ones, count every clean mistake) gives the same count.
    assert bool(success[clean_wrong].all())
    assert robust_error(success[~clean_wrong], int(clean_wrong.sum())) == wrong / len(yv)


class _WrongOnlyAtGray(nn.Module):
    """Class 1 within 1e-3 (Linf) of the gray image, class 0 elsewhere; a zero input gradient,
    so PGD stays wherever its random start lands."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = ((x - 0.5).abs().flatten(1).amax(1) < 1e-3).float()
        return torch.stack([1 - near, near], 1) * self.scale + 0 * x.flatten(1).sum(1)[:, None]


def test_a_clean_mistake_pgd_puts_right_is_not_counted_by_validation() -> None:
    """Where the two conventions part: validation attacks its clean mistakes, and the gray
    image (a clean mistake) is classified right at PGD's random start and stays there."""
    model = _WrongOnlyAtGray()
    x = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.2)])
    y = torch.tensor([0, 0])
    assert predict(model, x).tolist() == [1, 0]
    assert pgd_robust_error(model, x, y, eps=0.1, steps=5, seed=0) == 0.0
    # A trial attacks only the correct one and counts the clean mistake: 1 of 2 wrong.
    success = run_attack("pgd", model, x[1:], y[1:], eps=0.1, steps=5).success
    assert robust_error(success, clean_wrong=1) == 0.5
