"""Exact minimum Linf and L2 distortions of tree ensembles by mixed-integer programming
(Kantchelian, Tygar & Joseph 2016), for scikit-learn's decision trees, random forests, extra
trees and histogram gradient boosting.

Variables: the pixels x_i the trees split on (in [0, 1]); per pixel and threshold t_ij (sorted)
a binary p_ij = [x_i <= t_ij], monotone in j; per tree a leaf weight l_v >= 0 summing to 1,
with the leaves under a node's left child summing to at most its p and those under the right
child to at most 1 - p (so exactly the reached leaf has weight 1); the ensemble's class scores
s_c = a baseline plus the reached leaves' scores (a forest: the mean over trees of the leaf's
class fractions, its predict_proba; boosting: the raw scores, baseline plus each class's trees'
leaf values, whose argmax its predict is); for the untargeted goal a binary per wrong class,
one of which must score at least the label's (strictly more for a class after the label:
argmax takes the first on ties). Going right needs
x_i >= t_ij + guard and going left x_i <= t_ij - 1e-7 (the guard margins: trees compare
float32 pixels with `x <= t`), so the minimum is exact up to `guard`. Every point the solver
returns is checked with the model's own predict; one that fails is reported as such, never as
a minimum. HiGHS (scipy.optimize.milp), with no relative gap; `time_limit` (seconds per
example) covers building the model too, and a solve cut short reports its dual bound as lower.

Linf minimises eps with |x_i - x0_i| <= eps. L2 needs no quadratic term (HiGHS solves no
mixed-integer QP): the trees only see which interval between consecutive thresholds each pixel
lies in, and within an interval the nearest value to x0_i is its projection, so the squared
distance is a constant per (pixel, interval), linear in the p's. The point is rebuilt from the
chosen intervals (x0 projected onto each), which the trees route exactly as the solver's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from advlab.bounds.exact import ExactResult

GUARD = 1e-5  # how far right of a threshold a pixel must lie to go right
LEFT = 1e-7  # and below it to go left: a float32 pixel then still compares <= it
TIE = 1e-6  # how much a class after the label must outscore it
# HiGHS stops by default at a relative gap of 1e-4: none, so "optimal" is the minimum (to its
# absolute gap of 1e-6 in the objective, eps or the squared L2 distance). Scaling the objective
# up (as advlab.bounds.solver_worker does) let HiGHS settle on TIE-violating points within its
# feasibility tolerance, which the model's predict then rejected.
HIGHS: dict[str, Any] = {"mip_rel_gap": 0.0}
# HiGHS's presolve ignores its time limit: on a 100-tree forest of digits (236k nonzeros) it
# ran 52 s under a 5 s limit. Larger models are solved without it (1.4-3x slower on small
# ones, which keep it), and then the time limit holds.
PRESOLVE_NONZEROS = 50_000


@dataclass
class Tree:
    """One tree in scikit-learn's `tree_` layout (children_left < 0 at leaves; a node goes left
    where x[feature] <= threshold) with what each leaf adds to each class's score."""

    feature: np.ndarray
    threshold: np.ndarray
    children_left: np.ndarray
    children_right: np.ndarray
    scores: np.ndarray  # (nodes, classes)

    @property
    def node_count(self) -> int:
        return len(self.feature)


def tree_ensemble(estimator: Any) -> tuple[list[Tree], np.ndarray] | None:
    """(trees, baseline) of a fitted decision tree, random forest, extra-trees or histogram
    gradient-boosting classifier, whose predict is the argmax (the first on ties) of baseline
    plus the reached leaves' scores; None for anything else."""
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.tree import DecisionTreeClassifier

    if isinstance(estimator, HistGradientBoostingClassifier):
        return _boosted_trees(estimator)
    if isinstance(estimator, DecisionTreeClassifier):
        fitted = [estimator.tree_]
    elif isinstance(estimator, RandomForestClassifier | ExtraTreesClassifier):
        fitted = [t.tree_ for t in estimator.estimators_]
    else:
        return None
    trees = []
    for t in fitted:
        fractions = t.value[:, 0, :] / t.value[:, 0, :].sum(1, keepdims=True)
        trees.append(Tree(t.feature, t.threshold, t.children_left, t.children_right,
                          fractions / len(fitted)))  # fmt: skip
    return trees, np.zeros(len(estimator.classes_))


def _boosted_trees(estimator: Any) -> tuple[list[Tree], np.ndarray] | None:
    """Histogram boosting's trees (numeric splits, no missing values: images have none). Two
    classes: one tree per round scoring class 1 against a fixed 0 (predict: class 1 where the
    raw score is > 0); more: one tree per class per round."""
    k = len(estimator.classes_)
    baseline = np.asarray(estimator._baseline_prediction, dtype=np.float64).ravel()
    if k == 2:
        baseline = np.array([0.0, baseline[0]])
    trees = []
    for round_ in estimator._predictors:
        for column, predictor in enumerate(round_):
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                return None
            leaf = nodes["is_leaf"].astype(bool)
            scores = np.zeros((len(nodes), k))
            scores[:, 1 if k == 2 else column] = np.where(leaf, nodes["value"], 0.0)
            left = np.where(leaf, -1, nodes["left"].astype(np.int64))
            right = np.where(leaf, -1, nodes["right"].astype(np.int64))
            feature = nodes["feature_idx"].astype(np.int64)
            trees.append(Tree(feature, nodes["num_threshold"].astype(np.float64), left, right,
                              scores))  # fmt: skip
    return trees, baseline


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
    by a fitted tree ensemble; `y` are class labels (of `estimator.classes_`). `time_limit`:
    seconds per example, model building included."""
    ensemble = tree_ensemble(estimator)
    if ensemble is None:
        raise ValueError(f"forest_minimum takes scikit-learn trees, not {type(estimator).__name__}")
    trees, baseline = ensemble
    xs = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    columns = np.searchsorted(estimator.classes_, np.asarray(y))
    return [
        _one(estimator, trees, baseline, x0, int(c), guard, time_limit, norm)
        for x0, c in zip(xs, columns, strict=True)
    ]


class _Layout:
    """Where each variable lives: x per split pixel, p per (pixel, threshold), leaves, goals."""

    def __init__(self, trees: list[Tree], n_classes: int, label: int) -> None:
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
        self.eps, self.size = at, at + 1  # L2: fixed at 1, carrying the constant cost


def _one(
    estimator: Any,
    trees: list[Tree],
    baseline: np.ndarray,
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
    deadline = start + limit
    lay = _Layout(trees, len(estimator.classes_), label)
    rows = _Rows()
    _pixel_rows(rows, lay, x0, guard, linf=norm == "linf")
    scores = _tree_rows(rows, lay, trees, deadline)
    if scores is None:
        return _out_of_time(norm, "building the MILP", time.perf_counter() - start)
    _goal_rows(rows, lay, scores, _score_ranges(trees, baseline), label)
    cost, lower, upper = np.zeros(lay.size), np.zeros(lay.size), np.ones(lay.size)
    if norm == "linf":
        cost[lay.eps] = 1.0
    else:  # the objective is the squared distance itself: the constant rides on a fixed 1
        cost[lay.eps] = _squared_costs(cost, lay, x0, guard)
        lower[lay.eps] = 1.0
    integral = np.zeros(lay.size)
    integral[len(lay.pixels) : lay.leaves[0][0] if lay.leaves else lay.eps] = 1
    integral[list(lay.goals.values())] = 1
    left = deadline - time.perf_counter()
    if left <= 0:
        return _out_of_time(norm, "building the MILP", time.perf_counter() - start)
    options = {"time_limit": left, "presolve": len(rows.v) <= PRESOLVE_NONZEROS, **HIGHS}
    found = milp(cost, constraints=rows.constraint(lay.size), integrality=integral,
                 bounds=Bounds(lower, upper), options=options)  # fmt: skip
    return _check(estimator, lay, x0, label, found, time.perf_counter() - start, norm, guard)


def _out_of_time(norm: str, where: str, seconds: float) -> ExactResult:
    return ExactResult(norm, False, 0.0, None, "time_limit", f"time limit reached {where}",
                       seconds, seconds)  # fmt: skip


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


def _squared_costs(cost: np.ndarray, lay: _Layout, x0: np.ndarray, guard: float) -> float:
    """L2's objective: interval k of a pixel (q_k = p_{k+1} - p_k, with p_0 = 0 and
    p_{m+1} = 1) costs its squared distance c_k to x0, so p_j carries c_{j-1} - c_j, plus the
    constant c_m (returned, summed over pixels: the objective is then the squared distance)."""
    constant = 0.0
    for f in lay.pixels.tolist():
        span = _intervals(lay.cuts[f], guard)
        c = (np.clip(x0[f], span[:, 0], span[:, 1]) - x0[f]) ** 2
        cost[lay.p[f] : lay.p[f] + len(span) - 1] = c[:-1] - c[1:]
        constant += float(c[-1])
    return constant


def _rebuilt(lay: _Layout, x0: np.ndarray, z: np.ndarray, guard: float) -> np.ndarray:
    """x0 projected onto each pixel's chosen interval (the one below its first p = 1)."""
    point = x0.copy()
    for f in lay.pixels.tolist():
        p = np.round(z[lay.p[f] : lay.p[f] + len(lay.cuts[f])])
        k = int((p == 0).sum())  # p is monotone: the zeros come first
        lo, hi = _intervals(lay.cuts[f], guard)[k]
        point[f] = min(max(x0[f], lo), hi)
    return point


def _tree_rows(
    rows: _Rows, lay: _Layout, trees: list[Tree], deadline: float = math.inf
) -> list[dict[int, float]] | None:
    """Each tree's leaf weights sum to 1 and follow its splits; the class scores, as terms
    (the baseline is in _score_ranges). None once time.perf_counter() passes `deadline`."""
    n_classes = trees[0].scores.shape[1]
    scores: list[dict[int, float]] = [{} for _ in range(n_classes)]
    for t, leaf_vars in zip(trees, lay.leaves, strict=True):
        if time.perf_counter() > deadline:
            return None
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
        for leaf in leaves.tolist():
            for c in range(n_classes):
                if t.scores[leaf, c]:
                    scores[c][var[leaf]] = float(t.scores[leaf, c])
    return scores


def _score_ranges(trees: list[Tree], baseline: np.ndarray) -> np.ndarray:
    """(classes, 3): each class's baseline and the least and greatest score it can reach."""
    leaves = [t.scores[t.children_left < 0] for t in trees]
    low = baseline + sum(s.min(0) for s in leaves)
    high = baseline + sum(s.max(0) for s in leaves)
    return np.stack([baseline, low, high], axis=1)


def _leaves_under(t: Any) -> dict[int, list[int]]:
    under: dict[int, list[int]] = {}
    for node in reversed(range(t.node_count)):  # children come after their parent
        left, right = int(t.children_left[node]), int(t.children_right[node])
        under[node] = [node] if left < 0 else under[left] + under[right]
    return under


def _goal_rows(
    rows: _Rows, lay: _Layout, scores: list[dict[int, float]], ranges: np.ndarray, label: int
) -> None:
    """One wrong class c is chosen (z_c = 1) and scores at least the label (by TIE if c is
    after it): s_c - s_y >= tie - M (1 - z_c), M large enough to free it where z_c = 0."""
    rows.add({z: 1.0 for z in lay.goals.values()}, 1.0, 1.0)
    for c, z in lay.goals.items():
        terms = dict(scores[c])
        for v, w in scores[label].items():
            terms[v] = terms.get(v, 0.0) - w
        tie = TIE if c > label else 0.0
        need = tie - (ranges[c, 0] - ranges[label, 0])  # the baselines move to the bound
        big = max(2.0, tie + ranges[label, 2] - ranges[c, 1] + 1.0)
        rows.add(terms | {z: -big}, need - big, math.inf)


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
        lower = math.inf if status == "infeasible" else _proven(found, norm)
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
    lower = dist if ok else min(_proven(found, norm), dist)
    return ExactResult(norm, ok, lower, dist if reached != label else None,
                       "optimal" if found.status == 0 else "time_limit", found.message,
                       seconds, seconds, point=point, reached=reached, reason=reason)  # fmt: skip


def _proven(found: Any, norm: str) -> float:
    """The solver's dual bound as a distance (the objective is eps, or the squared L2)."""
    bound = getattr(found, "mip_dual_bound", None)
    if bound is None or not math.isfinite(bound) or bound <= 0:
        return 0.0
    return float(bound) if norm == "linf" else math.sqrt(bound)
