"""Szegedy et al. (2014, section 4.1) box-constrained L-BFGS minimum-distortion attack.

The paper's problem: minimise ||r||_2 s.t. f(x + r) = l and x + r in [0,1]^m. It is approximated
by a penalty: for a weight c > 0,

    minimise  c * ||r||_2^2 + loss(f(x + r), l)   over x + r in [0,1]^m,

and a per-example search over c keeps the closest image classified as l.

Losses (`loss=`):
- "ce" (default, the paper's): cross-entropy to the target. It keeps pushing against every other
  class, not only the nearest, so even fully converged it lands a little (~1-2% on 10-class linear
  models) beyond the closest point of the target region.
- "margin": sum over the other classes j of max(z_j - z_l + kappa, 0)^2 (a squared hinge per
  competitor, zero once the target leads j by kappa). For a linear model every term is a convex
  quadratic on its half-space, the solve is a box-constrained piecewise-quadratic problem, and
  as c shrinks its minimiser tends to the exact projection onto {z_l >= z_j + kappa for all j}:
  the c search then solves the known-answer QP. Squared (not plain) hinges keep the objective
  smooth for quasi-Newton steps; one hinge per competitor (not max_j) keeps it smooth where two
  competitors tie, which is exactly where the closest point often lies.
Untargeted (`target="untargeted"`) uses "avoid class y" versions: -log(1 - p_y) for "ce" and
max(z_y - max_{j!=y} z_j + kappa, 0)^2 for "margin".

Choices (the paper gives none of these):
- Squared L2 penalty rather than c * |r|: smooth at r = 0 (the starting point), so quasi-Newton
  curvature pairs stay meaningful. For a convex loss both penalties trace the same set of
  minimisers as c varies (each solves min loss s.t. ||r|| <= rho for some rho), only c is
  relabelled.
- c search per example: start at c_init; while no bracket exists multiply (success) or divide
  (failure) c by c_factor; then bisect geometrically between the largest successful c (lo) and
  the smallest failing c (hi). Larger c gives smaller r. An example stops once the bracket is
  within c_rtol, once a success moves its minimiser's distance by less than dist_rtol (the answer
  no longer moves, whatever c does), or after search_steps solves. c_init defaults to 1 for
  "ce" and 100 for "margin" (`initial_c`).
- Warm start, one run: the whole search is one batched L-BFGS run. When an example's solve for
  one c ends it picks its next c and goes on from where it stands, keeping its curvature pairs
  (corrected exactly for the new c), so no example waits for slower ones and a new solve starts
  with a good Hessian model; this cuts the evaluations several-fold. warm_start=False starts
  every solve from the clean input, as the paper's description reads.
- target="all": the example's far targets stop early once they cannot beat its closest success
  (`CSearch._outrun`).
- "Success" during the search needs the target logit to beat every other logit by `margin`, so a
  kept image cannot flip class under the floating-point noise of a different batch size.
- Kept image: the closest successful point evaluated anywhere in the search (every L-BFGS iterate
  and line-search trial, not only each c's minimiser); it is never farther than the paper's choice.
- Refinement (`refine_steps`, default 20 forward passes, no gradients): bisect the kept point back
  toward x along its own direction, keeping it adversarial. It removes what the search's
  tolerances (c_rtol, dist_rtol, kappa) leave past the boundary; it can only shorten r.

Two solvers share the objective (`PenaltyObjective`) and the c search (`CSearch`):
- `lbfgs_attack`: the batched projected L-BFGS of `advlab.optim` with per-example state (c,
  bracket, curvature pairs, line-search step, active set), so no example's result depends on its
  batch-mates.
- `lbfgs_scipy_reference` (`advlab.attacks.lbfgs_reference`): scipy's fmin_l_bfgs_b, one example
  at a time; the test oracle and the speed baseline (the way Foolbox <= 2.4 ran this attack).
Both take their knobs as one `LBFGSSettings`, with keyword overrides of its fields
(`lbfgs_settings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    Settings,
    Target,
    adversarial_margin,
    finish,
    merged_settings,
    prepare,
    run_targets,
    shrink_toward_input,
)
from advlab.optim import minimize_box_lbfgs, sqnorm
from advlab.runtime import chunk_rows, input_gradient

Loss = Literal["ce", "margin"]


class LBFGSSettings(Settings):
    """The c search's knobs, shared by the torch attack and the scipy reference.

    Pass one as `settings=`, or name fields as keywords (`loss="margin"`), or both: keywords
    replace the settings' fields (`lbfgs_settings`, which also fills in the loss's defaults).
    """

    c_init: float | None = Field(None, gt=0)  # first penalty weight; None: the loss's (`initial_c`)
    c_factor: float = Field(10.0, gt=1)  # multiply/divide c by this until a bracket exists
    search_steps: int = Field(12, ge=1)  # inner solves per example (bracketing + bisection)
    c_rtol: float = Field(1e-3, ge=0)  # stop an example's search once hi / lo <= 1 + c_rtol
    dist_rtol: float = Field(1e-3, ge=0)  # ... or once a success shrinks its best L2 by less
    max_iter: int | None = Field(None, ge=1)  # L-BFGS iterations per inner solve; None: the
    # loss's default (100 for "ce", 10 for "margin": see `defaults`)
    history: int | None = Field(None, ge=1)  # curvature pairs kept (scipy's m); None: 5 for
    # "ce", 3 for "margin" (the two-loop product, memory-bound, is most of an FC net's time)
    ftol: float = Field(1e-6, gt=0)  # stop when the objective's relative decrease is below this
    gtol: float = Field(1e-5, gt=0)  # stop when the projected gradient's max-norm is below this
    margin: float = Field(1e-5, ge=0)  # logit margin that counts as reaching the target
    loss: Loss = "ce"  # "ce" (the paper's) or "margin" (exact on linear models); see module doc
    kappa: float = Field(1e-3, ge=0)  # the margin loss's hinge offset, in logits
    warm_start: bool = True  # start each c's solve from the previous minimiser
    refine_steps: int = Field(20, ge=0)  # bisections of the final point back toward x (0: none)
    max_evals: int | None = Field(None, ge=1)  # cap on each row's gradient evaluations
    candidates: int | None = Field(None, ge=1)  # target "all": only the k nearest classes

    def resolved(self) -> LBFGSSettings:
        """These settings with max_iter and history, where None, set to the loss's defaults."""
        unset = {k: v for k, v in defaults(self.loss).items() if getattr(self, k) is None}
        return self.model_copy(update=unset) if unset else self


# --------------------------------------------------------------------------- objective


def penalty_loss(logits: Tensor, cls: Tensor, targeted: bool, loss: str, kappa: float) -> Tensor:
    """(n,) the loss term of the penalty objective (see module doc); zero-floored for margin."""
    if loss == "ce":
        if targeted:
            return F.cross_entropy(logits, cls, reduction="none")
        # -log(1 - p_y) = logsumexp(all) - logsumexp(all but y): "any class but y".
        others = logits.scatter(1, cls[:, None], -math.inf)
        return torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)
    own = logits.gather(1, cls[:, None])
    if targeted:
        hinge = (logits - own + kappa).clamp_min(0.0).scatter(1, cls[:, None], 0.0)
        return hinge.square().sum(dim=1)
    best_other = logits.scatter(1, cls[:, None], -math.inf).amax(dim=1)
    return (own.squeeze(1) - best_other + kappa).clamp_min(0.0).square()


class PenaltyObjective:
    """c * ||z - x||^2 + loss(model(z)) per row, remembering the closest successful z seen."""

    def __init__(
        self,
        model: nn.Module,
        x0: Tensor,
        y: Tensor,
        target: Tensor | None,
        shape: tuple[int, ...],
        settings: LBFGSSettings,
        start: Tensor | None = None,
    ) -> None:
        self.model, self.x0, self.y, self.target, self.shape = model, x0, y, target, shape
        # Where every search begins (`lbfgs_attack`'s start=); the penalty stays centred on x0.
        self.started = start is not None
        self.start = x0 if start is None else start
        self.cls = y if target is None else target
        self.settings = settings
        self.c = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
        self.best_sq = torch.full((len(x0),), math.inf, dtype=x0.dtype, device=x0.device)
        self.best_x = x0.clone()
        # Rows that attack the same example (target="all"): example index per row, else None.
        self.groups: Tensor | None = None
        self.chunk = chunk_rows(model, x0[:1].view(-1, *shape))

    def __call__(self, z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(f, g) at the points z of `rows`, the model evaluated `self.chunk` rows at a time."""
        z, p, cls = z.detach(), self.settings, self.cls[rows]

        def penalty_term(leaf: Tensor, part: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
            logits = self.model(leaf.view(-1, *self.shape))
            term = penalty_loss(logits, cls[part], self.target is not None, p.loss, p.kappa)
            return term, (term, logits)

        g, (term, logits) = input_gradient(penalty_term, z, self.chunk)
        # The penalty's gradient is closed-form: no need to push it through autograd.
        diff = z - self.x0[rows]
        sq = sqnorm(diff)
        g.addcmul_(diff, (2 * self.c[rows])[:, None])
        f = self.c[rows] * sq + term
        self._remember(rows, z, sq, logits)
        return f, g

    def _chunks(self, z: Tensor, rows: Tensor) -> zip[tuple[Tensor, Tensor]]:
        return zip(z.split(self.chunk), rows.split(self.chunk), strict=True)

    def _margin(self, logits: Tensor, rows: Tensor) -> Tensor:
        target = None if self.target is None else self.target[rows]
        return adversarial_margin(logits, self.y[rows], target)

    def _remember(self, rows: Tensor, z: Tensor, sq: Tensor, logits: Tensor) -> None:
        closer = (self._margin(logits, rows) > self.settings.margin) & (sq < self.best_sq[rows])
        if bool(closer.any()):
            self.best_sq[rows[closer]] = sq[closer]
            self.best_x[rows[closer]] = z[closer]

    @torch.no_grad()
    def margin_at(self, z: Tensor, rows: Tensor) -> Tensor:
        """(n,) how far each row's point is inside its adversarial region, in logits."""
        return torch.cat(
            [
                self._margin(self.model(zc.view(-1, *self.shape)), rc)
                for zc, rc in self._chunks(z, rows)
            ]
        )


# --------------------------------------------------------------------------- c search

# A c search: (objective, settings) -> evaluations per example; the objective keeps the best points.
Search = Callable[[PenaltyObjective, LBFGSSettings], Tensor]


class CSearch:
    """Per-example state of the search over c; shared by the torch and the scipy solvers."""

    def __init__(self, objective: PenaltyObjective, p: LBFGSSettings) -> None:
        n, dev = len(objective.x0), objective.x0.device
        self.objective, self.p = objective, p
        self.c = initial_c(objective, p)
        self.lo = torch.zeros(n, dtype=torch.float64, device=dev)  # largest c that succeeded
        self.hi = torch.full((n,), math.inf, dtype=torch.float64, device=dev)  # smallest failed
        self.steps = torch.zeros(n, dtype=torch.int64, device=dev)
        self.before = torch.full((n,), math.inf, dtype=objective.x0.dtype, device=dev)
        # An input the model already puts in the target class is its own closest success.
        rows = torch.arange(n, device=dev)
        self.active = ~(objective.margin_at(objective.x0, rows) > p.margin)
        objective.best_sq[~self.active] = 0.0
        objective.c.copy_(self.c.to(objective.c.dtype))

    def solved(self, rows: Tensor, z: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """Record solves of `rows` ending at z with objective f; (rows going on, change in c)."""
        p, obj = self.p, self.objective
        ok = obj.margin_at(z, rows) > p.margin
        c = self.c[rows]
        lo = torch.where(ok, c, self.lo[rows])
        hi = torch.where(ok, self.hi[rows], c)
        self.lo[rows], self.hi[rows] = lo, hi
        self.steps[rows] += 1
        # Stalled: this success's minimiser is barely closer than the previous success's. (Not
        # the kept best: a transient iterate can beat every minimiser, and the next c's
        # minimiser may still move well past it.)
        diff = z - obj.x0[rows]
        sq = sqnorm(diff)
        before = self.before[rows]
        self.before[rows] = torch.where(ok, sq, before)
        # Squared distances: a relative L2 change of dist_rtol is about twice that in squares.
        stalled = ok & torch.isfinite(before) & ((before - sq).abs() <= 2 * p.dist_rtol * before)
        bracketed = (lo > 0) & (hi <= lo * (1 + p.c_rtol))
        go_on = ~(stalled | bracketed | (self.steps[rows] >= p.search_steps))
        if obj.groups is not None:
            go_on &= ~self._outrun(rows, lo, self._bound(rows, sq, f))
        c_next = _next_c(lo, hi, p.c_factor)
        self.c[rows] = torch.where(go_on, c_next, c)
        obj.c[rows] = self.c[rows].to(obj.c.dtype)
        self.active[rows] = go_on
        return go_on, 2 * (self.c[rows] - c)

    def _bound(self, rows: Tensor, sq: Tensor, f: Tensor) -> Tensor:
        """A lower bound on the squared distance from x to the row's target region.

        The margin loss is 0 where the target leads every other class by kappa, so every point
        r there has objective c ||r - x||^2, never below the minimum f: ||r - x||^2 >= f / c,
        the failing minimiser's own squared distance plus loss / c (far tighter than the
        distance alone while c is large). Exact for a convex loss up to the solve's tolerance
        (f is the value where the solve stopped) and kappa (success needs a lead of `margin`,
        not kappa: a slack of order kappa / ||grad||); on a non-linear net it holds for the
        local minimiser found. Cross-entropy is never 0, so for it the bound is the minimiser's
        squared distance.
        """
        if self.p.loss != "margin":
            return sq
        return f / self.objective.c[rows]

    def _outrun(self, rows: Tensor, lo: Tensor, bound: Tensor) -> Tensor:
        """Rows (target="all") that cannot beat another target of their own example.

        `bound` is a lower bound on the squared distance to the row's target region (`_bound`).
        Once a row that has never succeeded has a bound as large as the closest success of its
        example's other targets, it stops: the far targets of an example drop out after a
        solve or two instead of running the whole search. Rows of other examples play no part.
        """
        obj = self.objective
        groups = obj.groups
        assert groups is not None
        n_groups = int(groups.max()) + 1
        best = torch.full((n_groups,), math.inf, dtype=obj.best_sq.dtype, device=groups.device)
        best = best.scatter_reduce(0, groups, obj.best_sq, reduce="amin")
        return (lo == 0) & (bound >= best[groups[rows]])


def initial_c(objective: PenaltyObjective, p: LBFGSSettings) -> Tensor:
    """(n,) float64 first penalty weight per example: c_init, or the loss's default for None.

    The defaults: 1 for "ce" (the earlier fixed value) and 100 for "margin". Starting the margin
    search at a large c (tiny steps) and shrinking it follows the path of minimisers out from
    x, which on non-linear nets ends at a nearer boundary than starting mid-way: on a
    Fashion-MNIST fc100-100-10, untargeted mean L2 0.835 from c=100 against 0.846 from c=1, at
    the same cost. (A per-example start at the linearised crossing c was tried and was worse.)
    A search started elsewhere (start=, usually another attack's adversarial point) begins at
    10: from c=100 the first solve walks back toward x, across the boundary the start already
    sits beyond (Fashion-MNIST CNN, 100 images from DDN-50's points: 49 evaluations against 60,
    mean L2 0.7156 against 0.7169).
    """
    n, dev = len(objective.x0), objective.x0.device
    c = p.c_init if p.c_init is not None else (1.0 if p.loss == "ce" else 100.0)
    first = torch.full((n,), float(c), dtype=torch.float64, device=dev)
    if p.c_init is None and p.loss == "margin" and objective.started:
        # Only rows whose start moved: where the start attack failed its point is x itself.
        moved = (objective.start != objective.x0).any(1)
        first[moved] = 10.0
    return first


def _next_c(lo: Tensor, hi: Tensor, factor: float) -> Tensor:
    """Grow c until a failure, shrink it until a success, then bisect in log space."""
    return torch.where(
        torch.isinf(hi), lo * factor, torch.where(lo == 0, hi / factor, (lo * hi).sqrt())
    )


def _torch_search(objective: PenaltyObjective, p: LBFGSSettings) -> Tensor:
    """The whole c search as one batched L-BFGS run; returns evals per example.

    When an example's solve for one c ends, the search picks its next c and the same run goes on
    from there (warm start, curvature pairs kept), so no example waits for slower ones.
    """
    search = CSearch(objective, p)
    rows = search.active.nonzero().squeeze(1)
    evals = torch.zeros(len(objective.x0), dtype=torch.int64, device=objective.x0.device)
    if rows.numel() == 0:
        return evals

    def fun(z: Tensor, sub: Tensor) -> tuple[Tensor, Tensor]:
        return objective(z, rows[sub])

    def on_converged(sub: Tensor, z: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        return search.solved(rows[sub], z, f)

    _, _, evals[rows] = minimize_box_lbfgs(
        fun,
        objective.start[rows],
        max_iter=p.max_iter,
        history=p.history,
        ftol=p.ftol,
        gtol=p.gtol,
        on_converged=on_converged,
        max_evals=p.max_evals,
        center=objective.x0[rows],
    )
    return evals


def _torch_search_cold(objective: PenaltyObjective, p: LBFGSSettings) -> Tensor:
    """The c search with every solve started afresh (warm_start=False), from x or start=."""
    search = CSearch(objective, p)
    evals = torch.zeros(len(objective.x0), dtype=torch.int64, device=objective.x0.device)
    while bool(search.active.any()):
        rows = search.active.nonzero().squeeze(1)

        def fun(z: Tensor, sub: Tensor, rows: Tensor = rows) -> tuple[Tensor, Tensor]:
            return objective(z, rows[sub])

        z, f, n_evals = minimize_box_lbfgs(
            fun, objective.start[rows], max_iter=p.max_iter, history=p.history, ftol=p.ftol,
            gtol=p.gtol, center=objective.x0[rows],
        )  # fmt: skip
        evals[rows] += n_evals
        search.solved(rows, z, f)
        if p.max_evals is not None:  # no new solve once the budget is spent
            search.active &= evals < p.max_evals
    return evals


# --------------------------------------------------------------------------- public API


def lbfgs_attack(
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
    """Minimum-distortion L-BFGS attack, batched in torch with per-example state.

    target: a (B,) tensor of classes; None or "random" draws a random wrong class per example
    from `generator` (seed 0 when None; the paper's setting); "untargeted" looks for any wrong
    class in one run; "all" attacks every wrong class and keeps the closest success (the
    untargeted minimum distortion, K-1 times the work; `candidates=k` attacks only the k classes
    whose linearised boundary is nearest, see `closest_over_targets`). num_classes defaults to
    the model's output width. Unsuccessful examples return x_adv = x. The search's knobs are
    `settings` (LBFGSSettings() when None) with any of its fields replaced by keyword, e.g.
    `loss="margin", search_steps=6`; loss "ce" is the paper's, "margin" reaches the exact
    minimum on linear models (module doc). grad_evals counts every objective gradient
    (L-BFGS iterates, line-search trials) over the whole c search.

    start: points (shaped like x, in the box) every search begins from instead of x, usually
    another attack's adversarial points (a sweep file's `start: ddn`); the penalty still
    measures the distance from x. On a non-linear net the c search from x follows the path of
    minimisers out of x to the first region it meets; from a minimum-norm attack's point it
    refines the (often closer) region that attack reached, and a start the target already
    holds is never returned farther away (under "all" with candidates=k, only when the start's
    class is among the k searched). See docs/attacks.md for what it buys.
    """
    s = lbfgs_settings(settings, overrides)
    search = _torch_search if s.warm_start else _torch_search_cold
    x, y, resolved, k = prepare(
        model, x, y, target, num_classes=num_classes, generator=generator, default="random"
    )
    start = check_start(x, start)
    return run_c_search(model, x, y, resolved, k, s, search, start)


def check_start(x: Tensor, start: Tensor | None) -> Tensor | None:
    """start on x's device and dtype; AttackError unless it is a finite batch like x in [0,1]."""
    if start is None:
        return None
    if not isinstance(start, Tensor) or start.shape != x.shape:
        got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise AttackError(f"start: expected points shaped like x {tuple(x.shape)}, got {got}")
    start = start.detach().to(device=x.device, dtype=x.dtype)
    if not torch.isfinite(start).all() or (start.numel() and (start.min() < 0 or start.max() > 1)):
        raise AttackError("start: needs finite pixels in [0, 1]; pass an attack's x_adv")
    return start


def lbfgs_settings(settings: LBFGSSettings | None, overrides: Mapping[str, Any]) -> LBFGSSettings:
    """`settings` with `overrides` replacing fields, validated, and the loss's defaults filled
    in (`LBFGSSettings.resolved`): what the torch attack and the scipy reference run on."""
    return merged_settings(LBFGSSettings, settings, overrides, "lbfgs").resolved()


def defaults(loss: str) -> dict[str, int]:
    """The loss's defaults for the settings left None: max_iter and history.

    "ce" keeps the paper-table settings (100 iterations per solve, 5 pairs). For "margin":
    10 iterations per solve: the search is warm-started, so a solve for one c need not
    converge (the next c's solve goes on from where it stopped), and the early, failing solves
    at large c converge slowly and cost most of the search when run to 100 iterations: the
    Fashion-MNIST CNN's 3-nearest search takes 143 gradient evaluations per example instead of
    509, for a mean L2 0.6% larger (FC nets: 0.04%). And 3 curvature pairs: the two-loop
    product is memory-bound and most of an FC net's wall time; 3 pairs cost the same
    evaluations as 5 there (102 vs 104 per example on fc100-100-10) and ~13% less time.
    """
    if loss == "ce":
        return {"max_iter": 100, "history": 5}
    return {"max_iter": 10, "history": 3}


def run_c_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    resolved: Tensor | str | None,
    num_classes: int,
    settings: LBFGSSettings,
    search: Search,
    start: Tensor | None = None,
) -> AttackResult:
    """Run the c search for a target `prepare` resolved and package the closest successes."""

    def tiled(xs: Tensor) -> Tensor | None:
        # target="all" repeats the batch target-major; each copy starts where its example does.
        copies = len(xs) // max(len(x), 1)
        return None if start is None else start.repeat(copies, *[1] * (x.ndim - 1))

    return run_targets(
        model,
        x,
        y,
        resolved,
        num_classes,
        lambda xs, ys, ts: _attack(model, xs, ys, ts, settings, search, start=start),
        candidates=settings.candidates,
        attack_all=lambda xs, ys, ts: _attack(
            model, xs, ys, ts, settings, search, groups=len(x), start=tiled(xs)
        ),
    )


def _attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    settings: LBFGSSettings,
    search: Search,
    groups: int | None = None,
    start: Tensor | None = None,
) -> AttackResult:
    """One c search over the batch (targeted, or untargeted when target is None).

    groups=b: the batch is b examples repeated target-major (row r attacks example r % b), so
    an example's far targets may stop early (`CSearch._outrun`). start: each row's first point.
    """
    flat = None if start is None else start.flatten(1)
    shape = tuple(x.shape[1:])
    objective = PenaltyObjective(model, x.flatten(1), y, target, shape, settings, flat)
    if groups is not None:
        objective.groups = torch.arange(len(x), device=x.device).remainder(groups)
    evals = search(objective, settings)
    x_adv = objective.best_x.view_as(x).clone()
    rows = _worth_refining(objective)
    t = None if target is None else target[rows]
    x_adv[rows] = shrink_toward_input(
        model, x[rows], x_adv[rows], y[rows], t, settings.refine_steps, settings.margin
    )
    return finish(model, x_adv, y, target, evals)


def _worth_refining(objective: PenaltyObjective) -> Tensor:
    """Rows whose kept point the final bisection should shorten.

    Every row, except under target="all": there only rows whose closest success is within 2%
    of their example's closest over all its targets (refinement removes what the search's
    tolerances leave, a fraction of a percent, so a target farther than that cannot win).
    """
    n = len(objective.best_sq)
    groups = objective.groups
    if groups is None:
        return torch.arange(n, device=objective.best_sq.device)
    sq = objective.best_sq
    best = torch.full((int(groups.max()) + 1,), math.inf, dtype=sq.dtype, device=sq.device)
    best = best.scatter_reduce(0, groups, sq, reduce="amin")
    return (torch.isfinite(sq) & (sq <= best[groups] * 1.02**2)).nonzero().squeeze(1)
