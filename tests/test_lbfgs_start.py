"""L-BFGS started from other points (`start=`): known answers, the never-farther invariant, the
scipy oracle, batching, and the registry's `start: <attack>` setting."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from attack_cases import RowByRow
from conftest import assert_attack_contract as _assert_contract
from conftest import exact_untargeted_distance
from conftest import l2_distance as _l2
from conftest import predict_labels as _predict
from torch import Tensor, nn

from advlab.attacks import AttackError, ddn, lbfgs_attack, lbfgs_scipy_reference
from advlab.attacks.base import adversarial_margin, random_wrong_targets
from advlab.attacks.registry import run_attack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def linear_case(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """8 digits, the linear model's labels and the exact untargeted minimum L2 (box active)."""
    x = digits[0][520:528]
    y = _predict(linear10, x)
    exact = [exact_untargeted_distance(linear10[1], xi.flatten().double().numpy(), int(yi))
             for xi, yi in zip(x, y, strict=True)]  # fmt: skip
    return x, y, torch.tensor(exact, dtype=torch.float64)


@pytest.mark.parametrize(("start", "warm"), [("ddn", True), ("random", True), ("random", False)])
def test_any_start_reaches_the_exact_minimum_on_a_linear_model(
    linear10: nn.Sequential, linear_case: tuple[Tensor, Tensor, Tensor], start: str, warm: bool
) -> None:
    # Each target's penalty problem is convex on a linear model, so where the search starts
    # (an attack's adversarial point, or anywhere in the box) must not change the minimum;
    # warm=False restarts every solve from the start (the cold search), so each solve must
    # converge on its own: 100 iterations, not the warm search's 10.
    x, y, exact = linear_case
    if start == "ddn":
        first = ddn(linear10, x, y, steps=20).x_adv
    else:
        first = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    cold = {} if warm else {"warm_start": False, "max_iter": 100}
    result = lbfgs_attack(linear10, x, y, "all", loss="margin", start=first, **cold)
    _assert_contract(linear10, x, y, result)
    ratio = _l2(x, result).double() / exact
    assert result.success.all()
    assert (ratio >= 1 - 1e-4).all(), ratio  # nothing beats the exact minimum
    assert ratio.mean() <= 1.01, ratio


@pytest.mark.parametrize("target", ["untargeted", "all"])
def test_a_start_the_target_holds_is_never_returned_farther(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], target: str
) -> None:
    # The start is the search's first evaluated point, so where it is adversarial it is kept
    # unless something closer is found; a short DDN leaves room, which the search must take.
    # Under "all" the batch is repeated once per target class and every copy must start at
    # its own example's point (a start handed to the wrong copy breaks the bound).
    x, y = digits[0][1100:1116], digits[1][1100:1116]
    first = ddn(mlp, x, y, steps=8)
    with torch.no_grad():
        held = adversarial_margin(mlp(first.x_adv), y, None) > 1e-4
    assert held.sum() >= 8
    result = lbfgs_attack(mlp, x, y, target, loss="margin", start=first.x_adv)
    _assert_contract(mlp, x, y, result)
    before, after = _l2(x, first)[held], _l2(x, result)[held]
    assert result.success[held].all()
    assert (after <= before * (1 + 1e-6)).all(), after / before
    assert after.mean() <= 0.97 * before.mean(), (after.mean(), before.mean())


def test_a_started_search_agrees_with_the_scipy_reference(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1004], digits[1][1000:1004]
    t = random_wrong_targets(y, 10, torch.Generator().manual_seed(1))
    first = ddn(mlp, x, y, t, steps=10).x_adv
    ours = lbfgs_attack(mlp, x, y, t, loss="margin", start=first)
    ref = lbfgs_scipy_reference(mlp, x, y, t, loss="margin", start=first)
    assert torch.equal(ours.success, ref.success) and ours.success.all()
    ratio = _l2(x, ours) / _l2(x, ref)
    assert (ratio - 1).abs().max() <= 0.005, ratio


def test_a_started_row_does_not_depend_on_its_batch(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    # With the model evaluated row by row (RowByRow: a batched matmul sums in an order that
    # depends on the batch size, which the search carried to 4e-9 apart even in float64), the
    # only arithmetic that could differ between batches is the search's own, which is per row:
    # the halves must give the whole batch's rows exactly.
    model = RowByRow(mlp)
    x, y = digits[0][1200:1208], digits[1][1200:1208]
    first = ddn(model, x, y, steps=10).x_adv
    whole = lbfgs_attack(model, x, y, "untargeted", loss="margin", start=first)
    halves = [lbfgs_attack(model, x[s], y[s], "untargeted", loss="margin", start=first[s])
              for s in (slice(0, 3), slice(3, 8))]  # fmt: skip
    assert torch.equal(torch.cat([h.x_adv for h in halves]), whole.x_adv)
    assert torch.equal(torch.cat([h.grad_evals for h in halves]), whole.grad_evals)


def test_under_all_every_copy_starts_at_its_own_examples_point(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    # "all" repeats the batch once per target class. With one evaluation per target each copy
    # sees only its start, so an example's one success is the copy aimed at its start's class,
    # and the final bisection toward x keeps that class: a start tiled onto the wrong copies
    # shows up as another example's class.
    x, y = digits[0][1100:1116], digits[1][1100:1116]
    first = ddn(mlp, x, y, steps=8).x_adv
    start_class = _predict(mlp, first)
    assert (start_class != y).all()
    result = lbfgs_attack(mlp, x, y, "all", loss="margin", start=first, max_evals=1)
    assert result.success.all()
    assert torch.equal(_predict(mlp, result.x_adv), start_class)
    assert (_l2(x, result) <= (first - x).flatten(1).norm(dim=1) * (1 + 1e-6)).all()


def test_rows_whose_start_is_x_are_searched_as_without_a_start(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    # A failed start attack hands back x itself; those rows must get the plain search from x
    # (its first c of 100, not the started rows' 10), number for number, in float64.
    model = copy.deepcopy(mlp).double()
    x, y = digits[0][1400:1408].double(), digits[1][1400:1408]
    moved = torch.arange(8) % 2 == 0
    first = torch.where(moved.view(-1, 1, 1, 1), ddn(model, x, y, steps=10).x_adv, x)
    started = lbfgs_attack(model, x, y, "untargeted", loss="margin", start=first)
    plain = lbfgs_attack(model, x, y, "untargeted", loss="margin")
    same = ~moved
    torch.testing.assert_close(started.x_adv[same], plain.x_adv[same], atol=1e-9, rtol=0)
    assert torch.equal(started.grad_evals[same], plain.grad_evals[same])
    assert not torch.equal(started.grad_evals[moved], plain.grad_evals[moved])


def test_the_registry_runs_the_named_start_attack_first(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    # `start: ddn` in a sweep file is DDN's points handed to the search, evaluations summed;
    # random targets are drawn once, so the start attack goes for the same classes.
    x, y = digits[0][1300:1306], digits[1][1300:1306]
    gen = torch.Generator().manual_seed(2)
    named = run_attack("lbfgs", mlp, x, y, target="random", loss="margin", start="ddn",
                       start_settings={"steps": 12}, generator=gen)  # fmt: skip
    t = random_wrong_targets(y, 10, torch.Generator().manual_seed(2))
    first = ddn(mlp, x, y, t, steps=12)
    by_hand = lbfgs_attack(mlp, x, y, t, loss="margin", start=first.x_adv)
    assert torch.equal(named.target, t)
    torch.testing.assert_close(named.x_adv, by_hand.x_adv, atol=0, rtol=0)
    assert torch.equal(named.grad_evals, by_hand.grad_evals + first.grad_evals)


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (lambda x: x[:2], "start: expected points shaped like x"),
        (lambda x: x.numpy(), "start: expected points shaped like x"),
        (lambda x: x + 1, "start: needs finite pixels in [0, 1]"),
        (lambda x: x.masked_fill(x > 0.5, float("nan")), "start: needs finite pixels in [0, 1]"),
    ],
)
def test_a_bad_start_raises_one_line(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], start: Callable[[Tensor], Any], message: str
) -> None:
    x, y = digits[0][:4], digits[1][:4]
    with pytest.raises(AttackError, match="^" + message.replace("[", r"\[")) as info:
        lbfgs_attack(mlp, x, y, start=start(x))
    assert "\n" not in str(info.value)
