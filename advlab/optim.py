"""Batched box-constrained L-BFGS: n independent problems over [0,1]^D in one loop.

`minimize_box_lbfgs` is a projected L-BFGS with per-row state: every row has its own curvature
pairs, step size, active set and stopping state, so no row's result depends on the rows batched
with it. A caller may reshape a converged row's objective by a quadratic and let it go on
(`OnConverged`); the L-BFGS attack runs its whole search over a penalty weight as one solve.

Speed: each pass of the loop makes exactly one batched evaluation, of every row's next trial
point: a new direction's unit step for rows whose last trial was accepted, a shorter step for
rows still backtracking. So no row waits for another's line search or solve, and small models,
where an evaluation's fixed cost dominates, need few calls. The state holds only live rows
(`_Batch`); the curvature pairs live in a ring buffer shared by all rows (`_Pairs`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# A function of a batch of flat points and the rows (problems) they belong to
# -> (f (n,), grad (n, D)).
BatchObjective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# Called with the indices of rows whose solve converged, their points and objective values;
# returns which of them go on (bool) and mu: a resumed row's objective gains
# mu/2 * ||x - center||^2.
OnConverged = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def minimize_box_lbfgs(
    fun: BatchObjective,
    x0: Tensor,
    *,
    max_iter: int = 100,
    history: int = 10,
    ftol: float = 1e-6,
    gtol: float = 1e-5,
    max_linesearch: int = 10,
    on_converged: OnConverged | None = None,
    max_evals: int | None = None,
    center: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise n independent problems over [0,1]^D with projected L-BFGS; (x, f, evals).

    x (n, D) are the final points, f (n,) their objective values, evals (n,) the evaluations.

    Every row has its own curvature pairs, step size, active set and stopping state; a row only
    ever touches its own data. The direction is the L-BFGS two-loop product restricted to the
    free variables (those not pinned at a bound by the gradient), which is always a descent
    direction; steps are projected onto the box and accepted by a projected Armijo
    backtracking search.

    A row's solve ends after max_iter iterations, a projected gradient below gtol, a relative
    decrease below ftol, or a line search that fails without curvature pairs. Then
    `on_converged` (if given) may resume it with a reshaped objective f + mu/2 ||x - center||^2
    (for instance a new penalty weight on the distance from `center`, which defaults to the
    start x0; the L-BFGS attack may start elsewhere than at its penalty's centre): the row goes
    on from where it stands and its curvature pairs stay valid after the exact correction
    y += mu * s, so a resumed solve starts with a good Hessian model and no model evaluation.

    max_evals caps each row's evaluations over the whole run (resumes included): a row that
    has spent them ends its solve and is not resumed.
    """
    n = x0.shape[0]
    out = x0.clone()
    f_out = torch.empty(n, device=x0.device, dtype=x0.dtype)
    evals = torch.ones(n, dtype=torch.int64, device=x0.device)
    if n == 0:
        return out, f_out, evals
    f, g = fun(x0, torch.arange(n, device=x0.device))
    b = _Batch(x0, f, g, history, x0 if center is None else center)
    while True:
        b.running &= (_projected_grad_norm(b.x, b.g) > gtol) & (b.iters < max_iter)
        spent = None if max_evals is None else evals[b.rows] >= max_evals
        if spent is not None:
            b.running &= ~spent
        newly = ~b.running & ~b.parked
        if bool(newly.any()):
            done = newly.nonzero().squeeze(1)
            final = None if spent is None else spent[done]
            if b.settle(done, on_converged, out, f_out, final):
                break
            continue  # resumed rows may already satisfy the tests under their new objective
        xt = b.trial_points()
        ft, gt = fun(xt, b.rows)
        evals[b.rows] += ~b.parked
        b.accept_or_back_off(xt, ft, gt, ftol, max_linesearch)
    return out, f_out, evals


class _Batch:
    """The rows `minimize_box_lbfgs` still holds, and their per-row state."""

    def __init__(self, x0: Tensor, f: Tensor, g: Tensor, history: int, center: Tensor) -> None:
        n, dim = x0.shape
        dev = x0.device
        self.x0, self.center = x0, center
        self.rows = torch.arange(n, device=dev)  # indices into x0 and center
        self.x, self.f, self.g = x0.clone(), f, g
        self.d = torch.zeros_like(x0)  # the current search direction
        self.step = torch.ones_like(f)  # the next trial's step along d
        self.iters = torch.zeros(n, dtype=torch.int64, device=dev)  # iterations in this solve
        self.tries = torch.zeros_like(self.iters)  # trials along d so far
        self.fresh = torch.ones(n, dtype=torch.bool, device=dev)  # needs a new direction
        self.on_gradient = torch.ones_like(self.fresh)  # d was computed without pairs
        self.running = torch.isfinite(f)
        self.parked = torch.zeros_like(self.fresh)  # finished, not yet dropped
        self.pairs = _Pairs(n, dim, history, dev, x0.dtype)

    def settle(
        self,
        done: Tensor,
        on_converged: OnConverged | None,
        out: Tensor,
        f_out: Tensor,
        final: Tensor | None = None,
    ) -> bool:
        """Rows `done` ended a solve: resume those `on_converged` sends on, park the rest.

        Rows marked `final` (their evaluations spent) are never resumed. A parked row's point
        and value go to out and f_out. True once every row is parked.
        """
        resume = torch.zeros(len(done), dtype=torch.bool, device=self.x0.device)
        if on_converged is not None:
            resume, mu = on_converged(self.rows[done], self.x[done], self.f[done])
            if final is not None:
                resume = resume & ~final
            self.resume(done[resume], mu[resume].to(self.x0.dtype))
        stop = done[~resume]
        out[self.rows[stop]], f_out[self.rows[stop]] = self.x[stop], self.f[stop]
        self.parked[stop] = True
        n_parked = int(self.parked.sum())
        if n_parked == len(self.rows):
            return True
        # Parked rows ride along in every batched operation until dropped, and dropping
        # copies the curvature pairs: an eighth parked is about break-even.
        if n_parked * 8 >= len(self.rows):
            self.drop_parked()
        return False

    def trial_points(self) -> Tensor:
        """Each row's next trial: a new direction's unit step, or a shorter one along d."""
        fresh = self.fresh
        if bool(fresh.any()):
            d_new = _search_direction(self.x, self.g, self.pairs)
            if not bool(fresh.all()):  # row copies, not a (n, D) torch.where (box_move_bounds)
                stale = (~fresh).nonzero().squeeze(1)
                d_new[stale] = self.d[stale]
            self.d = d_new
            self.on_gradient = torch.where(fresh, ~self.pairs.used.any(dim=1), self.on_gradient)
            self.step = torch.where(fresh, 1.0, self.step)
            self.tries.masked_fill_(fresh, 0)
        if bool(self.parked.any()):  # parked rows stay put (their trial is x)
            self.d.mul_((~self.parked).to(self.d.dtype)[:, None])
        return torch.addcmul(self.x, self.step[:, None], self.d).clamp_(0.0, 1.0)

    def accept_or_back_off(
        self, xt: Tensor, ft: Tensor, gt: Tensor, ftol: float, max_linesearch: int
    ) -> None:
        """Move rows whose trial passes the projected Armijo test; the others back off."""
        s = torch.sub(xt, self.x, out=self.pairs.next_s())  # written into the ring directly
        slope = torch.linalg.vecdot(self.g, s)  # < 0: the projected step's first-order decrease
        rise = ft - self.f
        # Rises within float round-off of f count as none, so a converged row does not
        # backtrack forever (the ftol test then ends its solve).
        noise = 8 * torch.finfo(self.x0.dtype).eps * self.f.abs()
        ok = torch.isfinite(ft) & (rise <= 1e-4 * slope + noise) & ~self.parked
        back_off = ~ok & ~self.parked
        moved = self._moved(s, back_off)  # before push zeroes the rejected rows' s
        self.pairs.push(gt, self.g, ok)
        scale = torch.maximum(torch.maximum(self.f.abs(), ft.abs()), torch.ones_like(ft))
        self.running &= ~(ok & (-rise <= ftol * scale))
        # Rejected rows retry along the same direction at the quadratic model's minimiser. A
        # step too short to move the point in this precision, or too many tries, fails the
        # line search: the row drops its memory and restarts along the gradient, and a row
        # that already was on the gradient cannot make progress, so its solve ends.
        self.tries += back_off
        self.step = torch.where(back_off, _backtrack(self.step, slope, rise), self.step)
        failed = back_off & ((self.tries >= max_linesearch) | ~moved)
        if bool(failed.any()):
            self.running &= ~(failed & self.on_gradient)
            self.pairs.forget(failed)
        self.iters += ok | failed
        self.fresh = ok | failed
        if not bool(ok.all()):  # rejected rows keep their point: copy those rows back
            rejected = (~ok).nonzero().squeeze(1)
            xt[rejected], ft[rejected], gt[rejected] = (
                self.x[rejected],
                self.f[rejected],
                self.g[rejected],
            )
        self.x, self.f, self.g = xt, ft, gt

    @staticmethod
    def _moved(s: Tensor, mask: Tensor) -> Tensor:
        """(n,) bool: whether step s moved the point, computed only where `mask` (the others
        read True): most trials are accepted and need no check."""
        moved = torch.ones_like(mask)
        if bool(mask.any()):
            idx = mask.nonzero().squeeze(1)
            moved[idx] = s[idx].abs().amax(dim=1) > 0
        return moved

    def resume(self, idx: Tensor, mu: Tensor) -> None:
        """Rows idx go on with mu/2 ||x - center||^2 added to their objective."""
        if idx.numel() == 0:
            return
        shift = self.x[idx] - self.center[self.rows[idx]]
        self.f[idx] += 0.5 * mu * sqnorm(shift)
        self.g[idx] += mu[:, None] * shift
        self.pairs.reshape(idx, mu)
        self.iters[idx] = 0
        self.fresh[idx] = True
        self.running[idx] = torch.isfinite(self.f[idx])

    def drop_parked(self) -> None:
        keep = (~self.parked).nonzero().squeeze(1)
        self.rows, self.x, self.f, self.g, self.d = (
            self.rows[keep],
            self.x[keep],
            self.f[keep],
            self.g[keep],
            self.d[keep],
        )
        self.step, self.iters, self.tries = self.step[keep], self.iters[keep], self.tries[keep]
        self.fresh, self.on_gradient = self.fresh[keep], self.on_gradient[keep]
        self.running, self.parked = self.running[keep], self.parked[keep]
        self.pairs.keep(keep)


class _Pairs:
    """Each row's recent curvature pairs (s, y) in a ring buffer, with s.y and y.y.

    Slots are (m, n, D), so each slot's vectors are one contiguous block. The ring's head is
    shared: every loop pass writes a slot for every row, and a row whose trial was rejected
    writes an unused, zeroed one, so a row that backtracked keeps fewer than m pairs. A pair
    is used while s.y > eps y.y.

    A resume (the row's objective gains mu/2 ||x - a||^2) adds mu * s to each of its y; s.y and
    y.y are then recomputed from the vectors (their closed forms cancel badly in float32 when
    mu < 0, as c shrinks).
    """

    def __init__(self, n: int, dim: int, m: int, dev: torch.device, dt: torch.dtype) -> None:
        self.m, self.head = m, 0  # head: the ring slot the next pair goes into
        self.s = torch.zeros(m, n, dim, device=dev, dtype=dt)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.zeros(n, m, device=dev, dtype=dt)
        self.yy = torch.zeros_like(self.sy)
        self.used = torch.zeros(n, m, device=dev, dtype=torch.bool)
        self.eps, self.tiny = torch.finfo(dt).eps, torch.finfo(dt).tiny

    def newest_first(self) -> list[int]:
        return [(self.head - 1 - i) % self.m for i in range(self.m)]

    def next_s(self) -> Tensor:
        """The ring slot this pass's steps s go into (written by the caller before `push`)."""
        return self.s[self.head]

    def push(self, g_new: Tensor, g_old: Tensor, ok: Tensor) -> None:
        """Store this pass's pairs (s already in `next_s`, y = g_new - g_old); rows whose trial
        was rejected store an unused, zero one."""
        h = self.head
        torch.sub(g_new, g_old, out=self.y[h])
        if not bool(ok.all()):  # a rejected trial's gradient may be inf; 0 * inf would be NaN
            rejected = (~ok).nonzero().squeeze(1)
            self.s[h, rejected], self.y[h, rejected] = 0.0, 0.0
        self.sy[:, h] = torch.linalg.vecdot(self.s[h], self.y[h])
        self.yy[:, h] = sqnorm(self.y[h])
        self.used[:, h] = ok & (self.sy[:, h] > self.eps * self.yy[:, h])
        self.head = (h + 1) % self.m

    def gamma(self) -> Tensor:
        """(n,) s.y / y.y of each row's newest used pair (the initial Hessian scale); 0 if none."""
        order = self.newest_first()
        used = self.used[:, order]
        ratio = (self.sy / self.yy.clamp_min(self.tiny))[:, order]
        newest = used.to(torch.int8).argmax(dim=1, keepdim=True)
        return torch.where(used.any(dim=1), ratio.gather(1, newest).squeeze(1), 0.0)

    def forget(self, mask: Tensor) -> None:
        self.used[mask] = False

    def reshape(self, idx: Tensor, mu: Tensor) -> None:
        """Rows idx gain mu/2 ||x - a||^2 in their objective: y += mu * s for their pairs."""
        s = self.s[:, idx]
        y = torch.addcmul(self.y[:, idx], mu[None, :, None], s)
        self.y[:, idx] = y
        self.sy[idx] = torch.linalg.vecdot(s, y).T
        self.yy[idx] = sqnorm(y).T
        self.used[idx] &= self.sy[idx] > self.eps * self.yy[idx]

    def keep(self, idx: Tensor) -> None:
        self.s, self.y = self.s[:, idx], self.y[:, idx]
        self.sy, self.yy, self.used = self.sy[idx], self.yy[idx], self.used[idx]

    def times(self, q: Tensor, h0: Tensor, *, negate: bool = False) -> Tensor:
        """H q (or -H q with `negate`, at no extra pass) by the two-loop recursion, H0 = h0 I;
        unused slots contribute nothing."""
        rho = torch.where(self.used, 1.0 / self.sy.clamp_min(self.tiny), 0.0)
        order = self.newest_first()
        r = q.neg() if negate else q.clone()
        alpha = []
        for i in order:
            a = rho[:, i] * torch.linalg.vecdot(self.s[i], r)
            r.addcmul_(a[:, None], self.y[i], value=-1.0)
            alpha.append(a)
        r.mul_(h0[:, None])
        for i, a in zip(reversed(order), reversed(alpha), strict=True):
            beta = rho[:, i] * torch.linalg.vecdot(self.y[i], r)
            r.addcmul_((a - beta)[:, None], self.s[i])
        return r


def sqnorm(v: Tensor) -> Tensor:
    """Squared L2 norm over the last dimension.

    A fused reduction: vecdot(v, v) multiplies into a temporary first, 3-5x slower on the
    (n, 784) batches of the attacks here (memory-bound).
    """
    return torch.linalg.vector_norm(v, dim=-1).square()


def _projected_grad_norm(x: Tensor, g: Tensor) -> Tensor:
    """Max-norm of the projected gradient x - P(x - g), zero exactly at a box-KKT point."""
    # x - clamp(x - g, 0, 1) = clamp(g, x - 1, x), one pass fewer.
    return torch.clamp(g, min=x - 1, max=x).abs_().amax(dim=1)


def box_move_bounds(
    x: Tensor, *, ascent: bool, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(lo, hi) such that clamp(g, lo, hi) zeroes exactly the coordinates of g that a step from
    x in [0, 1] cannot move: along +g (ascent) at 0 with g < 0 and at 1 with g > 0; along -g
    (descent) the other way round. `out`: two buffers shaped like x to write into.

    Float arithmetic only: on the CPU builds measured here, boolean masks and torch.where over
    (n, D) run 5-15x slower than a float op. The bounds are +-big * x and +-big * (1 - x), 0 on
    the box's faces and beyond any gradient inside (no pixel sits within |g| / 3e38 of a face
    without being on it); two passes, exactly 0 at x == 1 and nonzero for every float below.
    """
    big = torch.finfo(x.dtype).max
    lo, hi = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
    if ascent:
        torch.mul(x, -big, out=lo)
        torch.add(lo, big, out=hi)
    else:
        torch.mul(x, big, out=hi)
        torch.sub(hi, big, out=lo)
    return lo, hi


def free_gradient(x: Tensor, g: Tensor) -> Tensor:
    """g with the coordinates a descent step cannot move zeroed (at 0, g > 0; at 1, g < 0)."""
    lo, hi = box_move_bounds(x, ascent=False)
    return torch.clamp(g, min=lo, max=hi)


def _search_direction(x: Tensor, g: Tensor, pairs: _Pairs) -> Tensor:
    """-H g on the free variables, H the per-row L-BFGS inverse Hessian; zero on pinned ones."""
    # Pinned: at 0 with g > 0, or at 1 with g < 0, i.e. exactly where a unit step against the
    # gradient's sign, clamped to the box, does not move x (g = 0 counts too: harmless).
    q = free_gradient(x, g)
    free = q.sign().abs_()  # 1 on free coordinates, 0 on pinned ones
    gnorm = q.norm(dim=1).clamp_min(torch.finfo(q.dtype).tiny)
    # Without pairs the first step has unit length, as in L-BFGS-B.
    gamma = pairs.gamma()
    h0 = torch.where(gamma > 0, gamma, 1.0 / gnorm)
    d = pairs.times(q, h0, negate=True).mul_(free)
    # Masking keeps d a descent direction in exact arithmetic; guard against round-off anyway.
    bad = ~(torch.linalg.vecdot(g, d) < 0)
    if bool(bad.any()):
        d = torch.where(bad[:, None], -q / gnorm[:, None], d)
    return d


def _backtrack(step: Tensor, slope: Tensor, rise: Tensor) -> Tensor:
    """Next step after a failed trial: the quadratic model's minimiser, in [0.1, 0.5] * step.

    slope is g.(trial - x) (negative) and rise f(trial) - f; the model q(t) = f + slope t +
    (rise - slope) t^2 over t = a / step has its minimum at t = -slope / (2 (rise - slope)).
    """
    curvature = (rise - slope).clamp_min(torch.finfo(step.dtype).tiny)
    t = torch.nan_to_num(-slope / (2 * curvature), nan=0.1, posinf=0.5, neginf=0.1)
    return step * t.clamp(0.1, 0.5)
