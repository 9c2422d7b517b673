"""scipy's L-BFGS-B running the L-BFGS attack's search, one example at a time.

The same objective and c search as `advlab.attacks.lbfgs.lbfgs_attack`, with each solve handed to
scipy's fmin_l_bfgs_b per example and per c, the way Foolbox <= 2.4 ran this attack. It is the
tests' oracle for the batched torch solver and the benchmark's speed baseline, not a tool for
real runs (it is far slower; docs/attacks.md has the numbers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import fmin_l_bfgs_b
from torch import Tensor, nn

from advlab.attacks.base import AttackResult, Target, prepare
from advlab.attacks.lbfgs import (
    CSearch,
    LBFGSSettings,
    PenaltyObjective,
    check_start,
    lbfgs_settings,
    run_c_search,
)


def lbfgs_scipy_reference(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target = None,
    settings: LBFGSSettings | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
    **overrides: Any,
) -> AttackResult:
    """The same attack with scipy's fmin_l_bfgs_b run per example: the oracle and a baseline.

    Arguments, settings and keyword overrides as for `lbfgs_attack`.
    """
    s = lbfgs_settings(settings, overrides)
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="random"
    )
    start = check_start(x, start)
    return run_c_search(model, x, y, resolved, k, s, _scipy_search, start)


def _scipy_search(objective: PenaltyObjective, p: LBFGSSettings) -> Tensor:
    """The c search with scipy's L-BFGS-B, one example and one c at a time."""
    search = CSearch(objective, p)
    evals = torch.zeros(len(objective.x0), dtype=torch.int64, device=objective.x0.device)
    start = objective.start.clone()
    while bool(search.active.any()):
        rows = search.active.nonzero().squeeze(1)
        z, f, n_evals = _scipy_inner(objective, rows, start[rows], p)
        evals[rows] += n_evals
        if p.warm_start:
            start[rows] = z
        search.solved(rows, z, f)
    return evals


def _scipy_inner(
    objective: PenaltyObjective, rows: Tensor, starts: Tensor, p: LBFGSSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """scipy's L-BFGS-B one row at a time from the given starting points; (z, f, evals)."""
    dim = objective.x0.shape[1]
    bounds = np.tile([0.0, 1.0], (dim, 1))
    out = starts.clone()
    values = torch.empty(len(rows), dtype=out.dtype, device=out.device)
    evals = torch.zeros(len(rows), dtype=torch.int64, device=out.device)
    for k, row in enumerate(rows.tolist()):
        row_t = torch.tensor([row], device=out.device)

        def fun(z: np.ndarray, row_t: Tensor = row_t) -> tuple[float, np.ndarray]:
            zt = torch.as_tensor(z, dtype=out.dtype, device=out.device)[None]
            f, g = objective(zt, row_t)
            return float(f.item()), g[0].double().cpu().numpy()

        z, value, info = fmin_l_bfgs_b(
            fun,
            starts[k].double().cpu().numpy(),
            bounds=bounds,
            m=p.history,
            factr=p.ftol / np.finfo(float).eps,
            pgtol=p.gtol,
            maxiter=p.max_iter,
        )
        out[k] = torch.as_tensor(z, dtype=out.dtype, device=out.device)
        values[k] = float(value)
        evals[k] = info["funcalls"]
    return out, values, evals
