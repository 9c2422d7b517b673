"""Distortion norms and budget scoring against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from advlab.evaluate import first_correct
from advlab.measure import NORMS, distortions, robust_error, success_at_budgets


def test_distortions_hand_computed() -> None:
    x = torch.zeros(2, 1, 2, 2)
    x_adv = torch.tensor([[[[0.3, 0.4], [0.0, 0.0]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    d = distortions(x, x_adv)
    assert set(d) == set(NORMS)
    torch.testing.assert_close(d["l2"], torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(d["rms"], torch.tensor([0.25, 0.1]))  # sqrt(0.25 / 4), sqrt(0.01)
    torch.testing.assert_close(d["linf"], torch.tensor([0.4, 0.1]))


def test_distortions_sign_and_direction_do_not_matter() -> None:
    x = torch.full((1, 1, 1, 3), 0.5)
    x_adv = torch.tensor([[[[0.2, 0.9, 0.5]]]])
    d, back = distortions(x, x_adv), distortions(x_adv, x)
    torch.testing.assert_close(d["l2"], torch.tensor([0.5]))  # sqrt(0.09 + 0.16)
    torch.testing.assert_close(d["linf"], torch.tensor([0.4]))
    for norm in NORMS:
        torch.testing.assert_close(d[norm], back[norm])


def test_rms_is_l2_over_sqrt_pixels_as_on_mnist() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=gen)
    x_adv = torch.rand(3, 1, 28, 28, generator=gen)
    d = distortions(x, x_adv)
    torch.testing.assert_close(d["l2"], 28 * d["rms"])
    assert (d["linf"] <= d["l2"]).all()


def test_distortions_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="x_adv"):
        distortions(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3))


def test_success_at_budgets_hand_example() -> None:
    success = torch.tensor([True, True, False, True, True])
    distance = torch.tensor([0.1, 0.5, 0.05, math.inf, math.nan])
    got = success_at_budgets(success, distance, [0.0, 0.1, 0.5, 1.0])
    expected = torch.tensor(
        [
            [False, False, False, False, False],
            [True, False, False, False, False],  # 0.1 <= 0.1 counts
            [True, True, False, False, False],  # a failed attack never counts, however close
            [True, True, False, False, False],  # inf and NaN never count
        ]
    )
    assert got.dtype == torch.bool
    assert torch.equal(got, expected)


def test_success_at_budgets_rejects_bad_budgets_and_shapes() -> None:
    ok, dist = torch.tensor([True]), torch.tensor([0.1])
    with pytest.raises(ValueError, match="budgets"):
        success_at_budgets(ok, dist, [0.1, -0.1])
    with pytest.raises(ValueError, match="budgets"):
        success_at_budgets(ok, dist, [math.nan])
    with pytest.raises(ValueError, match="success and distance"):
        success_at_budgets(ok, torch.tensor([0.1, 0.2]), [0.1])


def test_robust_error_counts_clean_mistakes_and_successes() -> None:
    # 4 attacked (correct) examples, 2 clean mistakes met on the way: 6 scanned.
    hits = success_at_budgets(
        torch.tensor([True, False, True, True]), torch.tensor([0.2, 0.0, 0.1, 0.6]), [0.0, 0.3, 1.0]
    )
    # budget 0: only the 2 clean mistakes; 0.3: + examples 0 and 2; 1.0: + example 3.
    assert [robust_error(h, 2) for h in hits] == [2 / 6, 4 / 6, 5 / 6]
    assert robust_error(torch.zeros(0, dtype=torch.bool), 0) is None
    with pytest.raises(ValueError, match="robust_error"):
        robust_error(hits, 2)


class _FixedPredictions(torch.nn.Module):
    """Predicts class x[i, 0, 0, 0] for each example: a model whose mistakes we choose."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * self.scale


def test_first_correct_counts_what_the_scan_met() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    preds = torch.tensor([0, 2, 2, 1, 1, 2, 0])  # wrong at positions 1 and 3
    x = preds.float().view(-1, 1, 1, 1)
    model = _FixedPredictions()
    found = first_correct(model, x, labels, 3)
    # Correct: 0, 2, 4 -> the third is at position 4, so 5 were scanned, 2 of them wrong.
    assert found.dataset_index.tolist() == [0, 2, 4]
    assert (found.n_scanned, found.n_clean_wrong) == (5, 2)
    # Asking for more than exist: the whole set is scanned (5 correct of 7).
    found = first_correct(model, x, labels, 10)
    assert (len(found.y), found.n_scanned, found.n_clean_wrong) == (5, 7, 2)
    # Robust error when every attacked example is fooled: every scanned example is wrong.
    assert robust_error(torch.ones(5, dtype=torch.bool), found.n_clean_wrong) == 1.0
