"""Exact minimum adversarial distortions (advlab.bounds.exact).

Linear models: the closed forms against HiGHS (QP, LP) and a dual solve, the MILP on a linear
model against the closed forms, and no attack below the minimum. ReLU nets: the MILP (CBC) and
MIQP (SCIP) against brute force over activation patterns, brackets under a time limit and
radii, and a crashed or hung solver worker costing its example only.
"""

from __future__ import annotations

import copy
import itertools
import math
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import exact_linear_distance
from scipy.optimize import linprog
from sklearn.datasets import load_digits
from torch import Tensor, nn

from advlab.attacks.registry import run_attack
from advlab.bounds import exact
from advlab.bounds.exact import (
    ExactResult,
    linear_minimum,
    milp_minimum,
    pairwise_linear_minima,
    relu_net,
)
from advlab.bounds.milp import ReluNet, formulate, interval_bounds
from advlab.bounds.solver_worker import SolverPool
from advlab.models import Normalized

# Solvers meet rows to 1e-7 (the primal feasibility tolerance of CBC's Clp and of HiGHS) on
# rows whose slopes here are of order 1, so two exact solvers' distances may differ by a few
# 1e-7; SCIP's L2 stops at a relative gap of 1e-5 on ||d||^2 (5e-6 on the distance).
SOLVER_ATOL = 1e-6
L2_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared machine


@pytest.fixture(scope="module")
def pool() -> Iterator[SolverPool]:
    with SolverPool() as shared:  # one CBC and one SCIP worker for the whole module
        yield shared


def random_relu_net(
    sizes: tuple[int, ...], seed: int, bias: float = 0.5, gain: float = 1.0
) -> nn.Sequential:
    """Flatten, then Linear/ReLU with N(0, gain^2/fan_in) weights drawn by numpy (the same floats
    on every CPU, whatever ATen's kernels), no ReLU after the last layer."""
    rng = np.random.default_rng(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(sizes):
        lin = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            lin.weight.copy_(
                torch.from_numpy(rng.normal(0, gain / math.sqrt(fan_in), (fan_out, fan_in)))
            )
            lin.bias.copy_(torch.from_numpy(rng.normal(0, bias, fan_out)))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Sequential, Tensor, Tensor]:
    """4 inputs, hidden 4 and 3, 3 classes (this seed splits the box about 48/36/16 and has
    every first-layer unit unstable), and 3 points from which another class can be reached."""
    model = random_relu_net((4, 4, 3, 3), seed=4, gain=2.0)
    net = relu_net(model, (1, 2, 2))
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0, 1, (400, 1, 2, 2)).astype(np.float32))
    with torch.no_grad():
        y = model(x).argmax(1)
    keep = []
    for i in range(len(x)):
        if not math.isinf(brute_force(net, _flat(x[i]), int(y[i]), None, "linf")):
            keep.append(i)
        if len(keep) == 3:
            return model, x[keep], y[keep]
    raise AssertionError("no reachable points")


def _flat(x: Tensor) -> np.ndarray:
    return x.detach().double().flatten().numpy()


# --------------------------------------------------------------------------- brute force


def brute_force(net: ReluNet, x0: np.ndarray, label: int, target: int | None, norm: str) -> float:
    """The minimum over every activation pattern of the hidden units of the convex problem on
    that pattern's linear region (closed: z >= 0 where on, z <= 0 where off), with the margin
    condition of one class at a time (untargeted) or of the target; inf if none is feasible."""
    widths = [len(b) for b in net.biases[:-1]]
    best = math.inf
    for bits in itertools.product((0.0, 1.0), repeat=sum(widths)):
        masks = np.split(np.array(bits), np.cumsum(widths)[:-1])
        rows, rhs = [], []  # the region as rows @ x <= rhs
        amap, cmap = np.eye(len(x0)), np.zeros(len(x0))  # the layer's input as amap @ x + cmap
        for w, b, mask in zip(net.weights, net.biases, masks, strict=False):
            za, zc = w @ amap, w @ cmap + b
            sign = np.where(mask > 0, -1.0, 1.0)
            rows.append(sign[:, None] * za)
            rhs.append(-sign * zc)
            amap, cmap = mask[:, None] * za, mask * zc
        la, lc = net.weights[-1] @ amap, net.weights[-1] @ cmap + net.biases[-1]
        k = len(lc)
        if target is None:  # class j's logit >= the label's: one problem per j
            goals = [(la[[j]] - la[[label]], lc[[j]] - lc[[label]]) for j in range(k) if j != label]
        else:
            others = [j for j in range(k) if j != target]
            goals = [(la[target] - la[others], lc[target] - lc[others])]
        for ga, gc in goals:  # ga @ x + gc >= 0
            g = np.vstack([*rows, -ga])
            h = np.concatenate([*rhs, gc])
            best = min(best, _convex_minimum(g, h - g @ x0, x0, norm))
    return best


def _convex_minimum(g: np.ndarray, h: np.ndarray, x0: np.ndarray, norm: str) -> float:
    """min ||d|| s.t. g @ d <= h, 0 <= x0 + d <= 1: HiGHS's LP (scipy) or QP (highspy)."""
    n = len(x0)
    if norm == "l2":
        d, _ = exact._highs_qp(-g, -h, -x0, 1 - x0)  # a thin wrapper of HiGHS's QP solver
        return math.inf if d is None else float(np.linalg.norm(d))
    ones = -np.ones((n, 1))
    a_ub = np.vstack([np.hstack([g, np.zeros((len(g), 1))]), np.hstack([np.eye(n), ones]),
                      np.hstack([-np.eye(n), ones])])  # fmt: skip
    bounds = [*zip(-x0, 1 - x0, strict=True), (0, None)]
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=np.r_[h, np.zeros(2 * n)],
                  bounds=bounds, method="highs")  # fmt: skip
    return float(res.fun) if res.status == 0 else math.inf


# --------------------------------------------------------------------------- checks


def assert_point_confirmed(model: nn.Module, x0: Tensor, label: int, target: int | None,
                           r: ExactResult) -> None:  # fmt: skip
    """The reconstructed point: in the box, adversarial for the torch model itself (float64)
    to within the reported tolerance, and its distance is the reported upper end."""
    assert r.point is not None and r.upper is not None, r
    point = torch.from_numpy(r.point)
    assert point.shape == x0.shape and point.min() >= 0 and point.max() <= 1
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(point[None])[0]
    own = label if target is None else target
    best_other = torch.cat([logits[:own], logits[own + 1 :]]).max()
    margin = float(best_other - logits[own] if target is None else logits[own] - best_other)
    assert margin >= -r.tolerance
    assert r.tolerance < 1e-5  # solver slack (<= 1e-7 a row) through the layers, no more
    diff = (point - x0.double()).flatten()
    distance = float(diff.abs().max() if r.norm == "linf" else diff.norm())
    assert distance == pytest.approx(r.upper, rel=1e-12, abs=1e-15)


def assert_exact(r: ExactResult, truth: float) -> None:
    assert r.exact and r.status == "optimal", r
    assert r.lower <= r.upper  # type: ignore[operator]
    if r.norm == "linf":
        assert r.upper == pytest.approx(truth, abs=SOLVER_ATOL)
        assert r.lower == pytest.approx(truth, abs=SOLVER_ATOL)
    else:
        assert r.lower <= truth + SOLVER_ATOL
        assert r.upper >= truth - SOLVER_ATOL  # type: ignore[operator]
        assert r.upper <= truth * (1 + L2_RTOL) + SOLVER_ATOL  # type: ignore[operator]


# --------------------------------------------------------------------------- linear models


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_half_space_closed_form_equals_highs(norm: str) -> None:
    """One margin constraint in the box: the closed form against HiGHS, on random cases with
    zero weights, pixels on the box's faces and unreachable half-spaces."""
    rng = np.random.default_rng(0)
    unreachable = 0
    for case in range(150):
        n = 10
        a = rng.normal(size=n) * (rng.uniform(size=n) > 0.2)
        x0 = np.clip(rng.uniform(-0.3, 1.3, n), 0, 1)
        reach = float(np.abs(a) @ np.where(a > 0, 1 - x0, x0))
        need = reach * rng.uniform(0.05, 1.2) if case % 10 else -0.1
        dist, d = exact._half_space_minimum(a, need, x0, norm)
        truth = _convex_minimum(-a[None], np.array([-need]), x0, norm)
        if math.isinf(truth):
            unreachable += 1
            assert math.isinf(dist) and d is None
            continue
        assert dist == pytest.approx(truth, abs=SOLVER_ATOL)
        assert a @ d >= need - 1e-12 * (1 + abs(need))
        assert np.all(x0 + d >= -1e-15) and np.all(x0 + d <= 1 + 1e-15)
    assert 5 < unreachable < 60  # both kinds of case were drawn


def test_linear_minima_of_fc10_match_independent_solvers(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor], pool: SolverPool
) -> None:
    x, y = digits
    x, y = x[1000:1008], y[1000:1008]
    for norm in ("l2", "linf"):
        pairwise = pairwise_linear_minima(linear10, x, y, norm)
        assert np.isnan(pairwise[np.arange(len(y)), y.numpy()]).all()
        untargeted = linear_minimum(linear10, x, y, norm=norm)
        for i, r in enumerate(untargeted):
            if r.status == "adversarial_at_start":  # misclassified: 0, and the label's own row
                assert r.upper == 0 and np.nanmin(pairwise[i]) == 0
                continue
            assert r.exact and r.upper == np.nanmin(pairwise[i])
            assert_point_confirmed(linear10, x[i], int(y[i]), None, r)
            # At the minimum the logits tie (to round-off): argmax may still name the label.
            assert r.reached != int(y[i]) or abs(r.margin) <= r.tolerance
        # The MILP on a linear model (no binaries but the disjunction over classes) agrees;
        # SCIP's MIQP takes about a CPU second each here, so L2 checks three.
        few = 8 if norm == "linf" else 3
        by_milp = milp_minimum(linear10, x[:few], y[:few], norm=norm, pool=pool)
        for r, closed in zip(by_milp, untargeted[:few], strict=True):
            assert closed.upper is not None
            if closed.upper > 0:
                assert_exact(r, closed.upper)


def test_targeted_linear_minima_match_a_dual_solve_and_cbc(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor], pool: SolverPool
) -> None:
    x, y = digits
    x, y = x[1010:1015], y[1010:1015]
    target = (y + 3) % 10
    l2 = linear_minimum(linear10, x, y, norm="l2", target=target)
    for i, r in enumerate(l2):
        dual = exact_linear_distance(linear10[1], _flat(x[i]), int(target[i]))
        assert r.exact and r.upper == pytest.approx(dual, rel=1e-5)
        assert_point_confirmed(linear10, x[i], int(y[i]), int(target[i]), r)
    linf = linear_minimum(linear10, x, y, norm="linf", target=target)
    by_milp = milp_minimum(linear10, x, y, norm="linf", target=target, pool=pool)
    for i, (r, m) in enumerate(zip(linf, by_milp, strict=True)):
        assert r.exact and "HiGHS" in r.solver_status
        assert_exact(m, r.upper)  # type: ignore[arg-type]
        assert_point_confirmed(linear10, x[i], int(y[i]), int(target[i]), m)


def test_normalized_models_fold_into_their_first_layer() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Flatten(), nn.Linear(8, 5))
    model = Normalized(inner, mean=[0.3, 0.6], std=[0.25, 0.5]).eval()
    w, b = inner[1].weight.detach().double(), inner[1].bias.detach().double()
    scale = torch.tensor([4.0] * 4 + [2.0] * 4, dtype=torch.float64)  # 1 / std per pixel
    mean = torch.tensor([0.3] * 4 + [0.6] * 4).double()  # the float32 buffers, exactly
    shift = -mean * scale
    net = relu_net(model, (2, 2, 2))
    assert np.allclose(net.weights[0], (w * scale).numpy(), rtol=1e-15)
    assert np.allclose(net.biases[0], (b + w @ shift).numpy(), rtol=1e-12)
    x = torch.rand(6, 2, 2, 2)
    y = model(x).argmax(1)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(8, 5)).double()
    with torch.no_grad():
        plain[1].weight.copy_(w * scale)
        plain[1].bias.copy_(b + w @ shift)
    for norm in ("l2", "linf"):
        assert np.allclose(
            pairwise_linear_minima(model, x, y, norm),
            pairwise_linear_minima(plain, x, y, norm), rtol=1e-10, equal_nan=True,
        )  # fmt: skip
    relu = Normalized(random_relu_net((8, 6, 5), seed=1), mean=[0.3, 0.6], std=[0.25, 0.5])
    with torch.no_grad():
        torch_logits = relu.double()(x.double()).numpy()
    assert np.allclose(relu_net(relu, (2, 2, 2)).pre_activations(x.double().flatten(1).numpy())[-1],
                       torch_logits, rtol=1e-12, atol=1e-12)  # fmt: skip


def test_unsupported_models_and_settings_are_refused() -> None:
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="Linear, \\(ReLU, Linear\\)"):
        relu_net(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)), (1, 2, 2)
        )
    with pytest.raises(ValueError, match="cannot solve l2"):
        milp_minimum(random_relu_net((4, 3, 2), 0), x, y, norm="l2", solver="cbc")
    with pytest.raises(ValueError, match="linear model"):
        linear_minimum(random_relu_net((4, 3, 2), 0), x, y)
    with pytest.raises(ValueError, match="equals its example's label"):
        linear_minimum(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), x, y, target=[1, 1])


ATTACKS = {"lbfgs": {"target": "untargeted"}, "ddn": {}, "fmn": {}, "deepfool": {}, "alma": {}}


def test_no_attack_lands_below_the_exact_l2_minimum(
    linear10: nn.Sequential, digits: tuple[Tensor, Tensor]
) -> None:
    """An attack's point x' is adversarial in float32: for the class j it reached, the float64
    margin is >= -e_j, e_j = gamma_65 ((|w_j| + |w_y|) |x'| + |b_j| + |b_y|) (64 products and a
    bias summed in any order), so its distance is >= min over j of the exact minimum of the
    half-space relaxed by e_j: the derived tolerance, which the test shows to be tiny."""
    x, y = digits
    x, y = x[1020:1040], y[1020:1040]
    w = linear10[1].weight.detach().double().numpy()
    b = linear10[1].bias.detach().double().numpy()
    gamma = 65 * 2.0**-24 / (1 - 65 * 2.0**-24)

    def need(j: int, label: int, x0: np.ndarray, xa: np.ndarray) -> float:
        """(w_j - w_y).d must reach this for x0 + d to be adversarial in float32 at xa."""
        slack = (np.abs(w[j]) + np.abs(w[label])) @ np.abs(xa) + abs(b[j]) + abs(b[label])
        return -((w[j] - w[label]) @ x0 + b[j] - b[label]) - gamma * slack

    minima = linear_minimum(linear10, x, y, norm="l2")
    for name, settings in ATTACKS.items():
        result = run_attack(name, linear10, x, y, **settings)
        assert result.success.sum() >= 15, name
        for i in np.flatnonzero(result.success.numpy()):
            x0, xa, label = _flat(x[i]), _flat(result.x_adv[i]), int(y[i])
            relaxed = min(
                exact._half_space_minimum(w[j] - w[label], need(j, label, x0, xa), x0, "l2")[0]
                for j in range(10)
                if j != label
            )
            exact_min = minima[i].upper
            assert exact_min is not None and relaxed <= exact_min
            assert exact_min - relaxed < 1e-4  # round-off only, against minima of 0.1 to 1
            assert np.linalg.norm(xa - x0) >= relaxed, (name, i)


# --------------------------------------------------------------------------- ReLU networks


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_milp_equals_brute_force_over_activation_patterns(
    tiny: tuple[nn.Sequential, Tensor, Tensor], pool: SolverPool, norm: str
) -> None:
    model, x, y = tiny
    net = relu_net(model, x.shape[1:])
    targets = (y + 1) % 3
    for target in (None, targets):
        results = milp_minimum(model, x, y, norm=norm, target=target, pool=pool, time_limit=30)
        for i, r in enumerate(results):
            goal = None if target is None else int(target[i])
            truth = brute_force(net, _flat(x[i]), int(y[i]), goal, norm)
            if math.isinf(truth):  # the target cannot win anywhere in the box
                assert r.status == "infeasible" and r.lower == math.inf and r.upper is None
                continue
            assert_exact(r, truth)
            assert_point_confirmed(model, x[i], int(y[i]), goal, r)


def test_a_normalized_relu_net_is_solved_in_pixel_space(
    tiny: tuple[nn.Sequential, Tensor, Tensor], pool: SolverPool
) -> None:
    """Normalized's standardisation folds into the first layer: the MILP of the folded net
    equals brute force on it, and the torch model (standardising itself) confirms the points."""
    inner, x, _ = tiny
    model = Normalized(copy.deepcopy(inner), mean=[0.4], std=[0.3]).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    net = relu_net(model, x.shape[1:])
    for i, r in enumerate(milp_minimum(model, x, y, pool=pool)):
        truth = brute_force(net, _flat(x[i]), int(y[i]), None, "linf")
        if math.isinf(truth):
            assert r.status == "infeasible"
            continue
        assert_exact(r, truth)
        assert_point_confirmed(model, x[i], int(y[i]), None, r)


def test_an_example_already_adversarial_is_at_distance_zero(
    tiny: tuple[nn.Sequential, Tensor, Tensor], pool: SolverPool
) -> None:
    model, x, y = tiny
    wrong = (y + 1) % 3  # labels the model disagrees with: x itself is adversarial
    for r in milp_minimum(model, x, wrong, pool=pool):
        assert r.exact and r.lower == r.upper == 0 and r.status == "adversarial_at_start"


@pytest.fixture(scope="module")
def harder() -> tuple[nn.Sequential, Tensor, Tensor]:
    """A 64-16-16-10 net on one digit whose MILP over the whole box (interval bounds, every
    ReLU unstable) takes CBC about half a CPU second: far beyond a 0.02 s limit."""
    model = random_relu_net((64, 16, 16, 10), seed=0, bias=0.1)
    x = torch.tensor(load_digits().data[5:6] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def test_a_time_limit_gives_a_bracket_that_holds_the_true_minimum(
    harder: tuple[nn.Sequential, Tensor, Tensor], pool: SolverPool
) -> None:
    model, x, y = harder
    (cut,) = milp_minimum(model, x, y, time_limit=0.02, pool=pool)
    assert cut.status == "time_limit" and not cut.exact and cut.distance is None
    (truth,) = milp_minimum(model, x, y, time_limit=120, pool=pool)
    assert truth.exact and truth.upper is not None
    assert cut.lower <= truth.lower + SOLVER_ATOL
    if cut.upper is not None:
        assert cut.lower <= cut.upper and truth.upper <= cut.upper + SOLVER_ATOL
        assert_point_confirmed(model, x[0], int(y[0]), None, cut)
    # Bounds over a smaller input set (the Linf ball of a radius) give the same minimum when
    # it lies inside, and the bracket [radius, none found] when it lies beyond.
    net = relu_net(model, x.shape[1:])
    radius = truth.upper * 1.5
    ball = interval_bounds(net, _flat(x[0]), radius)
    (inside,) = milp_minimum(model, x, y, bounds=ball, radius=radius, pool=pool)
    assert_exact(inside, truth.upper)
    # Tighter than SOLVER_ATOL on purpose: CBC's absolute cutoff increment (1e-5 in objective
    # units) once made this box solve claim an optimum 5.6e-7 above the ball solve's.
    assert inside.upper == pytest.approx(truth.upper, abs=1e-7)
    (beyond,) = milp_minimum(model, x, y, radius=truth.upper / 2, pool=pool)
    assert beyond.status == "infeasible" and beyond.lower == truth.upper / 2
    assert beyond.upper is None and not beyond.exact
    wrong = [(low + 1.0, up + 1.0) for low, up in ball]  # excludes x's own pre-activations
    with pytest.raises(ValueError, match="not valid bounds"):
        milp_minimum(model, x, y, bounds=wrong, radius=radius, pool=pool)


CRASHERS = """
    import os, signal, time
    from advlab.bounds.solver_worker import solve

    def solve_or_crash(problem):
        action = getattr(problem, "action", "")
        if action == "segfault" or problem.lb[0] == -0.5:
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "hang":
            time.sleep(600)
        return solve(problem)

    def solve_and_lie(problem):
        # the solver's answer with its perturbation zeroed: x itself, not adversarial
        answer = solve(problem)
        answer["values"][: problem.n_inputs] = 0.0
        return answer
"""


def test_a_crashed_or_hung_worker_costs_its_example_only(
    tmp_path, monkeypatch, tiny: tuple[nn.Sequential, Tensor, Tensor], pool: SolverPool
) -> None:
    (tmp_path / "crashers.py").write_text(textwrap.dedent(CRASHERS))
    monkeypatch.syspath_prepend(str(tmp_path))  # workers inherit the parent's sys.path
    model, x, y = tiny
    net = relu_net(model, x.shape[1:])
    x0 = _flat(x[0])
    problems = []
    for action in ("", "segfault", "", "hang", "bad", ""):
        problem, _ = formulate(net, x0, int(y[0]), None, "linf", interval_bounds(net, x0))
        problem.action, problem.time_limit = action, 1.0  # type: ignore[attr-defined]
        problem.solver = "nonsense" if action == "bad" else "cbc"
        problems.append(problem)
    with SolverPool(target="crashers:solve_or_crash", grace=2.0) as crashing:
        answers = crashing.solve_all(problems)
        assert [a["status"] for a in answers] == [
            "optimal", "failed", "optimal", "failed", "error", "optimal"
        ]  # fmt: skip
        assert "SIGSEGV" in answers[1]["reason"]
        assert "hung" in answers[3]["reason"]
        assert "nonsense" in answers[4]["reason"]
        assert answers[0]["objective"] == answers[2]["objective"] == answers[5]["objective"]
        # Through the API: the example whose first pixel is 0.5 crashes its worker.
        xs = x.clone()
        xs[1, 0, 0, 0] = 0.5
        results = milp_minimum(model, xs, y, pool=crashing)
    normal = milp_minimum(model, xs, y, pool=pool)
    with (
        SolverPool(target="no_such_module:solve") as broken,
        pytest.raises(RuntimeError, match=r"did not start.*ModuleNotFoundError"),
    ):
        broken.solve_all(problems[:1])
    assert results[1].status == "failed" and "SIGSEGV" in results[1].reason
    assert not results[1].exact and results[1].upper is None and results[1].lower == 0
    for i in (0, 2):
        assert results[i].exact and results[i].upper == normal[i].upper


def test_a_point_the_torch_model_rejects_is_reported_not_trusted(
    tmp_path, monkeypatch, tiny: tuple[nn.Sequential, Tensor, Tensor]
) -> None:
    (tmp_path / "crashers.py").write_text(textwrap.dedent(CRASHERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, x, y = tiny
    with SolverPool(target="crashers:solve_and_lie") as lying:
        results = milp_minimum(model, x, y, pool=lying)
    for r in results:
        assert r.status == "optimal" and not r.exact and r.upper is None
        assert r.margin is not None and r.margin < 0
        assert "violates its rows" in r.reason


def test_bounds_that_do_not_hold_are_caught_at_the_point(pool: SolverPool) -> None:
    """Unsound bounds (unstable ReLUs declared off, though x itself stays inside them) change
    the MILP's network: where its point crosses them, the check refuses it, naming the bounds
    or the torch model's margin. (A lower bound or an infeasible verdict is only as sound as
    the bounds: no check can catch those.)"""
    model = random_relu_net((4, 4, 3, 3), seed=4, gain=2.0)
    net = relu_net(model, (1, 2, 2))
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (6, 1, 2, 2)).astype(np.float32))
    x = x[[0, 5]]
    with torch.no_grad():
        y = model(x).argmax(1)
    reasons = []
    for i in range(2):
        x0 = _flat(x[i])
        z0 = net.pre_activations(x0)[:-1]
        unsound = [
            (low, np.where((low < 0) & (up > 0) & (z < 0), z / 2, up))
            for (low, up), z in zip(interval_bounds(net, x0), z0, strict=True)
        ]
        (r,) = milp_minimum(model, x[i : i + 1], y[i : i + 1], bounds=unsound, pool=pool)
        assert r.status == "optimal" and not r.exact and r.upper is None and r.point is not None
        reasons.append(r.reason)
    assert "leaves bounds[0]" in reasons[0]
    assert "torch model's margin" in reasons[1]
