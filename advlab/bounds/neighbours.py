"""Exact minimum adversarial distortions of 1-nearest-neighbour classifiers (Wang et al. 2019).

x is misclassified by 1-NN exactly when some training point t_j of another class is at least as
near as every training point t_i of the example's class: the union, over those j, of the
polytopes P_j = {x : 2 (t_j - t_i).x >= |t_j|^2 - |t_i|^2 for every i of the class} inside the
box [0, 1]. The minimum is the least, over j, of a convex problem: a QP (L2) or an LP (Linf),
solved by HiGHS through advlab.bounds.exact's `_highs_qp` / `_highs_lp`.

Two things keep it fast, neither changing the answer:
- pruning: the distance from x to any one of P_j's half-spaces bounds its minimum from below;
  candidates are visited in the order of that bound (over the class's `nearest` points closest
  to x) and the search stops once the bound reaches the best minimum found;
- cutting planes: each P_j is solved with the half-spaces of the class's nearest points first,
  then the most violated others are added until the point satisfies all of them (a minimum of
  a relaxation that is feasible for the whole problem is its minimum).
Like advlab.bounds.exact, the minimum is over the closed set: at the minimiser t_j ties with
the nearest point of the class; every point beyond it, toward t_j, is misclassified.
"""

from __future__ import annotations

import math
import time

import numpy as np

from advlab.bounds.exact import ExactResult, _distance, _highs_lp, _highs_qp

NORMS = ("l2", "linf")
ROW_TOL = 1e-7  # HiGHS's primal feasibility tolerance on a row (squared-distance units)


def nearest_neighbour_minimum(
    train_x: np.ndarray,
    train_y: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    norm: str = "l2",
    nearest: int = 50,
    add: int = 50,
) -> list[ExactResult]:
    """Exact untargeted minimum distortions (B examples, flattened) of the 1-NN classifier on
    (train_x, train_y) in `norm`; each result's `point` is its minimiser, `reached` the class
    of the training point that wins there. nearest: half-spaces per candidate to start with
    (and to bound candidates by); add: violated half-spaces added per cutting-plane round."""
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")
    tx, ty = np.asarray(train_x, dtype=np.float64), np.asarray(train_y)
    xs = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if tx.ndim != 2 or tx.shape[1] != xs.shape[1] or len(ty) != len(tx):
        raise ValueError("train_x: give (N, D) training points with one label each, D as x's")
    if xs.size and (xs.min() < 0 or xs.max() > 1):
        raise ValueError("x: pixels must lie in [0, 1]")
    return [
        _one(tx, ty, x0, int(label), norm, nearest, add)
        for x0, label in zip(xs, np.asarray(y).tolist(), strict=True)
    ]


def _one(
    tx: np.ndarray, ty: np.ndarray, x0: np.ndarray, label: int, norm: str, nearest: int, add: int
) -> ExactResult:
    start = time.perf_counter()
    own, other = tx[ty == label], np.flatnonzero(ty != label)
    if not len(other):
        return _result(norm, math.inf, None, -1, start, "no training point of another class")
    if not len(own) or _nn_label(tx, ty, x0) != label:
        return _result(norm, 0.0, x0.copy(), _nn_label(tx, ty, x0), start, "")
    close = own[np.argsort(((own - x0) ** 2).sum(1), kind="stable")[:nearest]]
    bounds = _lower_bounds(tx[other], close, x0, norm)
    best, point, reached = math.inf, None, -1
    for j in np.argsort(bounds, kind="stable"):
        if bounds[j] >= best:
            break
        found = _cell_minimum(tx[other[j]], own, close, x0, norm, add)
        if found is not None and _distance(found - x0, norm) < best:
            best, point, reached = _distance(found - x0, norm), found, int(ty[other[j]])
    return _result(norm, best, point, reached, start, "")


def _nn_label(tx: np.ndarray, ty: np.ndarray, x0: np.ndarray) -> int:
    return int(ty[np.argmin(((tx - x0) ** 2).sum(1))])


def _half_spaces(tj: np.ndarray, own: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g, need): P_j's half-spaces for the class points `own` as g d >= need, d = x - x0."""
    g = 2.0 * (tj - own)
    need = (tj @ tj) - (own * own).sum(1) - g @ x0
    return g, need


def _lower_bounds(cands: np.ndarray, close: np.ndarray, x0: np.ndarray, norm: str) -> np.ndarray:
    """(n,) per candidate t_j: the largest distance from x0 to one of its half-spaces against
    the `close` class points (box ignored), a lower bound on its cell's minimum."""
    # g = 2 (t_j - t_i); need = |t_j|^2 - |t_i|^2 - g.x0 = |t_j - x0|^2 - |t_i - x0|^2
    need = ((cands - x0) ** 2).sum(1)[:, None] - ((close - x0) ** 2).sum(1)[None, :]
    if norm == "l2":
        sq = (cands * cands).sum(1)[:, None] + (close * close).sum(1)[None] - 2 * cands @ close.T
        size = 2.0 * np.sqrt(np.clip(sq, 0.0, None))
    else:
        size = np.stack([2.0 * np.abs(c - close).sum(1) for c in cands])
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(size > 0, np.maximum(need, 0.0) / size, np.where(need > 0, np.inf, 0.0))
    return gap.max(1)


def _cell_minimum(
    tj: np.ndarray, own: np.ndarray, close: np.ndarray, x0: np.ndarray, norm: str, add: int
) -> np.ndarray | None:
    """The closest point of P_j inside the box (None: empty), by cutting planes."""
    g_all, need_all = _half_spaces(tj, own, x0)
    g, need = _half_spaces(tj, close, x0)
    lo, hi = -x0, 1.0 - x0
    while True:
        d, _ = _highs_qp(g, need, lo, hi) if norm == "l2" else _highs_lp(g, need, lo, hi)
        if d is None:
            return None
        miss = need_all - g_all @ d
        scale = 1.0 + np.abs(need_all)
        worst = np.argsort(-miss / scale, kind="stable")[:add]
        worst = worst[miss[worst] > ROW_TOL * scale[worst]]
        if not len(worst):
            return np.clip(x0 + d, 0.0, 1.0)
        g, need = np.vstack([g, g_all[worst]]), np.concatenate([need, need_all[worst]])


def _result(
    norm: str, dist: float, point: np.ndarray | None, reached: int, start: float, reason: str
) -> ExactResult:
    seconds = time.perf_counter() - start
    if point is None:
        return ExactResult(norm, False, dist, None, "infeasible", "HiGHS", seconds, seconds,
                           reason=reason or "no other class's cell meets the box")  # fmt: skip
    status = "adversarial_at_start" if dist == 0 else "optimal"
    return ExactResult(norm, True, dist, dist, status, "HiGHS", seconds, seconds,
                       point=point, reached=reached)  # fmt: skip
