"""The evaluation health checks: each fires on a case built to break it, with the numbers in its
detail, and none fires on a healthy trial; a trial writes the health table and its flag reaches
W&B and the sweep's summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_sweep
from torch import Tensor, nn
from wandb_reader import offline_run_dirs, read_offline_run

from advlab.data import load_dataset
from advlab.measures.health import (
    BOX_TOLERANCE,
    HEALTH,
    above_chance,
    inside_box,
    minimisation_success,
    monotone_robust_error,
)
from advlab.models import build_model
from advlab.runtime import predict
from advlab.store import SweepStore
from advlab.sweep import SweepOutcome, flag_lines, summary_lines, trial_context
from advlab.sweepfile import parse_sweep
from advlab.trial import run_trial

# The digits test split: 450 images, class 3 the most common (46 of them).
CONSTANT_ERROR = 1 - 46 / 450


def stuck_net(
    input_shape: tuple[int, int, int], num_classes: int, favoured: int = 3, hidden: int = 16
) -> nn.Module:
    """A net whose last layer's weights are zero (and frozen) and whose bias favours one class:
    whatever training does, it predicts `favoured` for every image, as the issue's PGD-trained
    digits net did (90.6% test error, status ok)."""
    c, h, w = input_shape
    last = nn.Linear(hidden, num_classes)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[favoured] = 1.0
    last.requires_grad_(False)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), last)


@pytest.fixture(scope="module")
def digits_net(one_torch_thread) -> tuple[nn.Module, Tensor, Tensor]:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("fc32-10", (1, 8, 8), 10, "relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):  # full batch, well under a second: a few percent test error
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    return model.eval(), data.x_test, data.y_test


def test_a_constant_predictor_is_at_chance_and_a_trained_net_is_not(digits_net) -> None:
    model, x, y = digits_net
    healthy = above_chance(predict(model, x), y, 10)
    error = float((predict(model, x) != y).float().mean())
    assert error < 0.1 and healthy["passed"] is True
    numbers = f"test error {error:.1%}, chance 89.8% (10 classes)"  # 46 of 450 are class 3
    assert healthy["detail"] == f"{numbers}; predicts 10 classes"
    # The same net with its last layer's weights zeroed and its bias favouring class 3.
    last = model[-1]
    with torch.no_grad():
        saved = last.weight.clone(), last.bias.clone()
        last.weight.zero_()
        last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10).float())
    try:
        stuck = above_chance(predict(model, x), y, 10)
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])
    assert stuck == {
        "check": "above_chance",
        "passed": False,
        "detail": "at chance: test error 89.8%, chance 89.8% (10 classes); a constant "
        "predictor: all 450 test predictions are class 3",
    }


def test_chance_counts_the_margin_and_the_class_balance() -> None:
    y = torch.arange(100) % 4  # 25 of each of 4 classes: chance is 75% error
    # Right on 29 of 100, 4 points above chance's 25% accuracy (under the 5-point margin):
    # flagged; right on 31, 6 points above: not.
    guesses = torch.where(torch.arange(100) < 29, y, (y + 1) % 4)
    near = above_chance(guesses, y, 4)
    assert near["detail"] == "at chance: test error 71.0%, chance 75.0% (4 classes)"
    better = torch.where(torch.arange(100) < 31, y, (y + 1) % 4)
    assert above_chance(better, y, 4)["passed"] is True
    # On an unbalanced test set the best constant predictor sets chance (90 of 100 are class
    # 0: 10% error, not 1 - 1/2): 8% error is at chance, 4% is not.
    skewed = torch.tensor([0] * 90 + [1] * 10)
    mostly_zero = above_chance(torch.tensor([0] * 98 + [1] * 2), skewed, 2)
    assert mostly_zero["detail"] == "at chance: test error 8.0%, chance 10.0% (2 classes)"
    assert above_chance(torch.tensor([0] * 94 + [1] * 6), skewed, 2)["passed"] is True
    none = torch.zeros(0, dtype=torch.int64)
    assert above_chance(none, none, 2) == {
        "check": "above_chance", "passed": None, "detail": "no test examples",
    }  # fmt: skip


def attack_row(attack: str, kind: str, success: float | None, n: int = 200) -> dict:
    return {"attack": attack, "kind": kind, "status": "ok", "success_rate": success, "n": n}


def test_a_minimisation_attack_short_of_every_example_is_flagged() -> None:
    rows = [
        attack_row("lbfgs", "minimization", 194 / 200),
        attack_row("deepfool", "minimization", 1.0),
        attack_row("fgsm", "fixed_budget", 0.3),  # a budget caps it: no promise to fool all
        attack_row("cw", "minimization", None) | {"status": "failed"},
    ]
    check = minimisation_success(rows)
    assert check["passed"] is False
    assert check["detail"] == "lbfgs fools only 97.0% (194 of 200) with no budget limit"
    assert minimisation_success(rows[1:])["passed"] is True
    assert minimisation_success(rows[2:]) == {
        "check": "minimisation_success", "passed": None, "detail": "no minimisation attack ran",
    }  # fmt: skip


def examples(*images: list[float], attack: str = "pgd", budget: float = 0.3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "attack": attack,
            "budget": budget,
            "x_adv": [np.asarray(i, dtype=np.float32) for i in images],
        }
    )


def test_adversarials_outside_the_box_are_flagged_beyond_round_off() -> None:
    edge = np.float32(1) + np.float32(2**-23)  # one float32 step above 1: round-off, inside
    inside = examples([0.0, 0.5, edge], [np.float32(-(2**-24)), 1.0, 0.2])
    assert inside_box(inside)["passed"] is True
    assert 2**-23 < BOX_TOLERANCE < 1 / 255 / 1000
    outside = pd.concat(
        [
            inside,
            examples([0.5, 1.002, 1.0], [-0.03, 0.5, 0.5]),
            examples([0.1, float("nan")], attack="lbfgs", budget=None),
        ]
    )
    check = inside_box(outside)
    assert check["passed"] is False
    assert check["detail"] == (
        "lbfgs: 1 pixel values of 1 examples outside [0, 1] (min 0.1, max 0.1); "
        "pgd at eps 0.3: 2 pixel values of 2 examples outside [0, 1] (min -0.03, max 1.002)"
    )


def curve(attack: str, budget: float, robust_error: float) -> dict:
    return {"attack": attack, "budget": budget, "robust_error": robust_error}


def test_a_robust_error_falling_with_the_budget_is_flagged_for_any_fixed_budget_attack() -> None:
    # The noise attack is no gradient attack (the masking check ignores it); health does not.
    rows = [curve("noise", 0.1, 0.30), curve("noise", 0.2, 0.38), curve("noise", 0.3, 0.31)]
    rows += [curve("fgsm", 0.1, 0.40), curve("fgsm", 0.2, 0.38), curve("fgsm", 0.3, 0.60)]
    check = monotone_robust_error(rows, ["noise", "fgsm"])
    assert check["passed"] is False
    assert check["detail"] == (
        "noise robust error falls from 38.0% at eps 0.2 to 31.0% at eps 0.3, though the larger "
        "ball holds every adversarial of the smaller (a fall of 7.0 points; the check needs 5.0)"
    )
    # A dip under 5 points (fgsm's 2) is within an attack's own randomness.
    assert monotone_robust_error(rows[3:], ["fgsm"])["passed"] is True
    assert monotone_robust_error([curve("pgd", 0.1, 0.5)], ["pgd"])["passed"] is None


def test_an_attack_below_the_certified_radius_is_flagged() -> None:
    from types import SimpleNamespace

    from advlab.measures.health import above_certified_bound

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x).argmax(1)
    model = SimpleNamespace(gradients=True, module=module)
    ctx = SimpleNamespace(model=model, attacked=SimpleNamespace(x=x, y=y))
    # A linear model's IBP radius in Linf is its exact minimum (about 0.1-1 here): an
    # "adversarial" 1e-4 away cannot exist, one 2.0 away (beyond the box's corner) is fine.
    examples = pd.DataFrame(
        {"example": [0, 1], "attack": ["liar", "fair"], "success": [True, True],
         "dist_linf": [1e-4, 2.0], "dist_l2": [2.0, 4.0]}
    )  # fmt: skip
    check = above_certified_bound(ctx, examples)
    assert check["passed"] is False
    assert check["detail"].startswith("a bug in an attack or the bounds: liar at 0.0001 < ")
    assert "in linf (example 0)" in check["detail"] and "fair" not in check["detail"]
    fine = examples.assign(dist_linf=[2.0, 2.0])
    assert above_certified_bound(ctx, fine)["passed"] is True
    estimator = SimpleNamespace(model=SimpleNamespace(gradients=False), attacked=ctx.attacked)
    assert above_certified_bound(estimator, fine)["passed"] is None


def test_the_flag_and_metric_come_from_the_failed_checks() -> None:
    rows = [
        {"check": "a", "passed": True, "detail": "fine"},
        {"check": "b", "passed": False, "detail": "why b"},
        {"check": "c", "passed": None, "detail": "cannot apply"},
        {"check": "d", "passed": False, "detail": "why d"},
    ]
    assert HEALTH.flag(rows) == "why b; why d"
    assert HEALTH.metrics(rows) == {"health/failed_checks": 2.0}
    assert HEALTH.flag(rows[:1] + rows[2:3]) is None


def test_a_trial_writes_health_and_its_flag_reaches_wandb_and_the_summary(
    tmp_path: Path, one_torch_thread
) -> None:
    raw = tiny_sweep(
        name="health", grid={"model": ["fc16-10", "test_health:stuck_net"]},
        subset="all", train={"epochs": 5, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        eps=[0.05, 0.1, 0.2], attacks=[{"name": "fgsm"}, {"name": "deepfool"}],
    )  # fmt: skip
    spec = parse_sweep(raw)
    for index, trial in enumerate(spec.trials):
        run_trial(trial, trial_context(spec, index, str(tmp_path), "offline"))
    store = SweepStore(str(tmp_path), "health")
    healthy, stuck = spec.ids
    checks = store.read("health").set_index(["trial_id", "check"])
    order = ["minimisation_success", "inside_box", "monotone_robust_error", "above_chance",
             "above_certified_bound"]  # fmt: skip
    assert checks.loc[healthy].index.tolist() == order  # health is on by default
    assert checks.loc[healthy, "passed"].tolist() == [True] * 5, checks.loc[healthy, "detail"]
    found = checks.loc[(healthy, "above_certified_bound"), "detail"]
    assert found.endswith("adversarials, each at or above IBP's certified radius")
    assert checks.loc[(stuck, "above_chance"), "detail"] == (
        f"at chance: test error {CONSTANT_ERROR:.1%}, chance {CONSTANT_ERROR:.1%} (10 classes); "
        "a constant predictor: all 450 test predictions are class 3"
    )
    # Its gradients are zero, so DeepFool fools none of the class-3 images it attacks.
    assert checks.loc[(stuck, "minimisation_success"), "detail"] == (
        "deepfool fools only 0.0% (0 of 12) with no budget limit"
    )
    records = store.read("measures").set_index(["trial_id", "measure"])
    reason = records.loc[(stuck, "health"), "flag"]
    assert reason == "; ".join(checks.loc[stuck].query("passed == False")["detail"])
    assert records.loc[(healthy, "health"), "flag"] == ""
    trials = store.read("trials").set_index("trial_id")
    assert trials.loc[stuck, "status"] == "ok"  # as in the issue: only the flag says so
    assert trials.loc[stuck, "test_error"] == pytest.approx(CONSTANT_ERROR)
    runs = {read_offline_run(d)["run"]["id"]: read_offline_run(d) for d in offline_run_dirs(
        tmp_path / "health")}  # fmt: skip
    flagged, fine = runs[f"health-{stuck}"], runs[f"health-{healthy}"]
    assert "health-flagged" in flagged["run"]["tags"]
    assert flagged["summary"]["health/flag"] == reason
    assert flagged["summary"]["health/failed_checks"] == 2
    assert "health-flagged" not in fine["run"]["tags"]
    assert fine["summary"]["health/failed_checks"] == 0
    labels = {healthy: "fc16-10", stuck: "stuck"}
    assert flag_lines(store, labels, [healthy, stuck]) == [f"  health flagged stuck: {reason}"]
    outcome = SweepOutcome(store, "disabled", 2, [healthy, stuck], {}, [])
    lines = summary_lines(outcome)
    assert lines[0] == "advlab: 2/2 trials ok, 0 failed, 0 missing"
    assert lines[1] == f"  health flagged {stuck}: {reason}"  # no manifest here: the id
