"""The batched box-constrained L-BFGS of advlab/optim.py (against scipy's L-BFGS-B and known
minima), its curvature pairs, and the box masks the gradient attacks share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import fmin_l_bfgs_b
from torch import Tensor

from advlab.optim import _Pairs, box_move_bounds, free_gradient, minimize_box_lbfgs


def test_minimize_box_lbfgs_solves_a_box_constrained_quadratic() -> None:
    # Independent problems f_i(z) = (z - m_i)' A_i (z - m_i) with minimisers partly outside the
    # box; compared to scipy's L-BFGS-B on each row (the box makes the answer non-trivial).
    gen = torch.Generator().manual_seed(0)
    n, dim = 5, 12
    q = torch.randn(n, dim, dim, generator=gen, dtype=torch.float64)
    a = q @ q.transpose(1, 2) / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    a[0] = torch.diag(torch.linspace(0.5, 5.0, dim, dtype=torch.float64))  # separable row
    m = 1.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + 0.5

    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        r = z - m[rows]
        ar = (a[rows] @ r[:, :, None]).squeeze(2)
        return (r * ar).sum(1), 2 * ar

    z, _, evals = minimize_box_lbfgs(
        fun, torch.full((n, dim), 0.5, dtype=torch.float64), gtol=1e-9, ftol=1e-14, max_iter=200
    )
    torch.testing.assert_close(z[0], m[0].clamp(0, 1), atol=1e-6, rtol=0)
    for i in range(n):
        ref, _, _ = fmin_l_bfgs_b(
            lambda v, i=i: tuple(
                t[0].numpy() for t in fun(torch.tensor(v)[None], torch.tensor([i]))
            ),
            np.full(dim, 0.5),
            bounds=[(0, 1)] * dim,
            pgtol=1e-10,
            factr=10,
        )
        np.testing.assert_allclose(z[i].numpy(), ref, atol=1e-5)
    assert (evals > 1).all()


def test_minimize_box_lbfgs_restarts_after_a_failed_line_search() -> None:
    # Ten evaluations in a row come back inf, so the line search fails with pairs in memory:
    # the row must drop them and go on along the gradient (not stop as if it had none), even
    # with fewer ring slots (history 3) than line-search tries.
    w = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    target = torch.full((4,), 0.7, dtype=torch.float64)
    calls = [0]

    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        f = ((z - target) ** 2 * w).sum(1)
        if 4 <= calls[0] < 14:
            f = torch.full_like(f, float("inf"))
        return f, 2 * (z - target) * w

    x0 = torch.full((1, 4), 0.1, dtype=torch.float64)
    z, f, _ = minimize_box_lbfgs(fun, x0, history=3, gtol=1e-10, ftol=1e-15)
    torch.testing.assert_close(z[0], target, atol=1e-6, rtol=0)
    assert float(f) < 1e-10


def test_resumed_pairs_keep_their_curvature_through_shrinking_c() -> None:
    # The attack shrinks c by 10x per failed solve; each resume adds mu * s to the stored y
    # (mu = 2 (c' - c) < 0). In float32 the updated s.y and y.y must still match the pair a
    # float64 computation would hold at the new c, down to c = 1e-3 (a closed-form update of
    # y.y cancels to the wrong sign there).
    gen = torch.Generator().manual_seed(0)
    s64 = 1e-2 * torch.randn(1, 784, generator=gen, dtype=torch.float64)
    pairs = _Pairs(1, 784, 5, torch.device("cpu"), torch.float32)
    c = 100.0
    pairs.next_s().copy_(s64.float())  # the step; push stores y = g_new - g_old beside it
    pairs.push((2 * c * s64).float(), torch.zeros(1, 784), torch.tensor([True]))
    for c_new in (10.0, 1.0, 0.1, 0.01, 0.001):
        pairs.reshape(torch.tensor([0]), torch.tensor([2 * (c_new - c)]))
        c = c_new
        y = 2 * c * s64
        exact_gamma = float((s64 * y).sum() / (y * y).sum())
        assert bool(pairs.used[0, 0])
        assert float(pairs.gamma()[0]) == pytest.approx(exact_gamma, rel=1e-3)


def test_minimize_box_lbfgs_takes_an_empty_batch() -> None:
    def fun(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        return (z**2).sum(1), 2 * z

    z, f, evals = minimize_box_lbfgs(fun, torch.zeros(0, 3))
    assert z.shape == (0, 3) and f.shape == (0,) and evals.shape == (0,)


def test_box_pinned_gradient_coordinates_are_zeroed_and_no_others() -> None:
    """FMN's ascent and L-BFGS's descent drop exactly the coordinates a step cannot move."""
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    z = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5, 1e-7, below_one, 1e-30]])
    g = torch.tensor([[-2.0, 3.0, 4.0, -5.0, -6.0, -7.0, 8.0, -9.0]])
    up = g.clone().clamp_(*box_move_bounds(z, ascent=True))
    # Ascent: down from 0 and up from 1 are blocked; every interior pixel keeps its gradient.
    assert up.tolist() == [[0.0, 3.0, 0.0, -5.0, -6.0, -7.0, 8.0, -9.0]]
    down = free_gradient(z, g)  # descent steps along -g: g > 0 at 0 and g < 0 at 1 blocked
    assert down.tolist() == [[-2.0, 0.0, 4.0, 0.0, -6.0, -7.0, 8.0, -9.0]]
