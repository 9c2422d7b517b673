"""Robust error against the budget: one chart per attack and budget norm, every sweep overlaid.

Each curve starts at eps = 0, the clean robust error: the examples the model gets wrong with no
attack at all, n_clean_wrong / n_scanned of the scan that found the attacked ones (the same
denominator as every other point of the curve).
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from advlab.report import charts
from advlab.report.html import chart, chart_row, section
from advlab.report.load import Compared

NORM_TITLES = {"rms": "rms distortion", "l2": "L2 norm", "linf": "L∞ norm", "stddev": "noise σ"}


def norm_title(norm: str) -> str:
    return NORM_TITLES.get(norm, norm)


def clean_points(compared: Compared) -> pd.DataFrame:
    """Budget 0 of every ok trial: its clean robust error."""
    trials = compared.ok_trials
    scanned = trials["n_scanned"].astype(float)
    return pd.DataFrame(
        {
            "trial_id": trials["trial_id"],
            "config": trials["config"],
            "configuration": trials["configuration"],
            "budget": 0.0,
            "robust_error": trials["n_clean_wrong"].astype(float) / scanned.where(scanned > 0),
            "n_scanned": scanned,
        }
    )


def curve_rows(compared: Compared, attack: str, norm: str) -> pd.DataFrame:
    """Per configuration and budget (0 first): mean robust error over seeds, with its interval."""
    curves = compared.curves
    mine = curves[(curves["attack"] == attack) & (curves["norm"] == norm)]
    clean = clean_points(compared)
    clean = clean[clean["trial_id"].isin(set(mine["trial_id"]))]
    # Every point is a share of the trial's scanned examples: the interval counts them too.
    mine = mine.merge(clean[["trial_id", "n_scanned"]], on="trial_id", how="left")
    columns = ["trial_id", "config", "configuration", "budget", "robust_error", "n_scanned"]
    both = pd.concat([clean[columns], mine[columns]], ignore_index=True)
    both["budget"] = both["budget"].astype(float)
    return charts.summarise(both, ["budget"], "robust_error", count="n_scanned")


def render(compared: Compared) -> str:
    curves = compared.curves
    if curves.empty:
        return ""
    items = []
    pairs = curves[["attack", "norm"]].drop_duplicates().itertuples(index=False)
    for number, (attack, norm) in enumerate(pairs):
        rows = curve_rows(compared, attack, norm)
        spec = charts.trend(
            rows, compared.configs,
            x=alt.X("budget:Q", title=f"budget ε ({norm_title(norm)})", axis=alt.Axis(tickCount=6)),
            y_title="robust error", title=f"{attack}: robust error against ε",
            extra_tooltip=[alt.Tooltip("budget:Q", title="ε")],
        )  # fmt: skip
        items.append(
            chart(f"robust-{number}", spec, shows="robust-error", attack=attack, norm=norm)
        )
    intro = (
        "Fraction of the scanned test examples that are wrong under attack: misclassified "
        "clean, or fooled within the budget. ε = 0 is the clean error of the same examples. "
        "Lines are means over seeds, bands their 95% interval over seeds and scanned examples "
        "(the subtitle names the method), hollow points each seed. Hover "
        "for values; click a legend entry to bring one configuration forward."
    )
    return section("robust", "Robust error against budget", chart_row(items), intro)
