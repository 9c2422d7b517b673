"""Adversarial distortion and input gradients against the input dimension d = C * H * W (a sweep
over `dataset.resolution`): the concentration-of-measure and gradient-norm claims, as numbers.

- Gilmer et al. 2018: the minimum L2 distortion stays roughly flat in d, so the per-pixel (rms)
  distortion, L2 / sqrt(d), falls like d^-1/2: an eps * sqrt(d) law for a fixed rms budget.
- Simon-Gabriel et al. 2019: the loss gradient's l1 norm grows like d^1/2 (its l2 norm stays).

`points` puts every trial's values in one long-form table (quantity, attack, d, seed, value);
`exponents` fits log(value) = a + k log(d) per seed and summarises k over seeds with
advlab.stats (mean, 95% bootstrap interval over seeds), beside the exponent each claim predicts.
Since dist_rms = dist_l2 / sqrt(d) for every example, the rms exponent is the L2 one less 1/2
exactly: both are given because the claims are stated in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from advlab.stats import estimate


@dataclass(frozen=True)
class Quantity:
    name: str
    predicted: float  # the exponent of d the claim predicts
    claim: str


QUANTITIES = (
    Quantity("dist_l2", 0.0, "minimum L2 distortion flat in d (Gilmer et al. 2018)"),
    Quantity("dist_rms", -0.5, "minimum rms distortion falls like 1/sqrt(d) (eps*sqrt(d) law)"),
    Quantity("grad_l1", 0.5, "loss-gradient l1 norm grows like sqrt(d) (Simon-Gabriel et al.)"),
    Quantity("grad_l2", 0.0, "loss-gradient l2 norm flat in d (Simon-Gabriel et al. 2019)"),
)
BY_NAME = {q.name: q for q in QUANTITIES}
POINT_COLUMNS = ["trial_id", "group", "seed", "input_dim", "quantity", "attack", "value"]


def points(
    trials: pd.DataFrame, attacks: pd.DataFrame, gradients: pd.DataFrame | None
) -> pd.DataFrame:
    """Long-form: one row per (ok trial, quantity, attack) with d and the value. `trials` needs
    trial_id, status, seed, input_dim and `group` (what the trial is besides its seed and
    resolution); distortions are each minimisation attack run's mean over its successes, the
    gradient norms the input_gradients measure's means."""
    ok = trials[(trials["status"] == "ok") & trials["input_dim"].notna()]
    keys = ok[["trial_id", "group", "seed", "input_dim"]]
    frames = [_attack_points(keys, attacks)]
    if gradients is not None and not gradients.empty:
        frames.append(_gradient_points(keys, gradients))
    found = pd.concat([f for f in frames if not f.empty] or [pd.DataFrame(columns=POINT_COLUMNS)])
    found = found[np.isfinite(found["value"].astype(float)) & (found["value"].astype(float) > 0)]
    return found[POINT_COLUMNS].reset_index(drop=True)


def _attack_points(keys: pd.DataFrame, attacks: pd.DataFrame) -> pd.DataFrame:
    runs = attacks[(attacks["kind"] == "minimization") & (attacks["status"] == "ok")]
    runs = runs[["trial_id", "attack", "mean_dist_l2", "mean_dist_rms"]].merge(keys, on="trial_id")
    long = runs.melt(
        id_vars=["trial_id", "group", "seed", "input_dim", "attack"],
        value_vars=["mean_dist_l2", "mean_dist_rms"],
        var_name="column",
    )
    quantity = {"mean_dist_l2": "dist_l2", "mean_dist_rms": "dist_rms"}  # our own columns
    return long.assign(quantity=long["column"].map(quantity)).drop(columns="column")


def _gradient_points(keys: pd.DataFrame, gradients: pd.DataFrame) -> pd.DataFrame:
    rows = gradients[["trial_id", "norm", "mean"]].merge(keys, on="trial_id")
    return rows.assign(quantity="grad_" + rows["norm"], attack=None, value=rows["mean"]).drop(
        columns=["norm", "mean"]
    )


def slope(dims: np.ndarray, values: np.ndarray) -> float:
    """The least-squares slope of log(value) on log(d); NaN with fewer than two distinct d."""
    if len(np.unique(dims)) < 2:
        return math.nan
    return float(np.polyfit(np.log(dims), np.log(values), 1)[0])


def exponents(found: pd.DataFrame) -> pd.DataFrame:
    """Per (group, attack, quantity): the exponent of d fitted per seed, its mean over seeds
    with the 95% bootstrap interval (advlab.stats), the seeds' own exponents, the d values,
    the predicted exponent and whether the interval holds it (null with one seed)."""
    rows = []
    keyed = found.assign(attack=found["attack"].fillna(""))
    for (group, attack, name), part in keyed.groupby(["group", "attack", "quantity"], sort=False):
        per_seed = [
            slope(s["input_dim"].to_numpy(float), s["value"].to_numpy(float))
            for _, s in part.groupby("seed", sort=True)
        ]
        fit = estimate(per_seed)
        quantity = BY_NAME[name]
        holds = None if fit.n < 2 else bool(fit.lo <= quantity.predicted <= fit.hi)
        rows.append(
            {
                "group": group, "attack": attack or None, "quantity": name,
                "exponent": fit.mean, "lo": fit.lo, "hi": fit.hi, "n_seeds": fit.n,
                "seed_exponents": list(fit.values),
                "dims": sorted(int(d) for d in part["input_dim"].unique()),
                "predicted": quantity.predicted, "consistent": holds, "claim": quantity.claim,
            }
        )  # fmt: skip
    return pd.DataFrame(rows)
