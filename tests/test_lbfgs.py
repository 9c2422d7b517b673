"""The L-BFGS attack (Szegedy et al. 2014): known answers on linear models (the exact QP), the
scipy oracle, the c search, target modes, evaluation caps, settings and argument checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from attack_cases import wrong_targets as _targets
from conftest import assert_attack_contract as _assert_contract
from conftest import exact_linear_distance_slsqp as _exact_linear_target_distance
from conftest import exact_untargeted_distance
from conftest import l2_distance as _l2
from conftest import predict_labels as _predict
from torch import Tensor, nn

from advlab.attacks import (
    AttackError,
    lbfgs_attack,
    lbfgs_scipy_reference,
    linearized_distances,
    random_wrong_targets,
)
from advlab.attacks.lbfgs import LBFGSSettings, PenaltyObjective, lbfgs_settings
from advlab.attacks.registry import run_attack
from advlab.measure import distortions
from advlab.optim import minimize_box_lbfgs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def known_answer(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """16 digits, the linear model's labels and the exact untargeted minimum L2 (min over targets
    of the box-constrained QP). Many digit pixels sit at 0, so the box is active."""
    x = digits[0][500:516]
    y = _predict(linear10, x)
    exact = torch.tensor(
        [
            exact_untargeted_distance(linear10[1], x[i].flatten().double().numpy(), int(y[i]))
            for i in range(len(x))
        ],
        dtype=torch.float64,
    )
    return x, y, exact


def test_lbfgs_two_class_linear_known_answer() -> None:
    # Exact answer |w.x + b| / ||w|| (w, b: differences of the two logit rows) when the box is
    # inactive: x sits mid-box and the boundary is close (max |r_j| << 0.3).
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 64, generator=gen))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.35 + 0.3 * torch.rand(12, 1, 8, 8, generator=gen)
    y = _predict(model, x)
    w = (lin.weight[1] - lin.weight[0]).detach()
    margin = (x.flatten(1) @ w).abs()
    with torch.no_grad():  # put each point 0.05 .. 0.6 away from the boundary
        lin.bias[1] = 0.0
        x_dist = torch.linspace(0.05, 0.6, 12)
        shift = margin / w.norm() - x_dist
        x = x.flatten(1) - (torch.where(y == 1, 1.0, -1.0) * shift)[:, None] * w / w.norm()
        x = x.view(12, 1, 8, 8)
    assert x.min() > 0.1 and x.max() < 0.9
    y = _predict(model, x)
    exact = (x.flatten(1) @ w + lin.bias[1] - lin.bias[0]).abs().detach() / w.norm()
    torch.testing.assert_close(exact, x_dist, atol=1e-4, rtol=0)
    result = lbfgs_attack(model, x, y, 1 - y)
    _assert_contract(model, x, y, result)
    assert result.success.all()
    ratio = _l2(x, result) / exact
    assert (ratio >= 1 - 1e-4).all(), ratio  # nothing beats the exact minimum
    assert (ratio <= 1.01).all(), ratio
    r = (result.x_adv - x).flatten(1)
    cos = (r @ w).abs() / (r.norm(dim=1) * w.norm())
    assert (cos > 0.999).all()  # and it moved straight along w


def test_lbfgs_ten_class_linear_matches_the_exact_qp(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor]
) -> None:
    # Digits have many pixels at 0, so box constraints are active at the optimum.
    x = digits[0][500:516]
    y = _predict(linear10, x)
    result = lbfgs_attack(linear10, x, y, generator=torch.Generator().manual_seed(3))
    _assert_contract(linear10, x, y, result)
    assert result.success.all()
    exact = torch.tensor(
        [
            _exact_linear_target_distance(linear10[1], x[i].flatten().double().numpy(), int(t))
            for i, t in enumerate(result.target)
        ]
    )
    ratio = _l2(x, result).double() / exact
    assert (ratio >= 1 - 1e-4).all(), ratio
    # The CE penalty pulls away from every other class, not only the nearest, so the path of
    # minimisers enters the target region a little off the projection: a few % on average.
    assert ratio.mean() <= 1.03, ratio
    assert ratio.max() <= 1.08, ratio


def test_lbfgs_margin_all_targets_within_one_percent_of_the_exact_minimum(
    linear10: nn.Sequential, known_answer: tuple[Tensor, Tensor, Tensor]
) -> None:
    # The target: each wrong class attacked, the closest kept, mean L2 within 1% of the
    # exact QP. The margin loss's c search solves that QP on a linear model.
    x, y, exact = known_answer
    result = lbfgs_attack(linear10, x, y, "all", loss="margin")
    _assert_contract(linear10, x, y, result)
    assert result.success.all() and (result.target == -1).all()
    ratio = _l2(x, result).double() / exact
    assert (ratio >= 1 - 1e-4).all(), ratio  # nothing beats the exact minimum
    assert ratio.mean() <= 1.01, ratio


def test_lbfgs_cross_entropy_lands_beyond_the_exact_minimum(
    linear10: nn.Sequential, known_answer: tuple[Tensor, Tensor, Tensor]
) -> None:
    # The paper's CE objective pushes against every class, so it overshoots the QP: documented,
    # not a bug. The margin loss is the exact option.
    x, y, exact = known_answer
    ce = _l2(x, lbfgs_attack(linear10, x, y, "all")).double() / exact
    margin = _l2(x, lbfgs_attack(linear10, x, y, "all", loss="margin")).double() / exact
    assert (ce >= 1 - 1e-4).all()
    assert ce.mean() > margin.mean()
    assert ce.mean() <= 1.2, ce


def test_lbfgs_all_targets_is_the_closest_over_targets(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor]
) -> None:
    x = digits[0][520:526]
    y = _predict(linear10, x)
    result = lbfgs_attack(linear10, x, y, "all")
    _assert_contract(linear10, x, y, result)
    assert (result.target == -1).all() and result.success.all()
    exact = torch.tensor(
        [
            min(
                _exact_linear_target_distance(linear10[1], x[i].flatten().double().numpy(), t)
                for t in range(10)
                if t != int(y[i])
            )
            for i in range(len(x))
        ]
    )
    ratio = _l2(x, result).double() / exact
    assert (ratio >= 1 - 1e-4).all() and (ratio <= 1.05).all(), ratio
    random_target = lbfgs_attack(linear10, x, y, generator=torch.Generator().manual_seed(0))
    assert (_l2(x, result) <= _l2(x, random_target) * (1 + 1e-3)).all()


def test_candidates_attack_the_nearest_linearised_classes(
    linear10: nn.Sequential, known_answer: tuple[Tensor, Tensor, Tensor]
) -> None:
    x, y, exact = known_answer
    est = linearized_distances(linear10, x, y, 10)
    assert torch.isinf(est.gather(1, y[:, None])).all() and torch.isfinite(est).sum() == 9 * len(x)
    full = lbfgs_attack(linear10, x, y, "all", loss="margin")
    three = lbfgs_attack(linear10, x, y, "all", loss="margin", candidates=3)
    assert three.success.all()
    assert (three.grad_evals < full.grad_evals).all()
    assert (_l2(x, three) >= _l2(x, full) * (1 - 1e-3)).all()
    assert (_l2(x, three).double() / exact).mean() <= 1.02


@pytest.mark.parametrize("c", [100.0, 10.0, 1.0])
def test_failed_solve_bounds_the_distance_from_below(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor], c: float
) -> None:
    # target="all" stops a far target once f / c (the minimum of c ||r||^2 + margin loss over
    # the box, divided by c) reaches the example's closest success: valid only if f / c never
    # exceeds the squared distance to the target region (where the loss is 0), which the exact
    # QP gives on a linear model. It must also beat the minimiser's own squared distance,
    # or it prunes nothing the old rule did not.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    model.load_state_dict(linear10.state_dict())
    x = digits[0][600:604].double()
    y = _predict(model, x)
    xs = x.flatten(1).repeat(9, 1)
    ys = y.repeat(9)
    ts = (ys + torch.arange(1, 10).repeat_interleave(len(x))) % 10
    params = LBFGSSettings(loss="margin")
    objective = PenaltyObjective(model, xs, ys, ts, tuple(x.shape[1:]), params)
    objective.c.fill_(c)
    z, f, _ = minimize_box_lbfgs(objective, xs.clone(), gtol=1e-10, ftol=1e-15, max_iter=500)
    sq = ((z - xs) ** 2).sum(dim=1)
    failed = objective.margin_at(z, torch.arange(len(xs))) <= params.margin
    assert failed.sum() >= 9
    exact = torch.tensor(
        [
            _exact_linear_target_distance(model[1], xs[i].numpy(), int(ts[i]), params.kappa) ** 2
            for i in failed.nonzero().squeeze(1).tolist()
        ],
        dtype=torch.float64,
    )
    bound = (f / c)[failed]
    assert (bound <= exact * (1 + 1e-6)).all(), (bound / exact).max()
    assert (bound > sq[failed]).all()
    # It closes a good part of the gap between the failed minimiser and the region.
    closed = (bound - sq[failed]) / (exact - sq[failed])
    assert closed.mean() > 0.25, closed


def test_lbfgs_agrees_with_the_scipy_reference(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1006], digits[1][1000:1006]
    ours = lbfgs_attack(mlp, x, y, generator=torch.Generator().manual_seed(1))
    ref = lbfgs_scipy_reference(mlp, x, y, ours.target)
    _assert_contract(mlp, x, y, ref)
    assert torch.equal(ours.success, ref.success) and ours.success.all()
    d_ours, d_ref = _l2(x, ours), _l2(x, ref)
    assert abs(d_ours.mean() / d_ref.mean() - 1) <= 0.02
    assert ((d_ours / d_ref - 1).abs() <= 0.05).all()


def test_lbfgs_margin_agrees_with_the_scipy_reference(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1004], digits[1][1000:1004]
    t = _targets(y, seed=1)
    ours = lbfgs_attack(mlp, x, y, t, loss="margin")
    ref = lbfgs_scipy_reference(mlp, x, y, t, loss="margin")
    _assert_contract(mlp, x, y, ref)
    assert torch.equal(ours.success, ref.success) and ours.success.all()
    ratio = _l2(x, ours) / _l2(x, ref)
    assert (ratio - 1).abs().max() <= 0.03, ratio


def test_lbfgs_reaches_every_target_on_a_sigmoid_mlp(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1020], digits[1][1000:1020]
    result = lbfgs_attack(mlp, x, y, generator=torch.Generator().manual_seed(2))
    _assert_contract(mlp, x, y, result)
    assert result.success.all()
    dist = distortions(x, result.x_adv)
    # Minimum distortions are small next to the image (mean pixel ~0.3, ||x||_2 ~ 3.5).
    assert 0 < dist["rms"].mean() < 0.25
    assert (result.grad_evals > 0).all() and result.grad_evals.float().mean() < 600


def test_lbfgs_batch_consistency(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][1000:1006], digits[1][1000:1006]
    target = random_wrong_targets(y, 10, torch.Generator().manual_seed(4))
    batch = lbfgs_attack(mlp, x, y, target)
    for i in range(len(x)):
        alone = lbfgs_attack(mlp, x[i : i + 1], y[i : i + 1], target[i : i + 1])
        assert alone.success[0] == batch.success[i]
        # Round-off differs between batch sizes and can flip a line-search or c-search decision;
        # the run then stops elsewhere within its tolerances (see test_attacks_more).
        torch.testing.assert_close(alone.x_adv[0], batch.x_adv[i], atol=5e-2, rtol=0)
        torch.testing.assert_close(_l2(x[i : i + 1], alone)[0], _l2(x, batch)[i], rtol=1e-2, atol=0)


def test_lbfgs_same_seed_same_targets_and_results(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1005], digits[1][1000:1005]
    a = lbfgs_attack(mlp, x, y, generator=torch.Generator().manual_seed(9), search_steps=4)
    b = lbfgs_attack(mlp, x, y, generator=torch.Generator().manual_seed(9), search_steps=4)
    assert torch.equal(a.target, b.target) and torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.grad_evals, b.grad_evals)
    c = lbfgs_attack(mlp, x, y, generator=torch.Generator().manual_seed(10), search_steps=4)
    assert not torch.equal(a.target, c.target)


def test_lbfgs_unreachable_target_returns_the_clean_input() -> None:
    lin = nn.Linear(64, 2)
    with torch.no_grad():  # class 1 trails by 100 everywhere: no image in the box reaches it
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([0.0, -100.0]))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.int64)
    result = lbfgs_attack(model, x, y, torch.ones(3, dtype=torch.int64), search_steps=3)
    assert torch.equal(result.x_adv, x) and not result.success.any()


def test_lbfgs_input_already_in_the_target_class_costs_nothing(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:], digits[1][1000:]
    pred = _predict(mlp, x)
    wrong = (pred != y).nonzero().squeeze(1)[:3]
    assert len(wrong) > 0
    keep = torch.cat([wrong, torch.tensor([0])])  # plus one correctly classified example
    target = torch.cat([pred[wrong], (y[:1] + 1) % 10])
    result = lbfgs_attack(mlp, x[keep], y[keep], target)
    assert result.success.all()
    assert torch.equal(result.x_adv[:-1], x[wrong]) and (result.grad_evals[:-1] == 0).all()
    assert result.grad_evals[-1] > 0 and not torch.equal(result.x_adv[-1], x[0])


def test_lbfgs_max_evals_caps_every_row(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    # The budget AttackBench compares at: no row spends more than max_evals gradients (the
    # 3-nearest search adds K = 10 for the linearised distances).
    x, y = digits[0][1000:1010], digits[1][1000:1010]
    t = random_wrong_targets(y, 10, torch.Generator().manual_seed(2))
    free = run_attack("lbfgs", mlp, x, y, target=t, loss="margin")
    capped = run_attack("lbfgs", mlp, x, y, target=t, loss="margin", max_evals=12)
    assert (capped.grad_evals <= 12).all() and (free.grad_evals > 12).any()
    d_free, d_cap = distortions(x, free.x_adv)["l2"], distortions(x, capped.x_adv)["l2"]
    assert (d_cap[capped.success] >= d_free[capped.success] * (1 - 1e-3)).all()
    nearest = run_attack(
        "lbfgs", mlp, x, y, target="all", loss="margin", candidates=3, max_evals=20
    )
    assert (nearest.grad_evals <= 3 * 20 + 10).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c_init": 0.0}, "c_init"),
        ({"c_init": float("nan")}, "c_init"),
        ({"search_steps": 0}, "search_steps"),
        ({"c_factor": 1.0}, "c_factor"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_lbfgs_rejects_bad_search_parameters(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(AttackError, match=match):
        lbfgs_attack(mlp, digits[0][:2], digits[1][:2], **kwargs)  # type: ignore[arg-type]


def test_lbfgs_rejects_an_unknown_setting(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:2], digits[1][:2]
    for attack in (lbfgs_attack, lbfgs_scipy_reference):
        with pytest.raises(
            AttackError, match=r"^kapa: not a setting of lbfgs; did you mean 'kappa'\?$"
        ):
            attack(mlp, x, y, kapa=0.1)
        with pytest.raises(
            AttackError, match=r"^zzz: not a setting of lbfgs; its settings: "
        ) as info:
            attack(mlp, x, y, zzz=0.1)
        message = str(info.value)
        assert "\n" not in message
        assert all(name in message for name in ("c_init", "kappa", "loss", "refine_steps"))


def test_lbfgs_settings_plus_an_override_equals_all_keywords(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][:6], digits[1][:6]
    knobs: dict[str, Any] = {"loss": "margin", "search_steps": 4, "max_iter": 30, "kappa": 1e-2}
    settings = LBFGSSettings(loss="margin", search_steps=4, max_iter=30, kappa=0.5)
    # Both resolved: settings left None take the loss's defaults (history 3 for margin).
    resolved = lbfgs_settings(settings, {"kappa": 1e-2})
    assert resolved == lbfgs_settings(LBFGSSettings(**knobs), {}) and resolved.history == 3
    a = lbfgs_attack(mlp, x, y, "untargeted", settings=settings, kappa=1e-2)
    b = lbfgs_attack(mlp, x, y, "untargeted", **knobs)
    for field in ("x_adv", "success", "adv_pred", "target", "grad_evals"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_lbfgs_rejects_bad_targets_and_inputs(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][:2], digits[1][:2]
    with pytest.raises(AttackError, match="target: equals"):
        lbfgs_attack(mlp, x, y, y.clone())
    with pytest.raises(AttackError, match="out of range"):
        lbfgs_attack(mlp, x, y, (y + 1) % 10 + 10, num_classes=10)
    with pytest.raises(AttackError, match="x: pixels"):
        lbfgs_attack(mlp, x * 255, y)
