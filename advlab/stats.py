"""Repeats: trials that differ only in `seed` are summarised by their mean and a 95% interval.

The interval is Student's t over the seeds (mean ± t(0.975, n-1) · s / √n), so two seeds give a
wide interval and one seed none at all: the page never shows more certainty than the sweep has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """The mean of n values and its t-interval (lo = hi = NaN when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def estimate(values: Sequence[float] | pd.Series) -> Estimate:
    """Mean and 95% t-interval of the values that are numbers (nulls and NaN are left out)."""
    array = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").to_numpy(float)
    array = array[np.isfinite(array)]
    n = len(array)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1) * array.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def aggregate(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per group of `by` (in order of first appearance): mean, lo, hi and n of `value`."""
    rows = []
    for keys, group in frame.groupby(by, sort=False, dropna=False):
        found = estimate(group[value])
        if found.n:
            key_values = keys if isinstance(keys, tuple) else (keys,)
            rows.append(
                dict(zip(by, key_values, strict=True))
                | {"mean": found.mean, "lo": found.lo, "hi": found.hi, "n": found.n}
            )
    return pd.DataFrame(rows, columns=[*by, "mean", "lo", "hi", "n"])
