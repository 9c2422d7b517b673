"""Attacks against known answers, the scipy oracle, batching and the contract's invariants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_attack_contract as _assert_contract
from conftest import exact_linear_distance_slsqp as _exact_linear_target_distance
from conftest import fit as _fit
from conftest import l2_distance as _l2
from conftest import predict_labels as _predict
from scipy.optimize import fmin_l_bfgs_b
from torch import Tensor, nn

from advlab.attacks import (
    AttackError,
    AttackResult,
    alma,
    carlini_wagner,
    check_inputs,
    ddn,
    deepfool,
    fgsm,
    fmn,
    gaussian_noise,
    lbfgs_attack,
    lbfgs_scipy_reference,
    pgd,
    random_wrong_targets,
)
from advlab.attacks.lbfgs import LBFGSSettings, PenaltyObjective, lbfgs_settings
from advlab.measure import distortions
from advlab.optim import _Pairs, minimize_box_lbfgs
from advlab.runtime import rows_per_grad_chunk

# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- base


def test_random_wrong_targets_never_hit_the_label_and_repeat_with_the_seed() -> None:
    y = torch.arange(10).repeat(50)
    t1 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    t2 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    t3 = random_wrong_targets(y, 10, torch.Generator().manual_seed(6))
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)
    assert not (t1 == y).any()
    assert t1.min() >= 0 and t1.max() <= 9
    # Every wrong class is reachable from every label (500 draws, 9 options each).
    assert all(len(set(t1[y == k].tolist())) >= 7 for k in range(10))


@pytest.mark.parametrize(
    ("x", "y", "target", "match"),
    [
        (torch.full((2, 1, 2, 2), 1.5), torch.tensor([0, 1]), None, "x: pixels must lie in"),
        (torch.full((2, 1, 2, 2), -0.1), torch.tensor([0, 1]), None, "x: pixels must lie in"),
        (torch.full((2, 1, 2, 2), torch.nan), torch.tensor([0, 1]), None, "x: contains NaN"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0.0, 1.0]), None, "y: expected an integer"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1, 2]), None, "y: expected shape"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.tensor([1, 1]), "target: equals"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.tensor([1]), "target: expected"),
    ],
)
def test_check_inputs_rejects(x: Tensor, y: Tensor, target: Tensor | None, match: str) -> None:
    with pytest.raises(AttackError, match=match):
        check_inputs(x, y, target)


# ----------------------------------------------------------------------------- FGSM / PGD


def test_fgsm_invariants(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][1000:1050], digits[1][1000:1050]
    result = fgsm(mlp, x, y, eps=0.1)
    _assert_contract(mlp, x, y, result)
    assert (distortions(x, result.x_adv)["linf"] <= 0.1 + 1e-6).all()
    assert (result.target == -1).all() and (result.grad_evals == 1).all()
    assert result.success.float().mean() > 1 - (_predict(mlp, x) == y).float().mean()


def test_fgsm_matches_closed_form_on_a_linear_model() -> None:
    # Two classes, logits W x + b: grad_x CE(label 0) = (p1) (w1 - w0), so the step is
    # eps * sign(w1 - w0) wherever the pixel is not clipped.
    torch.manual_seed(1)
    lin = nn.Linear(4, 2)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([[[[0.0, 0.5, 1.0, 0.97]]]])
    y = torch.tensor([0])
    expected = (x.flatten() + 0.05 * (lin.weight[1] - lin.weight[0]).sign()).clamp(0, 1)
    result = fgsm(model, x, y, eps=0.05)
    torch.testing.assert_close(result.x_adv.flatten(), expected.detach())


def test_fgsm_eps_zero_is_the_identity(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:20], digits[1][:20]
    result = fgsm(mlp, x, y, eps=0.0)
    assert torch.equal(result.x_adv, x)
    assert torch.equal(result.success, _predict(mlp, x) != y)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_fgsm_rejects_bad_eps(mlp: nn.Module, digits: tuple[Tensor, Tensor], eps: float) -> None:
    with pytest.raises(AttackError, match="eps"):
        fgsm(mlp, digits[0][:2], digits[1][:2], eps=eps)


def test_fgsm_rejects_inputs_outside_the_box(mlp: nn.Module) -> None:
    with pytest.raises(AttackError, match="x: pixels must lie in"):
        fgsm(mlp, torch.full((2, 1, 8, 8), 2.0), torch.tensor([0, 1]), eps=0.1)


def test_fgsm_batch_consistency(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:12], digits[1][:12]
    batch = fgsm(mlp, x, y, eps=0.2)
    for i in range(len(x)):
        alone = fgsm(mlp, x[i : i + 1], y[i : i + 1], eps=0.2)
        torch.testing.assert_close(alone.x_adv[0], batch.x_adv[i])
        assert alone.success[0] == batch.success[i]


def test_pgd_stays_in_the_ball_and_beats_fgsm(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1050], digits[1][1000:1050]
    result = pgd(mlp, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    _assert_contract(mlp, x, y, result)
    assert (distortions(x, result.x_adv)["linf"] <= 0.1 + 1e-6).all()
    assert (result.grad_evals >= 1).all() and (result.grad_evals <= 20).all()
    assert result.success.sum() >= fgsm(mlp, x, y, eps=0.1).success.sum()
    again = pgd(mlp, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x_adv, result.x_adv)


# ----------------------------------------------------------------------------- the optimiser


def test_minimize_box_lbfgs_solves_a_box_constrained_quadratic() -> None:
    # Independent problems f_i(z) = (z - m_i)' A_i (z - m_i) with minimisers partly outside the
    # box; compared to scipy's L-BFGS-B on each row (the box makes the answer non-trivial).
    gen = torch.Generator().manual_seed(0)
    n, dim = 5, 12
    q = torch.randn(n, dim, dim, generator=gen, dtype=torch.float64)
    a = q @ q.transpose(1, 2) / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    a[0] = torch.diag(torch.linspace(0.5, 5.0, dim, dtype=torch.float64))  # separable row
    m = 1.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + 0.5

    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        r = z - m[rows]
        ar = (a[rows] @ r[:, :, None]).squeeze(2)
        return (r * ar).sum(1), 2 * ar

    z, _, evals = minimize_box_lbfgs(
        fun, torch.full((n, dim), 0.5, dtype=torch.float64), gtol=1e-9, ftol=1e-14, max_iter=200
    )
    torch.testing.assert_close(z[0], m[0].clamp(0, 1), atol=1e-6, rtol=0)
    for i in range(n):
        ref, _, _ = fmin_l_bfgs_b(
            lambda v, i=i: tuple(
                t[0].numpy() for t in fun(torch.tensor(v)[None], torch.tensor([i]))
            ),
            np.full(dim, 0.5),
            bounds=[(0, 1)] * dim,
            pgtol=1e-10,
            factr=10,
        )
        np.testing.assert_allclose(z[i].numpy(), ref, atol=1e-5)
    assert (evals > 1).all()


def test_minimize_box_lbfgs_restarts_after_a_failed_line_search() -> None:
    # Ten evaluations in a row come back inf, so the line search fails with pairs in memory:
    # the row must drop them and go on along the gradient (not stop as if it had none), even
    # with fewer ring slots (history 3) than line-search tries.
    w = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    target = torch.full((4,), 0.7, dtype=torch.float64)
    calls = [0]

    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        f = ((z - target) ** 2 * w).sum(1)
        if 4 <= calls[0] < 14:
            f = torch.full_like(f, float("inf"))
        return f, 2 * (z - target) * w

    x0 = torch.full((1, 4), 0.1, dtype=torch.float64)
    z, f, _ = minimize_box_lbfgs(fun, x0, history=3, gtol=1e-10, ftol=1e-15)
    torch.testing.assert_close(z[0], target, atol=1e-6, rtol=0)
    assert float(f) < 1e-10


def test_resumed_pairs_keep_their_curvature_through_shrinking_c() -> None:
    # The attack shrinks c by 10x per failed solve; each resume adds mu * s to the stored y
    # (mu = 2 (c' - c) < 0). In float32 the updated s.y and y.y must still match the pair a
    # float64 computation would hold at the new c, down to c = 1e-3 (a closed-form update of
    # y.y cancels to the wrong sign there).
    gen = torch.Generator().manual_seed(0)
    s64 = 1e-2 * torch.randn(1, 784, generator=gen, dtype=torch.float64)
    pairs = _Pairs(1, 784, 5, torch.device("cpu"), torch.float32)
    c = 100.0
    pairs.next_s().copy_(s64.float())  # the step; push stores y = g_new - g_old beside it
    pairs.push((2 * c * s64).float(), torch.zeros(1, 784), torch.tensor([True]))
    for c_new in (10.0, 1.0, 0.1, 0.01, 0.001):
        pairs.reshape(torch.tensor([0]), torch.tensor([2 * (c_new - c)]))
        c = c_new
        y = 2 * c * s64
        exact_gamma = float((s64 * y).sum() / (y * y).sum())
        assert bool(pairs.used[0, 0])
        assert float(pairs.gamma()[0]) == pytest.approx(exact_gamma, rel=1e-3)


def test_minimize_box_lbfgs_takes_an_empty_batch() -> None:
    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        return (z**2).sum(1), 2 * z

    z, f, evals = minimize_box_lbfgs(fun, torch.zeros(0, 3))
    assert z.shape == (0, 3) and f.shape == (0,) and evals.shape == (0,)


# ----------------------------------------------------------------------------- L-BFGS attack


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
        close = r"^kapa: not a setting of lbfgs; did you mean 'kappa'\?$"
        with pytest.raises(AttackError, match=close):
            attack(mlp, x, y, kapa=0.1)
        far = r"^zzz: not a setting of lbfgs; its settings: "
        with pytest.raises(AttackError, match=far) as info:
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


AttackFn = Callable[[nn.Module, Tensor, Tensor], AttackResult]


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: fgsm(m, x, y, eps=0.1),
        lambda m, x, y: pgd(m, x, y, eps=0.1, steps=3),
        lambda m, x, y: lbfgs_attack(m, x, y, search_steps=2),
        lambda m, x, y: pgd(m, x, y, 0.5, norm="l2", steps=3),
        lambda m, x, y: deepfool(m, x, y, steps=3),
        lambda m, x, y: carlini_wagner(m, x, y, steps=5, search_steps=2),
        lambda m, x, y: gaussian_noise(m, x, y, 0.1),
        lambda m, x, y: lbfgs_attack(m, x, y, "untargeted", loss="margin", search_steps=2),
    ],
    ids=["fgsm", "pgd", "lbfgs", "pgd-l2", "deepfool", "cw", "noise", "lbfgs-untargeted"],
)
def test_attacks_leave_the_model_untouched(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], attack: AttackFn
) -> None:
    before = [p.detach().clone() for p in mlp.parameters()]
    mlp.train()
    try:
        attack(mlp, digits[0][:4], digits[1][:4])
        assert mlp.training  # mode restored
        for p, p0 in zip(mlp.parameters(), before, strict=True):
            assert torch.equal(p, p0) and p.grad is None
    finally:
        mlp.eval()


# ----------------------------------------------------------------------------- chunked evaluation


def test_rows_per_grad_chunk_counts_the_state_one_row_saves() -> None:
    # A linear layer saves its input (D floats per row) to form the weight's gradient; the
    # weight it saves is shared by all rows, so the two-row minus one-row difference is 4 D.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(1, 1, 8, 8)
    assert rows_per_grad_chunk(model, x, budget=4 * 64 * 10) == 10
    assert rows_per_grad_chunk(model, x, budget=1) == 1
    with torch.no_grad():  # the count does not depend on the caller's grad mode
        assert rows_per_grad_chunk(model, x, budget=4 * 64 * 10) == 10
    # A conv layer's activations grow with the row: 8 channels save far more than 2.
    wide, narrow = (
        nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * 64, 10))
        for c in (8, 2)
    )
    assert rows_per_grad_chunk(wide, x, budget=2**20) < rows_per_grad_chunk(narrow, x, budget=2**20)


@pytest.fixture(scope="module")
def small_conv(digits: tuple[Tensor, Tensor]) -> nn.Module:
    """A small conv net fitted once for the chunked-evaluation tests."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )
    return _fit(model, digits[0][:1000], digits[1][:1000], steps=100, lr=1e-2)


def test_chunked_evaluation_changes_nothing_but_round_off(
    digits: tuple[Tensor, Tensor], small_conv: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_conv
    x = digits[0][1200:1208]
    y = _predict(model, x)
    target = (y + 1) % 10
    whole = lbfgs_attack(model, x, y, target, loss="margin")
    # The objective evaluated 3 rows at a time gives the same values and gradients ...
    settings = lbfgs_settings(None, {"loss": "margin"})
    objective = PenaltyObjective(model, x.flatten(1), y, target, (1, 8, 8), settings)
    assert objective.chunk >= len(x)  # this small net is never chunked at the default budget
    objective.c.fill_(0.5)
    z, rows = (x.flatten(1) + 0.1).clamp(0, 1), torch.arange(len(x))
    f_whole, g_whole = objective(z, rows)
    objective.chunk = 3
    f_parts, g_parts = objective(z, rows)
    torch.testing.assert_close(f_parts, f_whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-5, atol=1e-7)
    # ... and a whole attack run in chunks of 3 rows ends where the unchunked run does (up to
    # the round-off flips test_every_attack_is_batch_consistent allows).
    monkeypatch.setattr("advlab.runtime.GRAD_CHUNK_BYTES", 1)
    chunked = lbfgs_attack(model, x, y, target, loss="margin")
    assert torch.equal(chunked.success, whole.success) and bool(whole.success.all())
    torch.testing.assert_close(_l2(x, chunked), _l2(x, whole), rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y, t: ddn(m, x, y, t, steps=40),
        lambda m, x, y, t: fmn(m, x, y, t, steps=40),
        lambda m, x, y, t: fmn(m, x, y, None, norm="linf", steps=40),
        lambda m, x, y, t: pgd(m, x, y, 1.5, norm="l2", steps=10, restarts=2, target=t),
        lambda m, x, y, t: alma(m, x, y, t, steps=40),
    ],
    ids=["ddn", "fmn-l2", "fmn-linf", "pgd", "alma"],
)
def test_gradient_attacks_run_in_chunks_end_where_whole_runs_do(
    digits: tuple[Tensor, Tensor],
    small_conv: nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    attack: Callable[..., Any],
) -> None:
    # One row per chunk (the smallest budget) against the whole batch at once: the same
    # successes, the same points up to round-off.
    model = small_conv
    x = digits[0][1200:1210]
    y = _predict(model, x)
    whole = attack(model, x, y, (y + 1) % 10)
    monkeypatch.setattr("advlab.runtime.GRAD_CHUNK_BYTES", 1)
    chunked = attack(model, x, y, (y + 1) % 10)
    assert torch.equal(chunked.success, whole.success) and bool(whole.success.any())
    assert torch.equal(chunked.grad_evals, whole.grad_evals)
    torch.testing.assert_close(chunked.x_adv, whole.x_adv, rtol=0, atol=1e-4)
