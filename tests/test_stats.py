"""advlab.stats: the one home of estimates. Intervals are checked against an exact bootstrap
enumerated here (every resample and its probability), not against the module's own sampling."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from advlab.stats import LEVEL, METHOD, RATE_METHOD, RESAMPLES, aggregate, estimate


def exact_bootstrap_quantiles(values: list[float], q: float) -> float:
    """The q-quantile (inverted CDF) of the mean over all n^n equally likely resamples."""
    n = len(values)
    picks = itertools.product(range(n), repeat=n)
    means = Counter(round(sum(values[i] for i in pick) / n, 12) for pick in picks)
    total, seen = n**n, 0
    for mean in sorted(means):
        seen += means[mean]
        if seen / total >= q:
            return mean
    raise AssertionError("unreachable")


def test_two_seeds_give_their_own_range_where_student_t_left_0_1() -> None:
    # The case: two seeds of an error rate far apart. Student's t gives a lower bound
    # below 0 and an upper one above 1; the bootstrap gives exactly the two values.
    errors = [0.05, 0.9]
    half = scipy_stats.t.ppf(0.975, 1) * np.std(errors, ddof=1) / math.sqrt(2)
    assert np.mean(errors) - half < 0 and np.mean(errors) + half > 1  # what it was
    found = estimate(errors)
    assert (found.mean, found.lo, found.hi, found.n) == (pytest.approx(0.475), 0.05, 0.9, 2)
    assert found.values == (0.05, 0.9)
    assert METHOD == "95% percentile bootstrap over seeds" and LEVEL == 0.95


def test_one_seed_has_no_interval_and_nulls_are_left_out() -> None:
    found = estimate([0.25, None, math.nan, "x"])
    assert found.mean == 0.25 and found.n == 1 and found.values == (0.25,)
    assert math.isnan(found.lo) and math.isnan(found.hi)
    assert estimate([]).n == 0
    same = estimate([0.3, 0.3, 0.3])
    assert (same.lo, same.hi) == (0.3, 0.3)


@pytest.mark.parametrize(
    "values",
    [[0.1, 0.12, 0.5], [0.0, 0.0, 0.0, 1.0], [0.02, 0.04, 0.05, 0.3, 0.31], [2.0, 3.5, 3.0, 9.0]],
)
def test_interval_matches_the_exact_bootstrap(values: list[float]) -> None:
    found = estimate(values)
    # 4000 resamples estimate each tail's quantile; the exact one lies within a narrow band.
    assert exact_bootstrap_quantiles(values, 0.015) <= found.lo + 1e-12
    assert found.lo <= exact_bootstrap_quantiles(values, 0.035) + 1e-12
    assert exact_bootstrap_quantiles(values, 0.965) <= found.hi + 1e-12
    assert found.hi <= exact_bootstrap_quantiles(values, 0.985) + 1e-12
    assert estimate(values) == found  # a fixed generator: the same values, the same interval


def test_three_seeds_bounds_are_the_extremes() -> None:
    # Of 27 resamples one is all-minimum (3.7% > 2.5%): both ends are the extreme seeds.
    found = estimate([0.2, 0.25, 0.6])
    assert (found.lo, found.hi) == (pytest.approx(0.2, abs=1e-15), pytest.approx(0.6, abs=1e-15))


def test_rate_intervals_stay_in_0_1_and_contain_the_mean() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 10, 30):
        for _ in range(20):
            rates = rng.choice([0.0, 1.0, *rng.random(3)], size=n)
            found = estimate(rates)
            assert 0.0 <= found.lo <= found.mean + 1e-12 <= found.hi + 2e-12 <= 1.0 + 2e-12
            assert min(rates) <= found.lo and found.hi <= max(rates)


def test_aggregate_keeps_each_groups_values_in_row_order() -> None:
    frame = pd.DataFrame(
        {"configuration": ["a", "b", "a", "b", "c"], "error": [0.3, 0.1, 0.2, None, 0.5]}
    )
    rows = aggregate(frame, ["configuration"], "error").set_index("configuration")
    assert rows.loc["a", "values"] == [0.3, 0.2]
    assert (rows.loc["a", "lo"], rows.loc["a", "hi"], rows.loc["a", "n"]) == (0.2, 0.3, 2)
    assert rows.loc["b", "values"] == [0.1] and rows.loc["b", "n"] == 1
    assert math.isnan(rows.loc["c", "lo"])
    assert set(rows["method"]) == {METHOD}


def _quantile_error(q: float) -> float:
    """Four standard errors of the fraction of RESAMPLES draws below a true q-quantile: how far
    (in probability) an interval end estimated from RESAMPLES draws may honestly land."""
    return 4 * math.sqrt(q * (1 - q) / RESAMPLES)


@pytest.mark.parametrize("hits", [5, 0])
def test_one_seed_of_a_rate_gives_the_jeffreys_interval(hits: int) -> None:
    # One seed, `hits` of 50 examples: the interval is the Jeffreys posterior's 2.5% and 97.5%
    # quantiles; at k = 0 its lower end is 0 (Brown, Cai & DasGupta's modification).
    found = estimate([hits / 50], counts=[50])
    posterior = scipy_stats.beta(hits + 0.5, 50 - hits + 0.5)
    assert found.method == RATE_METHOD and found.n == 1
    assert abs(posterior.cdf(found.hi) - 0.975) < _quantile_error(0.975)
    if hits == 0:
        assert found.lo == 0.0 and posterior.ppf(0.025) < 1e-4
    else:
        assert abs(posterior.cdf(found.lo) - 0.025) < _quantile_error(0.025)
    assert 0.0 <= found.lo <= found.mean <= found.hi <= 1.0


def test_two_seeds_of_a_rate_are_wider_than_their_range_and_inside_0_1() -> None:
    # 10 and 30 wrong of 100: the seeds-only bootstrap gives exactly [0.1, 0.3]; counting each
    # seed's examples widens it on both sides.
    alone = estimate([0.1, 0.3])
    found = estimate([0.1, 0.3], counts=[100, 100])
    assert (alone.lo, alone.hi) == (0.1, 0.3)
    assert 0.0 < found.lo < 0.1 and 0.3 < found.hi < 1.0
    assert found.mean == pytest.approx(0.2) and found.values == (0.1, 0.3)
    edge = estimate([0.0, 1.0], counts=[3, 3])  # the extremes: still inside [0, 1]
    assert 0.0 <= edge.lo < edge.hi <= 1.0
    # Seeds of 1 and 2 examples drawn from Beta(1/2, 3/2) and Beta(1/2, 5/2) lean towards 1/2:
    # the 2.5% quantile of the resampled means lies above the seeds' mean 0.02: it starts there.
    few = estimate([0.0, 0.0, 0.0, 0.1, 0.0], counts=[50, 1, 1, 10, 2])
    assert few.lo == pytest.approx(0.02) and few.hi < 1.0


def test_many_seeds_of_huge_counts_tend_to_the_seeds_only_bootstrap() -> None:
    # With 10^9 examples a seed's posterior is a point: only the seeds' spread is left, and the
    # seeds are drawn by the same first draws of the same generator.
    rates = [0.11, 0.14, 0.2, 0.23, 0.3, 0.35]
    alone = estimate(rates)
    found = estimate(rates, counts=[1e9] * len(rates))
    assert found.method == RATE_METHOD and alone.method == METHOD
    assert found.lo == pytest.approx(alone.lo, abs=1e-4)
    assert found.hi == pytest.approx(alone.hi, abs=1e-4)


def test_rate_intervals_are_deterministic_and_fall_back_without_every_count() -> None:
    assert estimate([0.2, 0.4], [30, 40]) == estimate([0.2, 0.4], [30, 40])
    # A seed without its count (an older sweep): the whole group keeps the seeds-only method.
    assert estimate([0.2, 0.4], [30, None]) == estimate([0.2, 0.4])
    # A null rate is left out with its count, not shifted onto another seed's.
    assert estimate([0.2, None], [50, 7]) == estimate([0.2], [50])


def test_aggregate_takes_a_count_column() -> None:
    frame = pd.DataFrame(
        {"configuration": ["a", "a", "b"], "rate": [0.0, 0.0, 0.5], "n": [50, 50, 8]}
    )
    rows = aggregate(frame, ["configuration"], "rate", count="n").set_index("configuration")
    assert list(rows["method"]) == [RATE_METHOD, RATE_METHOD]
    assert rows.loc["a", "lo"] == 0.0 and 0.0 < rows.loc["a", "hi"] < 0.05  # 0 of 100 in all
    assert rows.loc["b", "n"] == 1 and 0.0 < rows.loc["b", "lo"] < 0.5 < rows.loc["b", "hi"]
    assert (rows.loc["b", "lo"], rows.loc["b", "hi"]) == (
        estimate([0.5], [8]).lo,
        estimate([0.5], [8]).hi,
    )
