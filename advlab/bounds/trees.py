"""Exact minimum Linf and L2 distortions of tree ensembles by mixed-integer programming
(Kantchelian, Tygar & Joseph 2016), for scikit-learn's decision trees, random forests and extra
trees.

Variables: the pixels x_i the trees split on (in [0, 1]); per pixel and threshold t_ij (sorted)
a binary p_ij = [x_i <= t_ij], monotone in j; per tree a leaf weight l_v >= 0 summing to 1,
with the leaves under a node's left child summing to at most its p and those under the right
child to at most 1 - p (so exactly the reached leaf has weight 1); the ensemble's class scores
s_c = mean over trees of the reached leaf's class fractions (scikit-learn's predict_proba);
for the untargeted goal a binary per wrong class, one of which must score at least the label's
(strictly more for a class after the label: argmax takes the first on ties). Going right needs
x_i >= t_ij + guard and going left x_i <= t_ij - 1e-7 (the guard margins: trees compare
float32 pixels with `x <= t`), so the minimum is exact up to `guard`. Every point the solver
returns is checked with the model's own predict; one that fails is reported as such, never as
a minimum. HiGHS (scipy.optimize.milp).

Linf minimises eps with |x_i - x0_i| <= eps. L2 needs no quadratic term (HiGHS solves no
mixed-integer QP): the trees only see which interval between consecutive thresholds each pixel
lies in, and within an interval the nearest value to x0_i is its projection, so the squared
distance is a constant per (pixel, interval), linear in the p's. The point is rebuilt from the
chosen intervals (x0 projected onto each), which the trees route exactly as the solver's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from advlab.bounds.exact import ExactResult

GUARD = 1e-5  # how far right of a threshold a pixel must lie to go right
LEFT = 1e-7  # and below it to go left: a float32 pixel then still compares <= it
TIE = 1e-6  # how much a class after the label must outscore it


def tree_ensemble_trees(estimator: Any) -> list[Any] | None:
    """The fitted `tree_` objects of a decision tree, random forest or extra-trees classifier
    (None for anything else)."""
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    if isinstance(estimator, DecisionTreeClassifier):
        return [estimator.tree_]
    if isinstance(estimator, RandomForestClassifier | ExtraTreesClassifier):
        return [t.tree_ for t in estimator.estimators_]
    return None


def forest_minimum(
    estimator: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    guard: float = GUARD,
    time_limit: float = 60.0,
    norm: str = "linf",
) -> list[ExactResult]:
    """Exact untargeted minimum distortions in `norm` ("linf" or "l2") of B flattened examples
    by a fitted tree ensemble; `y` are class labels (of `estimator.classes_`)."""
    trees = tree_ensemble_trees(estimator)
    if trees is None:
        raise ValueError(f"forest_minimum takes scikit-learn trees, not {type(estimator).__name__}")
    xs = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    columns = np.searchsorted(estimator.classes_, np.asarray(y))
    return [
        _one(estimator, trees, x0, int(c), guard, time_limit, norm)
        for x0, c in zip(xs, columns, strict=True)
    ]


class _Layout:
    """Where each variable lives: x per split pixel, p per (pixel, threshold), leaves, goals."""

    def __init__(self, trees: list[Any], n_classes: int, label: int) -> None:
        used = sorted({int(f) for t in trees for f in t.feature[t.children_left >= 0]})
        self.pixels = np.array(used, dtype=np.int64)
        self.cuts = {
            f: np.unique(np.concatenate([t.threshold[(t.feature == f) & (t.children_left >= 0)]
                                         for t in trees]))
            for f in used
        }  # fmt: skip
        self.x = {f: k for k, f in enumerate(used)}
        at = len(used)
        self.p: dict[int, int] = {}  # first p index of pixel f
        for f in used:
            self.p[f] = at
            at += len(self.cuts[f])
        self.leaves: list[np.ndarray] = []
        for t in trees:
            leaves = np.flatnonzero(t.children_left < 0)
            self.leaves.append(at + np.arange(len(leaves)))
            at += len(leaves)
        self.goals = {c: at + k for k, c in enumerate(c for c in range(n_classes) if c != label)}
        at += len(self.goals)
        self.eps, self.size = at, at + 1


def _one(
    estimator: Any,
    trees: list[Any],
    x0: np.ndarray,
    label: int,
    guard: float,
    limit: float,
    norm: str,
) -> ExactResult:
    start = time.perf_counter()
    said = int(np.searchsorted(estimator.classes_, estimator.predict(x0[None])[0]))
    if said != label:
        return ExactResult(norm, True, 0.0, 0.0, "adversarial_at_start", "", 0.0,
                           point=x0.copy(), reached=said)  # fmt: skip
    lay = _Layout(trees, len(estimator.classes_), label)
    rows = _Rows()
    _pixel_rows(rows, lay, x0, guard, linf=norm == "linf")
    scores = _tree_rows(rows, lay, trees)
    _goal_rows(rows, lay, scores, label)
    cost = np.zeros(lay.size)
    if norm == "linf":
        cost[lay.eps] = 1.0
    else:
        _squared_costs(cost, lay, x0, guard)
    integral = np.zeros(lay.size)
    integral[len(lay.pixels) : lay.leaves[0][0] if lay.leaves else lay.eps] = 1
    integral[list(lay.goals.values())] = 1
    lower, upper = np.zeros(lay.size), np.ones(lay.size)
    found = milp(cost, constraints=rows.constraint(lay.size), integrality=integral,
                 bounds=Bounds(lower, upper), options={"time_limit": limit})  # fmt: skip
    return _check(estimator, lay, x0, label, found, time.perf_counter() - start, norm, guard)


class _Rows:
    """Sparse rows lower <= A z <= upper, added one at a time."""

    def __init__(self) -> None:
        self.i: list[int] = []
        self.j: list[int] = []
        self.v: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, terms: dict[int, float], lo: float, hi: float) -> None:
        row = len(self.lo)
        for j, v in terms.items():
            self.i.append(row)
            self.j.append(j)
            self.v.append(v)
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self, size: int) -> LinearConstraint:
        a = coo_matrix((self.v, (self.i, self.j)), shape=(len(self.lo), size)).tocsr()
        return LinearConstraint(a, np.array(self.lo), np.array(self.hi))


def _pixel_rows(rows: _Rows, lay: _Layout, x0: np.ndarray, guard: float, linf: bool) -> None:
    """p monotone; x <= t - LEFT where p = 1, x >= t + guard where p = 0; in Linf
    |x - x0| <= eps."""
    for f in lay.pixels.tolist():
        xi, cuts = lay.x[f], lay.cuts[f]
        for j, t in enumerate(cuts.tolist()):
            pj = lay.p[f] + j
            if j + 1 < len(cuts):
                rows.add({pj: 1.0, pj + 1: -1.0}, -math.inf, 0.0)
            rows.add({xi: 1.0, pj: 1.0}, -math.inf, t - LEFT + 1.0)
            rows.add({xi: 1.0, pj: t + guard}, t + guard, math.inf)
        if linf:
            rows.add({xi: 1.0, lay.eps: -1.0}, -math.inf, float(x0[f]))
            rows.add({xi: 1.0, lay.eps: 1.0}, float(x0[f]), math.inf)


def _intervals(cuts: np.ndarray, guard: float) -> np.ndarray:
    """(m + 1, 2) the values a pixel may take in each interval between its m thresholds."""
    lo = np.concatenate([[0.0], cuts + guard])
    hi = np.concatenate([cuts - LEFT, [1.0]])
    return np.stack([lo, hi], axis=1)


def _squared_costs(cost: np.ndarray, lay: _Layout, x0: np.ndarray, guard: float) -> None:
    """L2's objective, up to a constant: interval k of a pixel (q_k = p_{k+1} - p_k, with
    p_0 = 0 and p_{m+1} = 1) costs its squared distance to x0, so p_j carries c_{j-1} - c_j."""
    for f in lay.pixels.tolist():
        span = _intervals(lay.cuts[f], guard)
        c = (np.clip(x0[f], span[:, 0], span[:, 1]) - x0[f]) ** 2
        cost[lay.p[f] : lay.p[f] + len(span) - 1] = c[:-1] - c[1:]


def _rebuilt(lay: _Layout, x0: np.ndarray, z: np.ndarray, guard: float) -> np.ndarray:
    """x0 projected onto each pixel's chosen interval (the one below its first p = 1)."""
    point = x0.copy()
    for f in lay.pixels.tolist():
        p = np.round(z[lay.p[f] : lay.p[f] + len(lay.cuts[f])])
        k = int((p == 0).sum())  # p is monotone: the zeros come first
        lo, hi = _intervals(lay.cuts[f], guard)[k]
        point[f] = min(max(x0[f], lo), hi)
    return point


def _tree_rows(rows: _Rows, lay: _Layout, trees: list[Any]) -> list[dict[int, float]]:
    """Each tree's leaf weights sum to 1 and follow its splits; the class scores, as terms."""
    n_classes = trees[0].value.shape[2]
    scores: list[dict[int, float]] = [{} for _ in range(n_classes)]
    for t, leaf_vars in zip(trees, lay.leaves, strict=True):
        leaves = np.flatnonzero(t.children_left < 0)
        var = dict(zip(leaves.tolist(), leaf_vars.tolist(), strict=True))
        rows.add({v: 1.0 for v in leaf_vars.tolist()}, 1.0, 1.0)
        under = _leaves_under(t)
        for node in np.flatnonzero(t.children_left >= 0).tolist():
            f, thr = int(t.feature[node]), float(t.threshold[node])
            pj = lay.p[f] + int(np.searchsorted(lay.cuts[f], thr))
            left = {var[v]: 1.0 for v in under[int(t.children_left[node])]}
            right = {var[v]: 1.0 for v in under[int(t.children_right[node])]}
            rows.add(left | {pj: -1.0}, -math.inf, 0.0)
            rows.add(right | {pj: 1.0}, -math.inf, 1.0)
        fractions = t.value[:, 0, :] / t.value[:, 0, :].sum(1, keepdims=True)
        for leaf in leaves.tolist():
            for c in range(n_classes):
                if fractions[leaf, c]:
                    scores[c][var[leaf]] = fractions[leaf, c] / len(trees)
    return scores


def _leaves_under(t: Any) -> dict[int, list[int]]:
    under: dict[int, list[int]] = {}
    for node in reversed(range(t.node_count)):  # children come after their parent
        left, right = int(t.children_left[node]), int(t.children_right[node])
        under[node] = [node] if left < 0 else under[left] + under[right]
    return under


def _goal_rows(rows: _Rows, lay: _Layout, scores: list[dict[int, float]], label: int) -> None:
    """One wrong class c is chosen (z_c = 1) and scores at least the label (by TIE if c is
    after it): s_c - s_y >= tie - 2 (1 - z_c)."""
    rows.add({z: 1.0 for z in lay.goals.values()}, 1.0, 1.0)
    for c, z in lay.goals.items():
        terms = dict(scores[c])
        for v, w in scores[label].items():
            terms[v] = terms.get(v, 0.0) - w
        tie = TIE if c > label else 0.0
        rows.add(terms | {z: -2.0}, tie - 2.0, math.inf)


def _check(
    estimator: Any,
    lay: _Layout,
    x0: np.ndarray,
    label: int,
    found: Any,
    seconds: float,
    norm: str,
    guard: float,
) -> ExactResult:
    if found.x is None:
        status = {2: "infeasible", 1: "time_limit"}.get(found.status, "error")
        lower = math.inf if status == "infeasible" else 0.0
        return ExactResult(norm, False, lower, None, status, found.message, seconds, seconds)
    if norm == "linf":
        point = x0.copy()
        point[lay.pixels] = np.clip(found.x[: len(lay.pixels)], 0.0, 1.0)
        dist = float(np.abs(point - x0).max(initial=0.0))
    else:
        point = _rebuilt(lay, x0, found.x, guard)
        dist = float(np.linalg.norm(point - x0))
    reached = int(np.searchsorted(estimator.classes_, estimator.predict(point[None])[0]))
    ok = reached != label and found.status == 0
    reason = "" if reached != label else "the model's own predict keeps the label at the point"
    return ExactResult(norm, ok, dist if ok else 0.0, dist if reached != label else None,
                       "optimal" if found.status == 0 else "time_limit", found.message,
                       seconds, seconds, point=point, reached=reached, reason=reason)  # fmt: skip
