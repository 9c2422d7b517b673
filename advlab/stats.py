"""Repeats: trials that differ only in `seed` are summarised by their mean, a 95% interval and
the seeds' own values. This module is the one home of every estimate the report and
`Results.over_seeds` show.

The interval is the 95% percentile bootstrap over the repeats: the mean is recomputed on
`RESAMPLES` resamples (with replacement) of the seeds' values, drawn from a fixed generator so
the same values always give the same interval, and the 2.5% and 97.5% quantiles of those means
are its ends. Why: the spread that matters in a sweep is between seeds (training), and a
resampled mean can never leave the range of the values seen, so a rate's interval stays in
[0, 1] and a distance's above 0, where Student's t gave "± 76%" and negative error rates from
two seeds. With two seeds the interval is exactly the two values; with one there is none: the
page never shows more certainty than the sweep has, and it shows every seed beside the mean.
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
WHY = (
    "resampling the seeds keeps every bound inside the values seen (a rate's in [0, 1]); "
    "two seeds give exactly their range, one seed no interval"
)
COLUMNS = ["mean", "lo", "hi", "n", "values"]


@dataclass(frozen=True)
class Estimate:
    """The mean of n values, its bootstrap interval (lo = hi = NaN when n < 2) and the values."""

    mean: float
    lo: float
    hi: float
    n: int
    values: tuple[float, ...] = field(default=())


def numbers(values: Sequence[float] | pd.Series) -> np.ndarray:
    """The values that are numbers, in order (nulls, NaN and text are left out)."""
    if isinstance(values, pd.Series | np.ndarray) and values.dtype.kind in "fiu":
        array = pd.Series(values).to_numpy(dtype=float, na_value=np.nan)  # no per-value parse
        return array[np.isfinite(array)]
    array = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").to_numpy(float)
    return array[np.isfinite(array)]


def bootstrap_interval(array: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `array` (at least two values)."""
    rng = np.random.default_rng(0)  # fixed: the same values give the same interval
    means = array[rng.integers(0, len(array), size=(RESAMPLES, len(array)))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    # Resampled means lie within [min, max]; rounding in .mean() must not step outside.
    return float(max(lo, array.min())), float(min(hi, array.max()))


def estimate(values: Sequence[float] | pd.Series) -> Estimate:
    """Mean, 95% bootstrap interval and the values themselves, of the values that are numbers."""
    array = numbers(values)
    n = len(array)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    kept = tuple(float(v) for v in array)
    if n < 2 or array.min() == array.max():
        lo = hi = math.nan if n < 2 else float(array[0])
        return Estimate(mean, lo, hi, n, kept)
    lo, hi = bootstrap_interval(array)
    return Estimate(mean, lo, hi, n, kept)


def aggregate(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per group of `by` (in order of first appearance): mean, lo, hi, n and the
    seeds' own `values` (a list, in row order) of `value`."""
    if frame.empty:
        return pd.DataFrame(columns=[*by, *COLUMNS])
    # Group numbers and one float array: pandas' per-group iteration is what costs at
    # thousands of groups, not the estimates.
    codes = frame.groupby(by, sort=False, dropna=False).ngroup().to_numpy()
    column = frame[value]
    if column.dtype.kind not in "fiu":
        column = pd.to_numeric(pd.Series(column, dtype="object"), errors="coerce")
    array = column.to_numpy(dtype=float, na_value=np.nan)
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    keys = frame[by].to_numpy(object)
    rows = []
    for group in np.split(order, starts[1:]):
        found = estimate(array[group])
        if found.n:
            rows.append(
                dict(zip(by, keys[group[0]], strict=True))
                | {"mean": found.mean, "lo": found.lo, "hi": found.hi, "n": found.n}
                | {"values": list(found.values)}
            )
    return pd.DataFrame(rows, columns=[*by, *COLUMNS])
