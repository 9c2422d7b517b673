"""Repeats: trials that differ only in `seed` are summarised by their mean, a 95% interval and
the seeds' own values. This module is the one home of every estimate the report and
`Results.over_seeds` show. Each estimate names the interval it carries (`Estimate.method`).

Values in general (distances, exponents, losses): the 95% percentile bootstrap over the
repeats (METHOD). The mean is recomputed on `RESAMPLES` resamples (with replacement) of the
seeds' values, drawn from a fixed generator so the same values always give the same interval,
and the 2.5% and 97.5% quantiles of those means are its ends. A resampled mean never leaves the
range of the values seen, so a distance's interval stays above 0 where Student's t gave
negative ones. With two seeds the interval is exactly the two values; with one there is none.

Rates whose per-seed count of examples is known (a success rate over the attacks table's `n`,
a robust error over the trial's `n_scanned`, a test error over `n_test`): the 95% two-level
bootstrap over seeds and examples (RATE_METHOD). Each resample draws the seeds with
replacement, then draws each drawn seed's rate from its Jeffreys posterior Beta(k + 1/2,
n - k + 1/2) (k = rate x n of its n examples), and takes the mean; the interval is the 2.5% and
97.5% quantiles of those means. Why: a seed's rate is itself measured on finitely many
examples, which the seeds-only bootstrap ignores (two seeds gave exactly their range, one seed
nothing); every drawn rate lies in [0, 1], so the interval does; with one seed it is the
Jeffreys interval (Brown, Cai & DasGupta 2001), with many seeds of many examples it tends to
the seeds-only bootstrap. The interval is widened to hold the seeds' mean where it does not:
that gives a lower end of 0 where every seed's rate is 0 (and an upper end of 1 where every
one is 1), Brown, Cai & DasGupta's modification at k = 0 and k = n, and otherwise happens only
with seeds of a handful of examples, whose Jeffreys draws lean towards 1/2. A group where
some seed's count is missing (a sweep written before the count was recorded) falls back to
the seeds-only bootstrap, and its estimate names that method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

LEVEL = 0.95
RESAMPLES = 4000
METHOD = "95% percentile bootstrap over seeds"
RATE_METHOD = "95% two-level bootstrap over seeds and examples (Jeffreys Beta per seed)"
WHY = (
    "resampling the seeds keeps every bound inside the values seen; two seeds give exactly "
    "their range, one seed no interval"
)
RATE_WHY = (
    "a rate with a known count of examples: resample the seeds, then draw each drawn seed's "
    "rate from its Jeffreys posterior Beta(k + 1/2, n − k + 1/2), so the interval also "
    "counts each seed's finite examples, stays in [0, 1] and exists for one seed"
)
COLUMNS = ["mean", "lo", "hi", "n", "values", "method"]


@dataclass(frozen=True)
class Estimate:
    """The mean of n values, its interval (lo = hi = NaN when there is none), the values and
    the interval's method (METHOD or RATE_METHOD)."""

    mean: float
    lo: float
    hi: float
    n: int
    values: tuple[float, ...] = field(default=())
    method: str = METHOD


def numbers(values: Sequence[float] | pd.Series) -> np.ndarray:
    """The values that are numbers, in order (nulls, NaN and text are left out)."""
    array = _floats(values)
    return array[np.isfinite(array)]


def _floats(values: Sequence[float] | pd.Series | np.ndarray) -> np.ndarray:
    """Every value as a float, NaN where it is not a number (positions kept)."""
    if isinstance(values, pd.Series | np.ndarray) and values.dtype.kind in "fiu":
        return pd.Series(values).to_numpy(dtype=float, na_value=np.nan)  # no per-value parse
    return pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").to_numpy(float)


def _ends(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap_interval(array: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `array` (at least two values)."""
    rng = np.random.default_rng(0)  # fixed: the same values give the same interval
    means = array[rng.integers(0, len(array), size=(RESAMPLES, len(array)))].mean(axis=1)
    lo, hi = _ends(means, level)
    # Resampled means lie within [min, max]; rounding in .mean() must not step outside.
    return max(lo, float(array.min())), min(hi, float(array.max()))


def rate_interval(
    rates: np.ndarray, counts: np.ndarray, level: float = LEVEL
) -> tuple[float, float]:
    """The two-level bootstrap interval of the mean rate of seeds with rates[i] measured on
    counts[i] > 0 examples (RATE_METHOD): seeds resampled, each drawn seed's rate redrawn."""
    rng = np.random.default_rng(0)  # fixed: the same rates and counts give the same interval
    hits = np.clip(rates, 0.0, 1.0) * counts  # k need not be whole: Beta takes any k in [0, n]
    picks = rng.integers(0, len(rates), size=(RESAMPLES, len(rates)))
    # Jeffreys, not Binomial(n, k/n): the latter is stuck at 0 for k = 0 (no interval at all).
    drawn = rng.beta(hits[picks] + 0.5, counts[picks] - hits[picks] + 0.5)
    lo, hi = _ends(drawn.mean(axis=1), level)
    # Widened to hold the observed mean: Brown, Cai & DasGupta's end 0 at k = 0 (1 at k = n);
    # otherwise only seeds of a handful of examples, pulled towards 1/2, can need it.
    mean = float(np.clip(rates, 0.0, 1.0).mean())
    return max(0.0, min(lo, mean)), min(1.0, max(hi, mean))


def estimate(
    values: Sequence[float] | pd.Series, counts: Sequence[float] | pd.Series | None = None
) -> Estimate:
    """Mean, 95% interval and the values themselves, of the values that are numbers.

    counts: each value's count of examples (same order), when the values are rates measured on
    that many examples: the interval is then RATE_METHOD's, if every kept value has one."""
    raw = _floats(values)
    kept_at = np.isfinite(raw)
    array = raw[kept_at]
    n = len(array)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    kept = tuple(float(v) for v in array)
    if counts is not None:
        sizes = _floats(counts)[kept_at]
        if np.isfinite(sizes).all() and (sizes > 0).all():
            lo, hi = rate_interval(array, sizes)
            return Estimate(mean, lo, hi, n, kept, RATE_METHOD)
    if n < 2 or array.min() == array.max():
        lo = hi = math.nan if n < 2 else float(array[0])
        return Estimate(mean, lo, hi, n, kept)
    lo, hi = bootstrap_interval(array)
    return Estimate(mean, lo, hi, n, kept)


def with_counts(
    frame: pd.DataFrame, trials: pd.DataFrame, count: str | None
) -> tuple[pd.DataFrame, str | None]:
    """`frame` with the column `count`, a rate's count of examples (advlab.tables.RATE_COUNTS
    names it), merged from the trials' rows by trial_id when the frame lacks it; and that
    column, or None when neither has it (a sweep written before the count was recorded)."""
    if count is None or count in frame:
        return frame, count
    if count not in trials:
        return frame, None
    return frame.merge(trials[["trial_id", count]], on="trial_id", how="left"), count


def aggregate(
    frame: pd.DataFrame, by: list[str], value: str, count: str | None = None
) -> pd.DataFrame:
    """One row per group of `by` (in order of first appearance): mean, lo, hi, n, the seeds'
    own `values` (a list, in row order) of `value` and the interval's `method`.

    count: the column holding each row's count of examples when `value` is a rate over them
    (estimate(values, counts): the two-level interval over seeds and examples)."""
    if frame.empty:
        return pd.DataFrame(columns=[*by, *COLUMNS])
    # Group numbers and one float array: pandas' per-group iteration is what costs at
    # thousands of groups, not the estimates.
    codes = frame.groupby(by, sort=False, dropna=False).ngroup().to_numpy()
    array = _floats(frame[value])
    sizes = _floats(frame[count]) if count is not None else None
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    keys = frame[by].to_numpy(object)
    rows = []
    for group in np.split(order, starts[1:]):
        found = estimate(array[group], None if sizes is None else sizes[group])
        if found.n:
            rows.append(
                dict(zip(by, keys[group[0]], strict=True))
                | {"mean": found.mean, "lo": found.lo, "hi": found.hi, "n": found.n}
                | {"values": list(found.values), "method": found.method}
            )
    return pd.DataFrame(rows, columns=[*by, *COLUMNS])
