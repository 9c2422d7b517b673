"""What the bounds table says, in the long form the report and the benchmarks read:

- `tightest`: per example and norm, the best certified lower bound over every method, the best
  attack, and the exact minimum where a solver proved one;
- `optimality`: per attack and norm, how far its adversarials sit above the limit: the ratio to
  the exact minimum where known, else to the best over all attacks, and the share of examples
  within 1% of the certified lower bound;
- `robust_accuracy`: certified and empirical robust accuracy at given budgets, over the scanned
  examples like the report's robust-error curves (clean errors count as not robust).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from advlab.measures.bounds import EXACT, NEAR

KEYS = ["trial_id", "example", "norm"]
# A fixed-budget attack's adversarial at budget eps measures eps plus float32 round-off of the
# pixels (|x| <= 1, so a few 1e-8): it still counts as fooled within eps.
WITHIN = 1e-7


def tightest(bounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, example, norm): lower (max over methods), upper (best attack),
    minimum (the exact minimum, NaN unless a solver closed it), method (whose lower it is)."""
    if bounds.empty:
        return pd.DataFrame(columns=[*KEYS, "lower", "upper", "minimum", "method"])
    frame = bounds.assign(lower=bounds["lower"].astype("float64"))
    best = frame.sort_values("lower", ascending=False, kind="stable").drop_duplicates(KEYS)
    closed = frame[(frame["method"] == EXACT) & frame["exact"].fillna(False).astype(bool)]
    minimum = closed.groupby(KEYS)["lower"].max().rename("minimum")
    out = best[[*KEYS, "lower", "upper", "method"]].merge(
        minimum, left_on=KEYS, right_index=True, how="left"
    )
    out["upper"] = out["upper"].astype("float64")
    return out.sort_values(KEYS, kind="stable").reset_index(drop=True)


def _attack_norms(attacks: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(trial, attack) -> the norm the attack minimises, rms read as L2 (rms = L2 / sqrt(D))."""
    mine = attacks[attacks["kind"] == "minimization"]
    return {
        (t, a): ("l2" if n == "rms" else n)
        for t, a, n in zip(mine["trial_id"], mine["attack"], mine["norm"], strict=True)
    }


def optimality(bounds: pd.DataFrame, examples: pd.DataFrame, attacks: pd.DataFrame) -> pd.DataFrame:
    """Per (trial, attack, norm) of each minimisation attack in the norm it minimises: n
    examples it fooled, exact_share (of them with a proven minimum), mean_ratio and
    median_ratio (distortion / reference: the exact minimum where known, else the best over
    all attacks) and within_1pct (distortion <= 1.01 x the certified lower bound)."""
    columns = ["trial_id", "attack", "norm", "n", "exact_share", "mean_ratio", "median_ratio",
               "within_1pct"]  # fmt: skip
    limits = tightest(bounds)
    norms = _attack_norms(attacks)
    hits = examples[examples["budget"].isna() & examples["success"].astype(bool)]
    rows = []
    for (trial, attack), norm in norms.items():
        mine = hits[(hits["trial_id"] == trial) & (hits["attack"] == attack)]
        limit = limits[(limits["trial_id"] == trial) & (limits["norm"] == norm)]
        both = mine[["example", f"dist_{norm}"]].merge(limit, on="example")
        if both.empty:
            continue
        dist = both[f"dist_{norm}"].astype("float64")
        reference = both["minimum"].fillna(both["upper"])
        ratio = (dist / reference)[reference > 0]
        rows.append(
            {
                "trial_id": trial, "attack": attack, "norm": norm, "n": len(both),
                "exact_share": float(both["minimum"].notna().mean()),
                "mean_ratio": float(ratio.mean()) if len(ratio) else np.nan,
                "median_ratio": float(ratio.median()) if len(ratio) else np.nan,
                "within_1pct": float((dist <= (1 + NEAR) * both["lower"]).mean()),
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def robust_accuracy(
    bounds: pd.DataFrame, trials: pd.DataFrame, budgets: dict[str, list[float]]
) -> pd.DataFrame:
    """Per (trial, norm, budget, kind): accuracy over the scanned examples, kind certified (the
    best lower bound exceeds the budget) or empirical (no attack fooled it within the budget).
    The bounded examples stand for the attacked ones: accuracy = (1 - clean error) x share."""
    limits = tightest(bounds)
    clean = trials.set_index("trial_id")
    rows = []
    for (trial, norm), group in limits.groupby(["trial_id", "norm"], sort=False):
        if trial not in clean.index:
            continue
        scanned = float(clean.at[trial, "n_scanned"])
        kept = 1 - float(clean.at[trial, "n_clean_wrong"]) / scanned if scanned > 0 else np.nan
        upper = group["upper"].fillna(np.inf)
        for eps in budgets.get(norm, []):
            for kind, robust in (
                ("certified", group["lower"] > eps),
                ("empirical", upper > eps + WITHIN),
            ):
                rows.append(
                    {"trial_id": trial, "norm": norm, "budget": float(eps), "kind": kind,
                     "accuracy": kept * float(robust.mean())}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=["trial_id", "norm", "budget", "kind", "accuracy"])
