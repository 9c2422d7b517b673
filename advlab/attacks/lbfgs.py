"""Szegedy et al. (2014, section 4.1) box-constrained L-BFGS minimum-distortion attack.

The paper's problem: minimise ||r||_2 s.t. f(x + r) = l and x + r in [0,1]^m. It is approximated
by a penalty: for a weight c > 0,

    minimise  c * ||r||_2^2 + CE(f(x + r), l)   over x + r in [0,1]^m,

and a per-example search over c keeps the closest image classified as l.

Choices (the paper gives none of these):
- Squared L2 penalty rather than c * |r|: smooth at r = 0 (the starting point), so quasi-Newton
  curvature pairs stay meaningful. For a convex loss both penalties trace the same set of
  minimisers as c varies (each solves min CE s.t. ||r|| <= rho for some rho), only c is relabelled.
- c search per example: start at c_init; while no bracket exists multiply (success) or divide
  (failure) c by c_factor; then bisect geometrically between the largest successful c (lo) and
  the smallest failing c (hi). Larger c gives smaller r. Each inner solve starts from r = 0.
- "Success" during the search needs the target logit to beat every other logit by `margin`, so a
  kept image cannot flip class under the floating-point noise of a different batch size.
- Kept image: the closest successful point evaluated anywhere in the search (every L-BFGS iterate
  and line-search trial, not only each c's minimiser); it is never farther than the paper's choice.

Two solvers share the objective and the c search:
- `lbfgs_attack`: a batched projected L-BFGS in torch with per-example state (c, bracket, curvature
  pairs, line-search step, active set), so no example's result depends on its batch-mates.
- `lbfgs_scipy_reference`: scipy's fmin_l_bfgs_b, one example at a time; the test oracle and the
  speed baseline (the way Foolbox <= 2.4 ran this attack).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import fmin_l_bfgs_b
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    check_inputs,
    check_num_classes,
    eval_mode,
    finish,
    model_device,
    random_wrong_targets,
)

# A function of a batch of flat points and the example rows they belong to -> (f (n,), grad (n, D)).
BatchObjective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SearchParams:
    """Knobs shared by the torch attack and the scipy reference."""

    c_init: float = 1.0  # first penalty weight
    c_factor: float = 10.0  # multiply/divide c by this until a bracket exists
    search_steps: int = 12  # inner solves per example (bracketing + bisection)
    c_rtol: float = 1e-3  # stop an example's search once hi / lo <= 1 + c_rtol
    max_iter: int = 100  # L-BFGS iterations per inner solve
    history: int = 10  # curvature pairs kept (scipy's m)
    ftol: float = 1e-6  # stop when the relative decrease of the objective is below this
    gtol: float = 1e-5  # stop when the projected gradient's max-norm is below this
    margin: float = 1e-5  # logit margin that counts as reaching the target

    def validate(self) -> None:
        """Raise AttackError on a parameter no search can run with."""
        positive = {"c_init": self.c_init, "ftol": self.ftol, "gtol": self.gtol}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise AttackError(f"{name}: must be a finite number > 0, got {value}")
        if not (math.isfinite(self.c_factor) and self.c_factor > 1):
            raise AttackError(f"c_factor: must be a finite number > 1, got {self.c_factor}")
        if not (math.isfinite(self.c_rtol) and self.c_rtol >= 0):
            raise AttackError(f"c_rtol: must be a finite number >= 0, got {self.c_rtol}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise AttackError(f"margin: must be a finite number >= 0, got {self.margin}")
        for name in ("search_steps", "max_iter", "history"):
            if int(getattr(self, name)) < 1:
                raise AttackError(f"{name}: must be an integer >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- batched L-BFGS-B


def minimize_box_lbfgs(
    fun: BatchObjective,
    x0: Tensor,
    *,
    max_iter: int = 100,
    history: int = 10,
    ftol: float = 1e-6,
    gtol: float = 1e-5,
    max_linesearch: int = 20,
) -> tuple[Tensor, Tensor]:
    """Minimise n independent problems over [0,1]^D with projected L-BFGS; (x (n, D), evals (n,)).

    Every row has its own curvature pairs, step size, active set and stopping state; a row only
    ever touches its own data, and stopped rows are no longer evaluated. The direction is the
    L-BFGS two-loop product restricted to the free variables (those not pinned at a bound by the
    gradient), which is always a descent direction; steps are projected onto the box and accepted
    by a projected Armijo backtracking search.
    """
    n, dim = x0.shape
    dev, dt = x0.device, x0.dtype
    x = x0.clone()
    rows = torch.arange(n, device=dev)
    f, g = fun(x, rows)
    evals = torch.ones(n, dtype=torch.int64, device=dev)
    mem_s = torch.zeros(n, history, dim, device=dev, dtype=dt)
    mem_y = torch.zeros_like(mem_s)
    rho = torch.zeros(n, history, device=dev, dtype=dt)  # 0 marks an empty slot
    gamma = torch.zeros(n, device=dev, dtype=dt)  # initial Hessian scale; 0 until a pair exists
    done = ~torch.isfinite(f)
    eps = torch.finfo(dt).eps
    for _ in range(max_iter):
        done |= _projected_grad_norm(x, g) <= gtol
        act = (~done).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        xa, fa, ga = x[act], f[act], g[act]
        d = _search_direction(xa, ga, mem_s[act], mem_y[act], rho[act], gamma[act])
        xt, ft, gt, ok, n_evals = _projected_armijo(fun, act, xa, fa, ga, d, max_linesearch)
        evals[act] += n_evals
        # Rows whose line search failed: drop their memory and retry along the gradient;
        # rows that already were on the gradient cannot make progress and stop.
        stuck = act[~ok]
        had_memory = gamma[stuck] > 0
        done[stuck[~had_memory]] = True
        rho[stuck], gamma[stuck] = 0.0, 0.0
        moved = act[ok]
        s, y = xt[ok] - xa[ok], gt[ok] - ga[ok]
        _push_pairs(mem_s, mem_y, rho, gamma, moved, s, y, eps)
        f_old = f[moved]
        x[moved], f[moved], g[moved] = xt[ok], ft[ok], gt[ok]
        scale = torch.maximum(torch.maximum(f_old.abs(), ft[ok].abs()), torch.ones_like(f_old))
        done[moved] |= (f_old - ft[ok]) <= ftol * scale
    return x, evals


def _projected_grad_norm(x: Tensor, g: Tensor) -> Tensor:
    """Max-norm of the projected gradient x - P(x - g), zero exactly at a box-KKT point."""
    return (x - (x - g).clamp(0.0, 1.0)).abs().amax(dim=1)


def _search_direction(
    x: Tensor, g: Tensor, mem_s: Tensor, mem_y: Tensor, rho: Tensor, gamma: Tensor
) -> Tensor:
    """-H g on the free variables, H the per-row L-BFGS inverse Hessian; zero on pinned ones."""
    free = ~(((x <= 0) & (g > 0)) | ((x >= 1) & (g < 0)))
    q = g * free
    gnorm = q.norm(dim=1).clamp_min(torch.finfo(q.dtype).tiny)
    # Without pairs the first step has unit length, as in L-BFGS-B.
    h0 = torch.where(gamma > 0, gamma, 1.0 / gnorm)
    d = -_two_loop(q, mem_s, mem_y, rho, h0) * free
    # Masking keeps d a descent direction in exact arithmetic; guard against round-off anyway.
    bad = ~((g * d).sum(dim=1) < 0)
    if bad.any():
        d[bad] = -q[bad] / gnorm[bad, None]
    return d


def _two_loop(q: Tensor, mem_s: Tensor, mem_y: Tensor, rho: Tensor, h0: Tensor) -> Tensor:
    """The L-BFGS two-loop recursion for a batch; slot history-1 is the newest pair."""
    q = q.clone()
    history = mem_s.shape[1]
    alpha = torch.zeros_like(rho)
    for i in reversed(range(history)):
        alpha[:, i] = rho[:, i] * (mem_s[:, i] * q).sum(dim=1)
        q -= alpha[:, i, None] * mem_y[:, i]
    r = h0[:, None] * q
    for i in range(history):
        beta = rho[:, i] * (mem_y[:, i] * r).sum(dim=1)
        r += (alpha[:, i] - beta)[:, None] * mem_s[:, i]
    return r


def _projected_armijo(
    fun: BatchObjective,
    rows: Tensor,
    x: Tensor,
    f: Tensor,
    g: Tensor,
    d: Tensor,
    max_steps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backtrack each row from step 1 until f(P(x + a d)) <= f + 1e-4 g.(P(x + a d) - x).

    Returns the accepted points, values, gradients, an accepted mask and evaluations per row.
    """
    n = x.shape[0]
    xt, ft, gt = x.clone(), f.clone(), g.clone()
    ok = torch.zeros(n, dtype=torch.bool, device=x.device)
    evals = torch.zeros(n, dtype=torch.int64, device=x.device)
    step = torch.ones(n, dtype=x.dtype, device=x.device)
    pending = torch.arange(n, device=x.device)
    for _ in range(max_steps):
        trial = (x[pending] + step[pending, None] * d[pending]).clamp(0.0, 1.0)
        f_trial, g_trial = fun(trial, rows[pending])
        evals[pending] += 1
        decrease = (g[pending] * (trial - x[pending])).sum(dim=1)
        accept = torch.isfinite(f_trial) & (f_trial <= f[pending] + 1e-4 * decrease)
        acc = pending[accept]
        xt[acc], ft[acc], gt[acc], ok[acc] = trial[accept], f_trial[accept], g_trial[accept], True
        pending = pending[~accept]
        if pending.numel() == 0:
            break
        step[pending] *= 0.5
    return xt, ft, gt, ok, evals


def _push_pairs(
    mem_s: Tensor,
    mem_y: Tensor,
    rho: Tensor,
    gamma: Tensor,
    rows: Tensor,
    s: Tensor,
    y: Tensor,
    eps: float,
) -> None:
    """Append (s, y) to each row's history, dropping its oldest pair; skip non-convex pairs."""
    sy = (s * y).sum(dim=1)
    yy = (y * y).sum(dim=1)
    keep = sy > eps * yy
    rows, s, y, sy, yy = rows[keep], s[keep], y[keep], sy[keep], yy[keep]
    if rows.numel() == 0:
        return
    mem_s[rows] = torch.cat([mem_s[rows, 1:], s[:, None]], dim=1)
    mem_y[rows] = torch.cat([mem_y[rows, 1:], y[:, None]], dim=1)
    rho[rows] = torch.cat([rho[rows, 1:], (1.0 / sy)[:, None]], dim=1)
    gamma[rows] = sy / yy


# --------------------------------------------------------------------------- objective


class _PenaltyObjective:
    """c * ||z - x||^2 + CE(model(z), target) per row, remembering the closest successful z seen."""

    def __init__(
        self, model: nn.Module, x0: Tensor, target: Tensor, shape: tuple[int, ...], margin: float
    ) -> None:
        self.model, self.x0, self.target, self.shape, self.margin = model, x0, target, shape, margin
        self.c = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
        self.best_sq = torch.full((len(x0),), math.inf, dtype=x0.dtype, device=x0.device)
        self.best_x = x0.clone()

    def __call__(self, z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        z = z.detach().requires_grad_(True)
        logits = self.model(z.view(-1, *self.shape))
        target = self.target[rows]
        sq = ((z - self.x0[rows]) ** 2).sum(dim=1)
        f = self.c[rows] * sq + F.cross_entropy(logits, target, reduction="none")
        (g,) = torch.autograd.grad(f.sum(), z)
        self._remember(rows, z.detach(), sq.detach(), logits.detach(), target)
        return f.detach(), g

    def _remember(
        self, rows: Tensor, z: Tensor, sq: Tensor, logits: Tensor, target: Tensor
    ) -> None:
        closer = reaches_target(logits, target, self.margin) & (sq < self.best_sq[rows])
        if closer.any():
            self.best_sq[rows[closer]] = sq[closer]
            self.best_x[rows[closer]] = z[closer]

    @torch.no_grad()
    def reached(self, z: Tensor, rows: Tensor) -> Tensor:
        """Whether each row's point is classified as its target (by the margin)."""
        return reaches_target(self.model(z.view(-1, *self.shape)), self.target[rows], self.margin)


def reaches_target(logits: Tensor, target: Tensor, margin: float) -> Tensor:
    """True where the target logit beats every other logit by more than margin."""
    own = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], -math.inf).amax(dim=1)
    return own - others > margin


# --------------------------------------------------------------------------- c search

# An inner solver: (objective, rows, params) -> (minimisers (n, D), evaluations (n,)).
InnerSolver = Callable[[_PenaltyObjective, Tensor, SearchParams], tuple[Tensor, Tensor]]


def _search_c(objective: _PenaltyObjective, inner: InnerSolver, p: SearchParams) -> Tensor:
    """Run the per-example c search; the objective keeps the closest success. Returns evals."""
    n, dev = len(objective.x0), objective.x0.device
    c = torch.full((n,), p.c_init, dtype=torch.float64, device=dev)
    lo = torch.zeros(n, dtype=torch.float64, device=dev)  # largest c that reached the target
    hi = torch.full((n,), math.inf, dtype=torch.float64, device=dev)  # smallest c that did not
    evals = torch.zeros(n, dtype=torch.int64, device=dev)
    # An input the model already puts in the target class is its own closest success.
    already = objective.reached(objective.x0, torch.arange(n, device=dev))
    objective.best_sq[already] = 0.0
    searching = ~already
    for _ in range(p.search_steps):
        rows = searching.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        objective.c[rows] = c[rows].to(objective.c.dtype)
        z, n_evals = inner(objective, rows, p)
        evals[rows] += n_evals
        ok = objective.reached(z, rows)
        lo[rows] = torch.where(ok, c[rows], lo[rows])
        hi[rows] = torch.where(ok, hi[rows], c[rows])
        c = _next_c(lo, hi, p.c_factor)
        bracketed = (lo > 0) & (hi <= lo * (1 + p.c_rtol))
        searching &= ~bracketed
    return evals


def _next_c(lo: Tensor, hi: Tensor, factor: float) -> Tensor:
    """Grow c until a failure, shrink it until a success, then bisect in log space."""
    return torch.where(
        torch.isinf(hi), lo * factor, torch.where(lo == 0, hi / factor, (lo * hi).sqrt())
    )


def _torch_inner(
    objective: _PenaltyObjective, rows: Tensor, p: SearchParams
) -> tuple[Tensor, Tensor]:
    """Batched projected L-BFGS over the given rows, each starting from its clean input."""

    def fun(z: Tensor, sub: Tensor) -> tuple[Tensor, Tensor]:
        return objective(z, rows[sub])

    return minimize_box_lbfgs(
        fun,
        objective.x0[rows],
        max_iter=p.max_iter,
        history=p.history,
        ftol=p.ftol,
        gtol=p.gtol,
    )


def _scipy_inner(
    objective: _PenaltyObjective, rows: Tensor, p: SearchParams
) -> tuple[Tensor, Tensor]:
    """scipy's L-BFGS-B one row at a time, each starting from its clean input."""
    dim = objective.x0.shape[1]
    bounds = np.tile([0.0, 1.0], (dim, 1))
    out = objective.x0[rows].clone()
    evals = torch.zeros(len(rows), dtype=torch.int64, device=out.device)
    for k, row in enumerate(rows.tolist()):
        row_t = torch.tensor([row], device=out.device)

        def fun(z: np.ndarray, row_t: Tensor = row_t) -> tuple[float, np.ndarray]:
            zt = torch.as_tensor(z, dtype=out.dtype, device=out.device)[None]
            f, g = objective(zt, row_t)
            return float(f.item()), g[0].double().cpu().numpy()

        z0 = objective.x0[row].double().cpu().numpy()
        z, _, info = fmin_l_bfgs_b(
            fun,
            z0,
            bounds=bounds,
            m=p.history,
            factr=p.ftol / np.finfo(float).eps,
            pgtol=p.gtol,
            maxiter=p.max_iter,
        )
        out[k] = torch.as_tensor(z, dtype=out.dtype, device=out.device)
        evals[k] = info["funcalls"]
    return out, evals


# --------------------------------------------------------------------------- public API


def lbfgs_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    c_init: float = SearchParams.c_init,
    c_factor: float = SearchParams.c_factor,
    search_steps: int = SearchParams.search_steps,
    c_rtol: float = SearchParams.c_rtol,
    max_iter: int = SearchParams.max_iter,
    history: int = SearchParams.history,
    ftol: float = SearchParams.ftol,
    gtol: float = SearchParams.gtol,
    margin: float = SearchParams.margin,
) -> AttackResult:
    """Targeted minimum-distortion L-BFGS attack, batched in torch with per-example state.

    target=None draws a random wrong class per example from `generator` (seed 0 when None);
    num_classes defaults to the model's output width. Unsuccessful examples return x_adv = x.
    The search knobs are described on `SearchParams`; grad_evals counts every objective
    gradient (L-BFGS iterates and line-search trials) over the whole c search.
    """
    params = SearchParams(
        c_init, c_factor, search_steps, c_rtol, max_iter, history, ftol, gtol, margin
    )
    return _run(model, x, y, target, num_classes, generator, params, _torch_inner)


def lbfgs_scipy_reference(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    *,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    c_init: float = SearchParams.c_init,
    c_factor: float = SearchParams.c_factor,
    search_steps: int = SearchParams.search_steps,
    c_rtol: float = SearchParams.c_rtol,
    max_iter: int = SearchParams.max_iter,
    history: int = SearchParams.history,
    ftol: float = SearchParams.ftol,
    gtol: float = SearchParams.gtol,
    margin: float = SearchParams.margin,
) -> AttackResult:
    """The same attack with scipy's fmin_l_bfgs_b run per example: the oracle and a baseline."""
    params = SearchParams(
        c_init, c_factor, search_steps, c_rtol, max_iter, history, ftol, gtol, margin
    )
    return _run(model, x, y, target, num_classes, generator, params, _scipy_inner)


def lbfgs_attack_all_targets(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int | None = None,
    **search: float,
) -> AttackResult:
    """Untargeted minimum distortion: attack every wrong class, keep the closest success.

    All (example, target) pairs run as one batch of B * (K - 1) rows, so memory grows with K.
    The result is untargeted (target -1, success = prediction != label).
    """
    check_inputs(x, y)
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    k = _num_classes(model, x, num_classes)
    check_num_classes(k, y)
    offsets = torch.arange(1, k, device=device)
    targets = (y[None, :] + offsets[:, None]).remainder(k).reshape(-1)  # (K-1)*B, target-major
    rep = lbfgs_attack(
        model,
        x.repeat(k - 1, *[1] * (x.ndim - 1)),
        y.repeat(k - 1),
        targets,
        num_classes=k,
        **search,  # type: ignore[arg-type]
    )
    b = len(x)
    dist = (rep.x_adv - x.repeat(k - 1, *[1] * (x.ndim - 1))).flatten(1).norm(dim=1)
    dist = torch.where(rep.success, dist, torch.full_like(dist, math.inf)).view(k - 1, b)
    best = dist.argmin(dim=0)
    found = torch.isfinite(dist.gather(0, best[None]).squeeze(0))
    pick = best * b + torch.arange(b, device=device)
    x_adv = torch.where(found.view(-1, *[1] * (x.ndim - 1)), rep.x_adv[pick], x)
    evals = rep.grad_evals.view(k - 1, b).sum(dim=0)
    with eval_mode(model):
        return finish(model, x_adv, y, None, evals)


def _num_classes(model: nn.Module, x: Tensor, num_classes: int | None) -> int:
    """num_classes if given, else the model's output width on the first example."""
    if num_classes is not None:
        return int(num_classes)
    with eval_mode(model), torch.no_grad():
        return int(model(x[:1]).shape[1])


def _run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    num_classes: int | None,
    generator: torch.Generator | None,
    params: SearchParams,
    inner: InnerSolver,
) -> AttackResult:
    """Check arguments, pick targets, run the c search, and package the closest successes."""
    params.validate()
    check_inputs(x, y, target)
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    k = _num_classes(model, x, num_classes)
    if target is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        target = random_wrong_targets(y, k, gen)
    else:
        target = target.to(device).long()
    check_num_classes(k, y, target)
    with eval_mode(model):
        objective = _PenaltyObjective(
            model, x.flatten(1), target, tuple(x.shape[1:]), params.margin
        )
        evals = _search_c(objective, inner, params)
        x_adv = objective.best_x.view_as(x)
        return finish(model, x_adv, y, target, evals)
