"""The minimum adversarial distortion of a ReLU network as a mixed-integer program (Tjeng, Xiao
& Tedrake 2019), written as plain numpy arrays that any solver loads.

Variables: the perturbation d (x = x0 + d), Linf's t, one post-activation a per hidden neuron
that can be positive, a binary per unstable neuron, and (untargeted) a binary per reachable
wrong class. A neuron with pre-activation bounds [l, u]:
  u <= 0: a = 0 (no variable);  l >= 0: a = z;
  l < 0 < u: a >= z, a >= 0, a <= u delta, a <= z - l (1 - delta), delta in {0, 1}.
The bounds must hold over the input set, box [0, 1] intersected with the Linf ball of `radius`
around x0; their looseness (the big-M constants) decides the solve time, so callers pass the
tightest they have (advlab.bounds.propagation) and `interval_bounds` is only the fallback.

numpy only: the solver worker imports this module, and must not pay for torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Bounds = list[tuple[np.ndarray, np.ndarray]]  # per hidden layer: (lower, upper) pre-activations


@dataclass(frozen=True)
class ReluNet:
    """logits = W_L relu(... relu(W_1 x + b_1) ...) + b_L in float64; no hidden layer: linear."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    @property
    def n_inputs(self) -> int:
        return self.weights[0].shape[1]

    def pre_activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's pre-activations at x (..., D); the last entry is the logits."""
        out, h = [], x
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = h @ w.T + b
            out.append(z)
            h = np.maximum(z, 0.0) if k < len(self.weights) - 1 else z
        return out


def input_box(x0: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The input set as per-pixel bounds: [0, 1] intersected with the Linf ball around x0."""
    return np.maximum(x0 - radius, 0.0), np.minimum(x0 + radius, 1.0)


def interval_bounds(net: ReluNet, x0: np.ndarray, radius: float = math.inf) -> Bounds:
    """Plain interval bounds on every hidden pre-activation over the input set.

    The fallback only: it is valid but loose (every ReLU tends to be unstable, with large big-M
    constants); tighter bounds from advlab.bounds.propagation make the same MILP much faster.
    """
    lo, hi = input_box(x0, radius)
    out = []
    for w, b in zip(net.weights[:-1], net.biases[:-1], strict=True):
        pos, neg = np.maximum(w, 0.0), np.minimum(w, 0.0)
        zl, zu = pos @ lo + neg @ hi + b, pos @ hi + neg @ lo + b
        out.append((zl, zu))
        lo, hi = np.maximum(zl, 0.0), np.maximum(zu, 0.0)
    return out


@dataclass
class MipProblem:
    """min c.v + sum(v[quad] ** 2) s.t. row_lb <= A v <= row_ub, lb <= v <= ub, v[integers] in Z.

    A in coordinate form (rows, cols, vals). `solver` names the backend the worker runs
    (cbc, highs or scip); the perturbation d is v[:n_inputs]."""

    c: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    row_lb: np.ndarray
    row_ub: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integers: np.ndarray  # bool per variable
    quad: np.ndarray  # indices of the variables squared into the objective
    n_inputs: int
    solver: str = "cbc"
    time_limit: float = 10.0


@dataclass
class Layout:
    """Where each hidden layer lives among the variables (-1: none), for checking solutions."""

    active: list[np.ndarray] = field(default_factory=list)  # a's index per neuron, -1: a = 0
    binary: list[np.ndarray] = field(default_factory=list)  # delta's index per neuron, -1: stable
    bounds: Bounds = field(default_factory=list)
    margins: np.ndarray | None = None  # (m, len(last)) margin rows over the last variables
    big_m: float = 0.0  # the largest |lower bound| of a class margin in the disjunction


class _Builder:
    """Accumulates variables and rows in coordinate form."""

    def __init__(self) -> None:
        self.lb: list[np.ndarray] = []
        self.ub: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.n = 0
        self.entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.row_lb: list[np.ndarray] = []
        self.row_ub: list[np.ndarray] = []
        self.m = 0

    def variables(self, lb: np.ndarray, ub: np.ndarray, integer: bool = False) -> np.ndarray:
        lb, ub = np.atleast_1d(lb).astype(float), np.atleast_1d(ub).astype(float)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(np.full(len(lb), integer))
        idx = np.arange(self.n, self.n + len(lb))
        self.n += len(lb)
        return idx

    def rows(
        self, terms: list[tuple[np.ndarray, np.ndarray]], lo: np.ndarray, hi: np.ndarray
    ) -> None:
        """Rows lo <= sum_k coef_k @ v[cols_k] <= hi; each coef_k is (m, len(cols_k))."""
        m = len(lo)
        for cols, coef in terms:
            coef = np.asarray(coef, dtype=float).reshape(m, len(cols))
            r, k = np.nonzero(coef)
            self.entries.append((r + self.m, np.asarray(cols)[k], coef[r, k]))
        self.row_lb.append(np.asarray(lo, dtype=float))
        self.row_ub.append(np.asarray(hi, dtype=float))
        self.m += m

    def problem(self, c: np.ndarray, quad: np.ndarray, n_inputs: int) -> MipProblem:
        def cat(parts: list[np.ndarray], dtype: type = float) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return MipProblem(
            c=c, rows=cat([e[0] for e in self.entries], int),
            cols=cat([e[1] for e in self.entries], int), vals=cat([e[2] for e in self.entries]),
            row_lb=cat(self.row_lb), row_ub=cat(self.row_ub), lb=cat(self.lb), ub=cat(self.ub),
            integers=cat(self.integer, bool), quad=quad, n_inputs=n_inputs,
        )  # fmt: skip


def formulate(
    net: ReluNet,
    x0: np.ndarray,
    label: int,
    target: int | None,
    norm: str,
    bounds: Bounds,
    radius: float = math.inf,
) -> tuple[MipProblem, Layout] | None:
    """The MILP (Linf: min t) or MIQP (L2: min ||d||^2) for one example, or None when interval
    reasoning already proves that no wrong class is reachable in the input set.

    target None: some class other than `label` has a logit >= the label's (a disjunction, one
    binary per reachable class); else `target`'s logit is >= every other. The closed set
    (>= 0), whose minimum exists; see advlab.bounds.exact for what it means for an attack."""
    b = _Builder()
    lo, hi = input_box(x0, radius)
    d = b.variables(lo - x0, hi - x0)
    c_parts: list[np.ndarray] = [np.zeros(len(d))]
    quad = np.zeros(0, dtype=int)
    if norm == "linf":
        t = b.variables(np.zeros(1), np.array([min(radius, 1.0)]))
        c_parts.append(np.ones(1))
        eye, ones = np.eye(len(d)), -np.ones((len(d), 1))
        b.rows([(d, eye), (t, ones)], np.full(len(d), -np.inf), np.zeros(len(d)))
        b.rows([(d, -eye), (t, ones)], np.full(len(d), -np.inf), np.zeros(len(d)))
    else:
        quad = d
    layout = Layout(bounds=bounds)
    cols, coef, const = d, net.weights[0], net.weights[0] @ x0 + net.biases[0]
    v_lo, v_hi = lo - x0, hi - x0
    for k, (low, up) in enumerate(bounds):
        a, binary, a_lo, a_hi = _relu_layer(b, cols, coef, const, low, up)
        layout.active.append(a)
        layout.binary.append(binary)
        kept = a >= 0
        cols, coef, const = a[kept], net.weights[k + 1][:, kept], net.biases[k + 1]
        v_lo, v_hi = a_lo[kept], a_hi[kept]
    if not _output_rows(b, layout, cols, coef, const, (v_lo, v_hi), label, target):
        return None
    c = np.concatenate([*c_parts, np.zeros(b.n - sum(len(p) for p in c_parts))])
    return b.problem(c, quad, len(d)), layout


def _relu_layer(
    b: _Builder,
    cols: np.ndarray,
    coef: np.ndarray,
    const: np.ndarray,
    low: np.ndarray,
    up: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One hidden layer's rows; returns a's and delta's index per neuron (-1: none) and a's
    bounds. z = coef @ v[cols] + const."""
    n = len(const)
    a, binary = np.full(n, -1), np.full(n, -1)
    on, unstable = low >= 0, (low < 0) & (up > 0)
    if on.any():  # a = z
        a[on] = b.variables(low[on], up[on])
        i = np.flatnonzero(on)
        b.rows([(a[on], np.eye(len(i))), (cols, -coef[i])], const[i], const[i])
    if unstable.any():
        i = np.flatnonzero(unstable)
        m, lo_i, up_i = len(i), low[i], up[i]
        a[i] = b.variables(np.zeros(m), up_i)
        binary[i] = b.variables(np.zeros(m), np.ones(m), integer=True)
        eye, inf = np.eye(m), np.full(m, np.inf)
        b.rows([(a[i], eye), (cols, -coef[i])], const[i], inf)  # a >= z
        b.rows([(a[i], eye), (binary[i], -np.diag(up_i))], -inf, np.zeros(m))  # a <= u delta
        b.rows(  # a <= z - l (1 - delta)
            [(a[i], eye), (cols, -coef[i]), (binary[i], -np.diag(lo_i))], -inf, const[i] - lo_i
        )
    return a, binary, np.maximum(low, 0.0), np.maximum(up, 0.0)


def _output_rows(
    b: _Builder,
    layout: Layout,
    cols: np.ndarray,
    coef: np.ndarray,
    const: np.ndarray,
    box: tuple[np.ndarray, np.ndarray],
    label: int,
    target: int | None,
) -> bool:
    """The adversarial condition on logits = coef @ v[cols] + const; False if unreachable."""
    if target is not None:
        others = np.array([k for k in range(len(const)) if k != target])
        g, c0 = coef[target] - coef[others], const[target] - const[others]
        b.rows([(cols, g)], -c0, np.full(len(others), np.inf))
        layout.margins = g
        return True
    others = np.array([k for k in range(len(const)) if k != label])
    g, c0 = coef[others] - coef[label], const[others] - const[label]
    pos, neg = np.maximum(g, 0.0), np.minimum(g, 0.0)
    lowest = pos @ box[0] + neg @ box[1] + c0
    highest = pos @ box[1] + neg @ box[0] + c0
    reach = highest >= 0  # interval bounds prove the others never catch up inside the set
    if not reach.any():
        return False
    g, c0, lowest = g[reach], c0[reach], np.minimum(lowest[reach], 0.0)
    beta = b.variables(np.zeros(len(g)), np.ones(len(g)), integer=True)
    # g v + c0 >= lowest (1 - beta): binding when beta = 1, implied by the bounds when 0.
    b.rows([(cols, g), (beta, np.diag(lowest))], lowest - c0, np.full(len(g), np.inf))
    b.rows([(beta, np.ones((1, len(g))))], np.ones(1), np.ones(1))
    layout.margins, layout.big_m = g, float(np.max(-lowest))
    return True


def violations(problem: MipProblem, v: np.ndarray) -> tuple[float, float]:
    """(the largest row or bound violation, the largest distance of an integer variable from
    an integer) of a solver's solution: how far its tolerances let it stray."""
    ax = np.zeros(len(problem.row_lb))
    np.add.at(ax, problem.rows, problem.vals * v[problem.cols])
    feas = max(
        float(np.max(np.maximum(problem.row_lb - ax, ax - problem.row_ub), initial=0.0)),
        float(np.max(np.maximum(problem.lb - v, v - problem.ub), initial=0.0)),
    )
    ints = v[problem.integers]
    return feas, float(np.max(np.abs(ints - np.round(ints)), initial=0.0))


def margin_tolerance(
    net: ReluNet, layout: Layout, feas: float, integral: float, x: np.ndarray
) -> float:
    """How far below 0 the network's own margin at the solver's point x may lie when the
    solver meets its rows to within `feas` and integrality to within `integral` (a posteriori),
    float64 round-off included (ours and torch's: (n + 2) eps |W| |h| per layer, twice).

    Per layer, a variable's error against the true network is at most 2 err(z) + 2 M integral
    + 3 feas (M the neuron's largest |bound|: the big-M rows' slack when delta is off an
    integer), err(z) = |W| err(previous); the margin's is |g| err(last) + big_m integral + 2 feas.
    """
    err, h = np.full(net.n_inputs, feas), x
    for k, (low, up) in enumerate(layout.bounds):
        w, b = net.weights[k], net.biases[k]
        err_z = np.abs(w) @ err + _roundoff(w, b, h)
        err = 2 * err_z + 2 * np.maximum(np.abs(low), np.abs(up)) * integral + 3 * feas
        h = np.maximum(w @ h + b, 0.0)
    kept = layout.active[-1] >= 0 if layout.active else np.ones(net.n_inputs, bool)
    g = layout.margins if layout.margins is not None else np.zeros((1, int(kept.sum())))
    solver = float(np.max(np.abs(g) @ err[kept]) + layout.big_m * integral + 2 * feas)
    return solver + 2 * float(np.max(_roundoff(net.weights[-1], net.biases[-1], h)))


def _roundoff(w: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Twice the float64 error bound of w @ h + b (ours and torch's summation orders)."""
    return 2 * (w.shape[1] + 2) * np.finfo(np.float64).eps * (np.abs(w) @ np.abs(h) + np.abs(b))
