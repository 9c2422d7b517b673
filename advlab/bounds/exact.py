"""Exact minimum adversarial distortions, where they can be computed.

- Linear models (logits = W x + b; advlab's fc10, also inside `Normalized`): closed forms per
  wrong class (`pairwise_linear_minima`, `linear_minimum`), HiGHS for a given target.
- Small ReLU networks (Sequential of Flatten, Linear, ReLU; also inside `Normalized`): the
  mixed-integer program of Tjeng, Xiao & Tedrake 2019 (advlab.bounds.milp), Linf with CBC,
  L2 with SCIP, each solve in a worker process (advlab.bounds.solver_worker) with a time limit.

Every example gets an `ExactResult`: exact (proven) or an open bracket [lower, upper].

What the minimum means (strictness): it is taken over the closed set "margin >= 0" (another
class's logit at least the label's; targeted: the target's at least every other's), whose
minimum exists. An attack succeeds on a strict argmax change, which lies in that set, so no
attack's distance can be below the minimum (beyond round-off of the attack's own float32
forward pass). At the minimiser itself the logits tie: argmax's first-index rule decides
whether that exact point counts as adversarial, and points just beyond it always do, so the
minimum is also the infimum of successful attacks' distances.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advlab.bounds.milp import (
    Bounds,
    ReluNet,
    formulate,
    input_box,
    interval_bounds,
    margin_tolerance,
    violations,
)
from advlab.bounds.solver_worker import Answer, SolverPool
from advlab.models import Normalized

NORMS = ("l2", "linf")
SOLVERS = {"linf": ("cbc", "highs", "scip"), "l2": ("scip",)}
EPS64 = float(np.finfo(np.float64).eps)
# A solver's point may miss its rows and integrality by its tolerances (1e-7 for CBC, HiGHS
# and SCIP's rows here, SCIP_FEASTOL); beyond 100 times that it is no solution at all.
MAX_VIOLATION = 1e-5


@dataclass
class ExactResult:
    """One example's minimum distortion in `norm`: exact, or the bracket [lower, upper].

    lower is proven (the solver's bound); upper is the distance of `point`, a point the torch
    model itself (float64) confirmed adversarial to within `tolerance` (None when no such point
    was found). exact: the solver proved optimality and the point was confirmed, so lower and
    upper agree to the solver's tolerances (lower is clipped to upper)."""

    norm: str
    exact: bool
    lower: float
    upper: float | None
    status: str  # optimal | time_limit | infeasible | adversarial_at_start | error | failed
    solver_status: str  # the solver's own word, or what killed the worker
    seconds: float  # wall-clock time of the solve (model building included)
    cpu_seconds: float = 0.0  # the solver process's CPU time: comparable on a loaded machine
    point: np.ndarray | None = None  # the input's shape, float64, inside [0, 1]
    reached: int | None = None  # the class with the largest logit at the point
    margin: float | None = None  # adversarial margin of the torch model at the point
    tolerance: float = 0.0  # how far below 0 `margin` may lie given the solver's tolerances
    reason: str = ""

    @property
    def distance(self) -> float | None:
        """The minimum when proven, else None."""
        return self.upper if self.exact else None


# --------------------------------------------------------------------------- the network


def relu_net(model: nn.Module, input_shape: Sequence[int]) -> ReluNet:
    """The model as float64 affine layers with ReLU between them; raise ValueError unless it
    is a Sequential of Flatten, Linear and ReLU (Linear, (ReLU, Linear)*), perhaps wrapped in
    advlab's Normalized, whose (x - mean) / std is folded into the first layer."""
    scale, shift, inner = _standardization(model, tuple(input_shape))
    if not isinstance(inner, nn.Sequential):
        raise ValueError(f"exact minima take a Sequential of Flatten/Linear/ReLU, not {inner}")
    layers = [m for m in inner if not isinstance(m, nn.Identity | nn.Dropout)]
    while layers and isinstance(layers[0], nn.Flatten):
        layers = layers[1:]
    linear = layers[0::2]
    if not all(isinstance(m, nn.Linear) for m in linear) or not all(
        isinstance(m, nn.ReLU) for m in layers[1::2]
    ):
        names = ", ".join(type(m).__name__ for m in layers)
        raise ValueError(f"exact minima need Linear, (ReLU, Linear)* after Flatten; got {names}")
    if len(layers) % 2 == 0:
        raise ValueError("exact minima need the model to end in a Linear layer")
    weights = [m.weight.detach().cpu().double().numpy() for m in linear]
    biases = [
        m.bias.detach().cpu().double().numpy() if m.bias is not None else np.zeros(len(w))
        for m, w in zip(linear, weights, strict=True)
    ]
    if weights[0].shape[1] != scale.size:
        raise ValueError(f"the first Linear takes {weights[0].shape[1]} inputs, not {scale.size}")
    biases[0] = biases[0] + weights[0] @ shift  # W ((x - mean) / std) = (W / std) x - W mean/std
    weights[0] = weights[0] * scale
    return ReluNet(tuple(weights), tuple(biases))


def _standardization(
    model: nn.Module, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    """(per-pixel scale, shift, inner model): x -> x * scale + shift is Normalized's first step
    (identity without it), read off the module at 0 and 1 so its layout is its own."""
    size = math.prod(shape)
    if not isinstance(model, Normalized):
        return np.ones(size), np.zeros(size), model
    with torch.no_grad():
        zero = model.standardize(torch.zeros(1, *shape, dtype=torch.float64)).flatten()
        one = model.standardize(torch.ones(1, *shape, dtype=torch.float64)).flatten()
    return (one - zero).numpy(), zero.numpy(), model.inner


def _flat64(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().flatten(1).numpy()


def _check_inputs(x: Tensor, y: Tensor, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")
    if x.ndim < 2 or len(x) != len(y):
        raise ValueError("x: give a batch (B, ...) with one label per example")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x: pixels must lie in [0, 1]")


def _targets(target: Tensor | Sequence[int] | None, y: Tensor) -> list[int | None]:
    if target is None:
        return [None] * len(y)
    out = [int(t) for t in torch.as_tensor(target).flatten().tolist()]
    if len(out) != len(y):
        raise ValueError(f"target: give one class per example ({len(y)}), got {len(out)}")
    if any(t == label for t, label in zip(out, y.tolist(), strict=True)):
        raise ValueError("target: a target equals its example's label; give a wrong class")
    return list(out)


def _distance(d: np.ndarray, norm: str) -> float:
    return float(np.max(np.abs(d), initial=0.0)) if norm == "linf" else float(np.linalg.norm(d))


# --------------------------------------------------------------------------- checking a point


class _Checker:
    """The torch model in float64, asked for its margin at a point."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        self.model = copy.deepcopy(model).cpu().double().eval()
        self.shape = shape

    @torch.no_grad()
    def margin(self, point: np.ndarray, label: int, target: int | None) -> tuple[float, int]:
        """(adversarial margin: best wrong logit minus the label's, or the target's minus the
        best other's; the class with the largest logit, first on ties as argmax has it)."""
        logits = self.model(torch.from_numpy(point).reshape(1, *self.shape))[0]
        own = label if target is None else target
        others = torch.cat([logits[:own], logits[own + 1 :]]).max()
        gap = others - logits[own] if target is None else logits[own] - others
        return float(gap), int(logits.argmax())


# --------------------------------------------------------------------------- linear models


def _half_space_minimum(
    a: np.ndarray, need: float, x0: np.ndarray, norm: str
) -> tuple[float, np.ndarray | None]:
    """min ||d|| s.t. a.d >= need, 0 <= x0 + d <= 1; (inf, None) when the box cannot reach.

    Exact, in closed form along the multiplier: the minimiser is d_i = sign(a_i) min(mu r_i,
    room_i) (L2: r_i = |a_i|, KKT of the QP; Linf: r_i = 1, t = mu), room_i the distance to the
    box's face in a_i's direction, and a.d(mu) is nondecreasing and piecewise linear in mu with
    a kink where coordinate i saturates: sort the kinks, find the segment, solve one linear
    equation. O(n log n) and no solver tolerance, instead of a general QP or LP per class."""
    if need <= 0:
        return 0.0, np.zeros_like(x0)
    room = np.where(a > 0, 1.0 - x0, x0)
    speed = np.abs(a) if norm == "l2" else np.ones_like(a)  # d step_i / d mu while free
    live = (a != 0) & (room > 0)
    cap = np.abs(a[live]) * room[live]  # what coordinate i adds to a.d once saturated
    if cap.sum() < need:
        return math.inf, None
    kink = room[live] / speed[live]
    order = np.argsort(kink, kind="stable")
    kink, cap, rate = kink[order], cap[order], (np.abs(a[live]) * speed[live])[order]
    saturated = np.concatenate([[0.0], np.cumsum(cap)])  # caps of the coordinates before i
    free = np.concatenate([np.cumsum(rate[::-1])[::-1], [0.0]])  # rates of i and after
    reach = saturated[1:] + kink * free[1:]  # a.d at each kink
    i = min(int(np.searchsorted(reach, need)), len(kink) - 1)  # the segment ending at kink i
    mu = (need - saturated[i]) / free[i]
    d = np.where(live, np.sign(a) * np.minimum(mu * speed, room), 0.0)
    return _distance(d, norm), d


def pairwise_linear_minima(model: nn.Module, x: Tensor, y: Tensor, norm: str = "l2") -> np.ndarray:
    """(B, K) the exact minimum distortion at which class j's logit reaches the label's (the
    closed half-space, inside the box); inf where the box cannot reach it, nan at the label.
    The untargeted minimum is the row's minimum."""
    _check_inputs(x, y, norm)
    net = relu_net(model, x.shape[1:])
    if len(net.weights) != 1:
        raise ValueError("pairwise_linear_minima takes a linear model; use milp_minimum")
    (w,), (b,) = net.weights, net.biases
    out = np.full((len(x), len(b)), np.nan)
    for i, (x0, label) in enumerate(zip(_flat64(x), y.tolist(), strict=True)):
        for j in range(len(b)):
            if j != label:
                a = w[j] - w[label]
                out[i, j] = _half_space_minimum(a, -(a @ x0 + b[j] - b[label]), x0, norm)[0]
    return out


def linear_minimum(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "l2",
    target: Tensor | Sequence[int] | None = None,
) -> list[ExactResult]:
    """Exact minimum distortions of a linear model, per example: untargeted (the closest wrong
    class, closed form) or toward `target` (its logit >= every other: a QP or LP, HiGHS)."""
    _check_inputs(x, y, norm)
    net = relu_net(model, x.shape[1:])
    if len(net.weights) != 1:
        raise ValueError("linear_minimum takes a linear model; use milp_minimum")
    checker = _Checker(model, tuple(x.shape[1:]))
    results = []
    for x0, label, goal in zip(_flat64(x), y.tolist(), _targets(target, y), strict=True):
        start = time.perf_counter()
        if goal is None:
            found = _closest_half_space(net, x0, label, norm), "closed form"
        else:
            found = _targeted_linear(net, x0, goal, norm)
        results.append(_linear_result(checker, net, (x0, label, goal), norm, found, start))
    return results


def _closest_half_space(
    net: ReluNet, x0: np.ndarray, label: int, norm: str
) -> tuple[float, np.ndarray | None]:
    (w,), (b,) = net.weights, net.biases
    best: tuple[float, np.ndarray | None] = (math.inf, None)
    for j in range(len(b)):
        if j != label:
            a = w[j] - w[label]
            found = _half_space_minimum(a, -(a @ x0 + b[j] - b[label]), x0, norm)
            best = min(best, found, key=lambda f: f[0])
    return best


def _targeted_linear(
    net: ReluNet, x0: np.ndarray, goal: int, norm: str
) -> tuple[tuple[float, np.ndarray | None], str]:
    """min ||d|| s.t. (w_t - w_k).(x0 + d) + b_t - b_k >= 0 for every k, inside the box:
    HiGHS's convex QP (L2) or LP (Linf, via scipy); several constraints leave no closed form."""
    (w,), (b,) = net.weights, net.biases
    others = [k for k in range(len(b)) if k != goal]
    g, c0 = w[goal] - w[others], b[goal] - b[others] + (w[goal] - w[others]) @ x0
    if np.all(c0 >= 0):
        return (0.0, np.zeros_like(x0)), "closed form"
    lo, hi = -x0, 1.0 - x0
    d, how = _highs_qp(g, -c0, lo, hi) if norm == "l2" else _highs_lp(g, -c0, lo, hi)
    return ((_distance(d, norm), d) if d is not None else (math.inf, None)), how


def _highs_qp(
    g: np.ndarray, need: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """min ||d||^2 s.t. g d >= need, lo <= d <= hi, with highspy's QP solver."""
    import highspy

    n, m = g.shape[1], g.shape[0]
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, m
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = np.zeros(n), lo, hi
    lp.row_lower_, lp.row_upper_ = need, np.full(m, highspy.kHighsInf)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.arange(0, n * m + 1, n)
    lp.a_matrix_.index_ = np.tile(np.arange(n), m)
    lp.a_matrix_.value_ = g.ravel()
    hessian = highspy.HighsHessian()
    hessian.dim_, hessian.format_ = n, highspy.HessianFormat.kTriangular
    hessian.start_, hessian.index_, hessian.value_ = np.arange(n + 1), np.arange(n), np.full(n, 2.0)
    model = highspy.HighsModel()
    model.lp_, model.hessian_ = lp, hessian
    h.passModel(model)
    h.run()
    status = h.getModelStatus()
    raw = f"HiGHS QP: {h.modelStatusToString(status)}"
    if status != highspy.HighsModelStatus.kOptimal:
        return None, raw
    return np.clip(np.array(h.getSolution().col_value), lo, hi), raw


def _highs_lp(
    g: np.ndarray, need: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """min t s.t. g d >= need, |d_i| <= t, lo <= d <= hi, with HiGHS through scipy."""
    from scipy.optimize import linprog

    n = g.shape[1]
    eye, ones = np.eye(n), -np.ones((n, 1))
    a_ub = np.vstack([np.hstack([-g, np.zeros((len(g), 1))]), np.hstack([eye, ones]),
                      np.hstack([-eye, ones])])  # fmt: skip
    b_ub = np.concatenate([-need, np.zeros(2 * n)])
    cost = np.concatenate([np.zeros(n), [1.0]])
    bounds = [*zip(lo, hi, strict=True), (0.0, 1.0)]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    raw = f"HiGHS LP: {res.message}"
    return (np.clip(res.x[:n], lo, hi) if res.status == 0 else None), raw


def _linear_result(
    checker: _Checker,
    net: ReluNet,
    example: tuple[np.ndarray, int, int | None],
    norm: str,
    found: tuple[tuple[float, np.ndarray | None], str],
    start: float,
) -> ExactResult:
    (dist, d), how = found
    x0, label, goal = example
    seconds = time.perf_counter() - start
    if d is None:
        status = "infeasible" if how == "closed form" or "nfeasible" in how else "error"
        lower = math.inf if status == "infeasible" else 0.0
        return ExactResult(norm, False, lower, None, status, how, seconds, seconds)
    point = np.clip(x0 + d, 0.0, 1.0)
    margin, reached = checker.margin(point, label, goal)
    # float64 round-off of the logits at the point (ours and torch's), plus for HiGHS its
    # primal feasibility tolerance (1e-7 by default) on its rows, which are the margins.
    w, b = net.weights[0], net.biases[0]
    scale = float(np.max(np.abs(w) @ np.abs(point) + np.abs(b)))
    tol = scale * 8 * len(x0) * EPS64 + (0.0 if how == "closed form" else 1e-7)
    ok = margin >= -tol
    return ExactResult(
        norm=norm,
        exact=ok,
        lower=dist,
        upper=dist if ok else None,
        status="optimal" if dist > 0 else "adversarial_at_start",
        solver_status=how,
        seconds=seconds,
        cpu_seconds=seconds,
        point=point.reshape(checker.shape),
        reached=reached,
        margin=margin,
        tolerance=tol,
        reason="" if ok else f"the torch model's margin at the point is {margin:.3g} < -{tol:.3g}",
    )


# --------------------------------------------------------------------------- ReLU networks


def milp_minimum(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "linf",
    target: Tensor | Sequence[int] | None = None,
    bounds: Sequence[tuple[Any, Any]] | None = None,
    radius: float | Sequence[float] | None = None,
    time_limit: float = 10.0,
    solver: str | None = None,
    workers: int = 1,
    grace: float = 60.0,
    pool: SolverPool | None = None,
) -> list[ExactResult]:
    """Exact minimum distortions of a small ReLU network by mixed-integer programming.

    bounds: per hidden layer, (lower, upper) pre-activation bounds of shape (B, n) or (n,),
    valid over the input set: the box [0, 1] intersected with the Linf ball of `radius` around
    each example (radius: a number or one per example; None: the whole box). None: plain
    interval bounds over that set (valid but loose and slow; pass advlab.bounds.propagation's).
    A minimum beyond the radius is reported as the bracket [radius, best found].
    norm: linf (CBC by default: a MILP) or l2 (SCIP: a MIQP). time_limit: seconds per example;
    a solve that hits it gives the bracket [solver's bound, best point found]. Each solve runs
    in a worker process (`workers` of them, or the given `pool`), so a crash costs one example.
    """
    _check_inputs(x, y, norm)
    solver = solver or SOLVERS[norm][0]
    if solver not in SOLVERS[norm]:
        raise ValueError(f"solver: {solver} cannot solve {norm}; use {', '.join(SOLVERS[norm])}")
    net = relu_net(model, x.shape[1:])
    radii = _radii(radius, len(x))
    cases = [
        _Case(net, x0, label, goal, norm, _example_bounds(net, bounds, i, x0, radii[i]), radii[i])
        for i, (x0, label, goal) in enumerate(
            zip(_flat64(x), y.tolist(), _targets(target, y), strict=True)
        )
    ]
    problems = [c.problem(solver, time_limit) for c in cases]
    todo = [p for p in problems if p is not None]
    if pool is None:
        with SolverPool(workers, grace=grace) as own:
            answers = iter(own.solve_all(todo))
    else:
        answers = iter(pool.solve_all(todo))
    checker = _Checker(model, tuple(x.shape[1:]))
    return [
        c.result(checker, next(answers) if p is not None else None)
        for c, p in zip(cases, problems, strict=True)
    ]


def _radii(radius: float | Sequence[float] | None, n: int) -> list[float]:
    if radius is None:
        return [math.inf] * n
    r = np.broadcast_to(np.asarray(radius, dtype=float), (n,))
    if np.any(r <= 0) or np.any(np.isnan(r)):
        raise ValueError("radius: give a positive number per example")
    return [float(v) for v in r]


def _example_bounds(
    net: ReluNet, bounds: Sequence[tuple[Any, Any]] | None, i: int, x0: np.ndarray, radius: float
) -> Bounds:
    """Example i's bounds as float64 arrays, checked: one pair per hidden layer, lower <=
    upper, and x0's own pre-activations inside (x0 is in every input set)."""
    if bounds is None:
        return interval_bounds(net, x0, radius)
    widths = [len(b) for b in net.biases[:-1]]
    if len(bounds) != len(widths):
        raise ValueError(f"bounds: give (lower, upper) for each of the {len(widths)} hidden layers")
    out = []
    at_x0 = net.pre_activations(x0)
    for k, (pair, width) in enumerate(zip(bounds, widths, strict=True)):
        low, up = (np.asarray(torch.as_tensor(v).detach().cpu(), dtype=float) for v in pair)
        low, up = (v[i] if v.ndim == 2 else v for v in (low, up))
        if low.shape != (width,) or up.shape != (width,):
            raise ValueError(f"bounds[{k}]: expected shape (B, {width}) or ({width},)")
        slack = 1e-9 * (1.0 + np.abs(at_x0[k]))
        if np.any(low > up) or np.any(at_x0[k] < low - slack) or np.any(at_x0[k] > up + slack):
            raise ValueError(f"bounds[{k}] do not hold at example {i} itself: not valid bounds")
        out.append((low, up))
    return out


@dataclass
class _Case:
    """One example's problem and how its answer becomes an ExactResult."""

    net: ReluNet
    x0: np.ndarray
    label: int
    goal: int | None
    norm: str
    bounds: Bounds
    radius: float

    def __post_init__(self) -> None:
        logits = self.net.pre_activations(self.x0)[-1]
        own = self.label if self.goal is None else self.goal
        best_other = np.max(np.delete(logits, own))
        gap = best_other - logits[own] if self.goal is None else logits[own] - best_other
        self.at_start = bool(gap >= 0)
        self.built = None
        if not self.at_start:
            self.built = formulate(self.net, self.x0, self.label, self.goal, self.norm,
                                   self.bounds, self.radius)  # fmt: skip

    def problem(self, solver: str, time_limit: float) -> Any:
        if self.built is None:
            return None
        self.built[0].solver, self.built[0].time_limit = solver, time_limit
        return self.built[0]

    def result(self, checker: _Checker, answer: Answer | None) -> ExactResult:
        if self.at_start:
            margin, reached = checker.margin(self.x0, self.label, self.goal)
            return ExactResult(self.norm, True, 0.0, 0.0, "adversarial_at_start", "", 0.0,
                               point=self.x0.reshape(checker.shape), reached=reached,
                               margin=margin)  # fmt: skip
        if answer is None:  # interval reasoning: no wrong class reachable inside the set
            return ExactResult(self.norm, False, self.radius, None, "infeasible", "bounds", 0.0)
        status, raw = answer["status"], str(answer.get("solver_status", ""))
        found = ExactResult(self.norm, False, 0.0, None, status, raw,
                            seconds=float(answer.get("seconds", 0.0)),
                            cpu_seconds=float(answer.get("cpu_seconds", 0.0)))  # fmt: skip
        if status in ("failed", "error"):
            found.reason = str(answer.get("reason", raw))
        elif status == "infeasible":  # no adversarial example in the set: beyond the radius
            found.lower = self.radius
        else:
            # Either the minimum lies within the radius (then the solver's bound holds for
            # it) or beyond it: min(bound, radius) is a lower bound either way.
            bound = float(answer["bound"])
            found.lower = min(math.sqrt(bound) if self.norm == "l2" else bound, self.radius)
            if answer.get("values") is not None:
                self._check_point(checker, found, answer["values"])
        return found

    def _check_point(self, checker: _Checker, found: ExactResult, values: np.ndarray) -> None:
        """The solver's point, checked with the torch model: upper, exact and the reasons."""
        problem, layout = self.built  # type: ignore[misc]
        lo, hi = input_box(self.x0, self.radius)
        point = np.clip(self.x0 + values[: problem.n_inputs], lo, hi)
        found.point = point.reshape(checker.shape)
        found.margin, found.reached = checker.margin(point, self.label, self.goal)
        feas, integral = violations(problem, values)
        found.tolerance = margin_tolerance(self.net, layout, feas, integral, point)
        found.reason = self._doubts(point, found.margin, found.tolerance)
        if max(feas, integral) > MAX_VIOLATION:  # the a posteriori tolerance would excuse it
            found.reason = f"the solver's point violates its rows by {max(feas, integral):.3g}"
        if found.reason:  # an unconfirmed point bounds nothing
            return
        found.upper = _distance(point - self.x0, self.norm)
        found.lower = min(found.lower, found.upper)  # equal up to the solver's tolerances
        # L2 inside the Linf ball of the bounds: a minimum beyond the radius may lie outside
        # it, so only [radius, upper] is known. (Linf: the point lies inside by construction.)
        beyond = self.norm == "l2" and found.upper > self.radius
        found.exact = found.status == "optimal" and not beyond
        if beyond:
            found.reason = f"the minimum lies beyond radius {self.radius:g}, which bounds cover"

    def _doubts(self, point: np.ndarray, margin: float, tol: float) -> str:
        """Why the solver's point cannot be trusted: the torch model disagrees beyond the
        solver's tolerance, or the point leaves the given bounds (then they were not valid)."""
        if margin < -tol:
            return f"the torch model's margin at the point is {margin:.3g} < -{tol:.3g}"
        for k, (low, up) in enumerate(self.bounds):
            z = self.net.pre_activations(point)[k]
            slack = tol + 1e-9 * (1.0 + np.abs(z))
            if np.any(z < low - slack) or np.any(z > up + slack):
                return f"the point leaves bounds[{k}]: they do not hold over the input set"
        return ""


def exact_minimum(
    model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2", **settings: Any
) -> list[ExactResult]:
    """`linear_minimum` for a linear model, `milp_minimum` (with `settings`) for a ReLU net."""
    net = relu_net(model, x.shape[1:])
    if len(net.weights) == 1:
        return linear_minimum(model, x, y, norm=norm, target=settings.get("target"))
    return milp_minimum(model, x, y, norm=norm, **settings)
