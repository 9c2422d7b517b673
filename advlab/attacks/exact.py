"""Exact minimum distortions as an attack, where the model allows: the points of
advlab.bounds (their proven minima), so sweeps store, score and report them like any attack's.

- a linear model (a torch `Sequential(Flatten, Linear)`, also inside `Normalized`: advlab's
  fc10 and the torch views of logistic regression and the linear SVM): the closed form of
  advlab.bounds.exact.linear_minimum;
- a 1-nearest-neighbour classifier (the `knn` family with n_neighbors 1, Euclidean): the convex
  problems of advlab.bounds.neighbours;
- a tree ensemble (decision tree, random forest, extra trees, histogram gradient boosting), in
  Linf and L2: the mixed-integer program of advlab.bounds.trees (Kantchelian et al. 2016),
  whose points lie past the thresholds by its guard margin and are used as they are.

A minimiser lies on the decision boundary, where the classes tie; the returned image is moved
just past it (toward the winning training point for 1-NN, along the perturbation for linear
models) by the smallest of `nudges` the model itself then classifies as adversarial, so its
distance exceeds the exact minimum by that fraction at most. An example whose minimum could
not be confirmed keeps its clean image (not a success). grad_evals is 0.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    Settings,
    check_norm,
    eval_mode,
    finish,
    merged_settings,
    prepare,
)
from advlab.runtime import model_device, predict


class ExactSettings(Settings):
    # relative steps past the boundary, tried smallest first
    nudges: list[Annotated[float, Field(gt=0, le=0.1)]] = Field(
        default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3], min_length=1
    )
    nearest: int = Field(50, ge=1)  # 1-NN: half-spaces a candidate cell starts with
    time_limit: float = Field(60.0, gt=0)  # tree ensembles: seconds per example's MILP


def exact_minimum_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Any = None,
    settings: ExactSettings | None = None,
    *,
    norm: str = "l2",
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """Untargeted exact minimum-`norm` adversarials ("l2" or "linf"); see the module docstring."""
    s = merged_settings(ExactSettings, settings, overrides, "exact")
    check_norm(norm)
    x, y, _, _ = prepare(model, x, y, target, num_classes=num_classes, generator=generator,
                         default="untargeted", allowed=("untargeted",))  # fmt: skip
    found = _minimisers(model, x, y, norm, s)
    x_adv = x.clone()
    with eval_mode(model):
        for nudge in sorted(s.nudges):
            todo = [i for i, f in enumerate(found) if f is not None]
            if not todo:
                break
            moved = torch.stack([_past(found[i], x[i], nudge) for i in todo]).to(x)
            adv = predict(model, moved) != y[todo]
            for k, i in enumerate(todo):
                if adv[k]:
                    x_adv[i], found[i] = moved[k], None
        return finish(model, x_adv, y, None, torch.zeros(len(x), dtype=torch.int64))


def _minimisers(
    model: nn.Module, x: Tensor, y: Tensor, norm: str, s: ExactSettings
) -> list[tuple[Tensor, Tensor | None] | None]:
    """Per example (minimiser, where to move past it toward, None: use it as it is), None where
    none was confirmed."""
    estimator = getattr(model, "estimator", None)
    if _is_one_nn(estimator):
        from advlab.bounds.neighbours import nearest_neighbour_minimum

        tx = np.asarray(estimator._fit_X, dtype=np.float64)
        ty = np.asarray(estimator.classes_)[np.asarray(estimator._y)]
        flat = x.detach().cpu().double().flatten(1).numpy()
        results = nearest_neighbour_minimum(
            tx, ty, flat, y.cpu().numpy(), norm=norm, nearest=s.nearest
        )
        return [_knn_pair(r, tx, ty, x.shape[1:]) for r in results]
    from advlab.bounds.trees import tree_ensemble

    if tree_ensemble(estimator) is not None:
        return _forest_points(estimator, x, y, norm, s)
    from advlab.bounds.exact import linear_minimum, relu_net

    try:
        linear = len(relu_net(model, x.shape[1:]).weights) == 1
    except ValueError:
        linear = False
    if not linear:
        raise AttackError(
            "exact: no exact minimum for this model; it covers linear models (fc10, logistic, "
            "linear_svm), 1-nearest neighbour (knn with n_neighbors 1) and small tree "
            "ensembles (random_forest, gradient_boosting); use hsj or ddn"
        )
    device = model_device(model)
    results = linear_minimum(model.cpu(), x.cpu(), y.cpu(), norm=norm)
    model.to(device)
    return [
        None if not r.exact else (torch.from_numpy(r.point), torch.from_numpy(r.point))
        for r in results
    ]


def _forest_points(
    estimator: Any, x: Tensor, y: Tensor, norm: str, s: ExactSettings
) -> list[tuple[Tensor, Tensor | None] | None]:
    """A tree ensemble's exact minimisers (already past the boundary by the guard)."""
    from advlab.bounds.trees import forest_minimum

    flat = x.detach().cpu().double().flatten(1).numpy()
    labels = np.asarray(estimator.classes_)[y.cpu().numpy()]
    found = forest_minimum(estimator, flat, labels, time_limit=s.time_limit, norm=norm)
    return [
        None if not r.exact else (torch.from_numpy(r.point).view(x.shape[1:]), None) for r in found
    ]


def _is_one_nn(estimator: Any) -> bool:
    from sklearn.neighbors import KNeighborsClassifier

    if not isinstance(estimator, KNeighborsClassifier) or estimator.n_neighbors != 1:
        return False
    metric, params = estimator.effective_metric_, estimator.effective_metric_params_
    return metric == "euclidean" or (metric == "minkowski" and params.get("p") == 2)


def _knn_pair(result: Any, tx: np.ndarray, ty: np.ndarray, shape: Any) -> Any:
    if not result.exact or result.point is None:
        return None
    point = result.point
    # The winning training point: the nearest one of the reached class at the minimiser.
    mine = np.flatnonzero(ty == result.reached)
    winner = tx[mine[np.argmin(((tx[mine] - point) ** 2).sum(1))]]
    return torch.from_numpy(point).view(shape), torch.from_numpy(winner).view(shape)


def _past(found: tuple[Tensor, Tensor | None], x0: Tensor, nudge: float) -> Tensor:
    """A point just past the minimiser: toward the winning training point (1-NN), or the
    perturbation lengthened (linear: only unsaturated pixels grow, so the margin does)."""
    if found[1] is None:  # a tree ensemble's point: past its thresholds already
        return found[0].to(x0.device, torch.float64)
    point, toward = (t.to(x0.device, torch.float64) for t in found)  # type: ignore[union-attr]
    base = x0.double()
    if torch.equal(point, toward):  # linear
        return (base + (point - base) * (1 + nudge)).clamp(0.0, 1.0)
    return point + nudge * (toward - point)
