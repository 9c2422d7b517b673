"""How close the attacks come to the truth (the bounds measure): per norm, the sorted bracket
curves (each configuration's certified lower bounds and best attacks, and its exact minima where
a solver proved them), certified beside empirical robust accuracy at every budget, and per
attack its optimality: distortion over the exact minimum (else over the best of all attacks)
and the share of examples within 1% of the certified bound."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from advlab.measures.bracket import optimality, robust_accuracy, tightest
from advlab.report import charts
from advlab.report.html import (
    Cell,
    Row,
    chart,
    chart_row,
    number,
    percent,
    section,
    swatch_cell,
    table,
    text_cell,
)
from advlab.report.load import Compared
from advlab.report.sections.robust import norm_title
from advlab.stats import aggregate

QUANTILES = np.linspace(0, 1, 21)
CURVES = {"lower": "certified lower bound", "upper": "best attack", "minimum": "exact minimum"}


def sorted_curves(limits: pd.DataFrame, norm: str) -> pd.DataFrame:
    """Per configuration, curve and quantile of its examples: the mean over seeds of each
    trial's quantile (each curve sorted on its own, as a distribution)."""
    rows = []
    mine = limits[limits["norm"] == norm]
    for (trial, config, name), group in mine.groupby(["trial_id", "config", "configuration"]):
        for column, curve in CURVES.items():
            values = group[column].astype("float64").dropna()
            if values.empty:
                continue
            for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True):
                rows.append({"trial_id": trial, "config": config, "configuration": name,
                             "curve": curve, "quantile": float(q), "value": float(v)})  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return aggregate(frame, ["config", "configuration", "curve", "quantile"], "value")


def _budgets(compared: Compared, limits: pd.DataFrame) -> dict[str, list[float]]:
    """Each norm's budgets: the sweep's own in that norm where it has some, else 12 steps up
    to the largest best attack."""
    curves = compared.curves
    out = {}
    for norm, group in limits.groupby("norm"):
        own = sorted(set(curves.loc[curves["norm"] == norm, "budget"].astype(float)))
        top = float(group["upper"].max()) if group["upper"].notna().any() else 0.0
        out[str(norm)] = [0.0, *own] if own else list(np.linspace(0, top, 13))
    return out


def _accuracy_rows(compared: Compared, bounds: pd.DataFrame, limits: pd.DataFrame) -> pd.DataFrame:
    found = robust_accuracy(bounds, compared.ok_trials, _budgets(compared, limits))
    tags = compared.trials[["trial_id", "config", "configuration"]]
    found = found.merge(tags, on="trial_id")
    return aggregate(found, ["config", "configuration", "norm", "kind", "budget"], "accuracy")


def _charts(compared: Compared, bounds: pd.DataFrame, limits: pd.DataFrame) -> list[str]:
    items = []
    accuracy = _accuracy_rows(compared, bounds, limits)
    for number_, norm in enumerate(sorted(limits["norm"].unique())):
        title = norm_title(norm)
        rows = sorted_curves(limits, norm)
        if not rows.empty:
            spec = charts.dashed_pairs(
                rows, compared.configs, kind="curve", title=f"Sorted brackets ({title})",
                x=alt.X("quantile:Q", title="share of attacked examples"),
                y=alt.Y("mean:Q", title=f"minimum distortion ({title})"),
            )  # fmt: skip
            items.append(chart(f"bracket-{number_}", spec, shows="bracket", norm=norm))
        mine = accuracy[accuracy["norm"] == norm]
        if not mine.empty:
            spec = charts.dashed_pairs(
                mine, compared.configs, kind="kind", title=f"Robust accuracy ({title})",
                x=alt.X("budget:Q", title=f"budget ε ({title})"),
                y=alt.Y("mean:Q", title="robust accuracy", axis=alt.Axis(format=".0%")),
            )  # fmt: skip
            items.append(chart(f"certified-{number_}", spec, shows="certified", norm=norm))
    return items


def _optimality_table(compared: Compared, bounds: pd.DataFrame) -> str:
    trials = set(bounds["trial_id"])
    examples = pd.concat(
        [r.examples() for r in compared.runs if trials & set(r.trials["trial_id"])],
        ignore_index=True,
    )
    found = optimality(bounds, examples, compared.attacks)
    if found.empty:
        return ""
    found = found.merge(compared.trials[["trial_id", "config"]], on="trial_id")
    body = []
    for config in compared.configs:
        for (attack, norm), group in found[found["config"] == config.key].groupby(
            ["attack", "norm"], sort=False
        ):
            cells = {
                "configuration": swatch_cell(config.name, config.colour),
                "attack": text_cell(attack), "norm": text_cell(norm),
                "n": Cell(str(int(group["n"].sum())), value=float(group["n"].sum())),
            }  # fmt: skip
            for column in ("exact_share", "within_1pct"):
                value = float(group[column].mean())
                cells[column] = Cell(percent(value), value=value)
            for column in ("mean_ratio", "median_ratio"):
                value = float(group[column].mean())
                cells[column] = Cell(number(value), value=value)
            body.append(Row(cells, config.key))
    head = [
        ("configuration", "configuration"), ("attack", "attack"), ("norm", "norm"),
        ("n", "examples"), ("exact_share", "with exact minimum"),
        ("mean_ratio", "mean distortion / reference"), ("median_ratio", "median"),
        ("within_1pct", "within 1% of bound"),
    ]  # fmt: skip
    return "<h3>Attack optimality</h3>" + table("bracket-optimality", head, body)


def _gap_table(compared: Compared, limits: pd.DataFrame) -> str:
    """Per configuration and norm: mean certified bound, mean best attack, their mean ratio
    (the bracket gap) and the share of examples with a proven minimum."""
    body = []
    for config in compared.configs:
        mine = limits[limits["config"] == config.key]
        for norm, group in mine.groupby("norm", sort=True):
            both = group[(group["lower"] > 0) & group["upper"].notna()]
            gap = both["upper"] / both["lower"]
            values = {
                "lower": float(group["lower"].mean()),
                "upper": float(group["upper"].mean()),
                "gap": float(gap.mean()) if len(gap) else float("nan"),
            }
            exact = float(group["minimum"].notna().mean())
            cells = {
                "configuration": swatch_cell(config.name, config.colour),
                "norm": text_cell(norm),
                "n": Cell(str(len(group)), value=float(len(group))),
                "exact": Cell(percent(exact), value=exact),
            }
            cells |= {k: Cell(number(v), value=v) for k, v in values.items()}
            body.append(Row(cells, config.key))
    head = [
        ("configuration", "configuration"), ("norm", "norm"), ("n", "examples"),
        ("lower", "mean certified bound"), ("upper", "mean best attack"),
        ("gap", "mean best attack / bound"), ("exact", "with exact minimum"),
    ]  # fmt: skip
    return "<h3>Bracket gap</h3>" + table("bracket-gap", head, body)


def render(compared: Compared) -> str:
    bounds = compared.measures.get("bounds")
    if bounds is None or bounds.empty:
        return ""
    limits = tightest(bounds).merge(
        compared.trials[["trial_id", "config", "configuration"]], on="trial_id"
    )
    body = chart_row(_charts(compared, bounds, limits)) + _gap_table(compared, limits)
    body += _optimality_table(compared, bounds)
    intro = (
        "Each attacked example's minimum adversarial distortion lies between its certified lower "
        "bound (the best of the bound methods run; exact where a solver proved the minimum) and "
        "the best adversarial any attack found. Curves are sorted per configuration (means over "
        "seeds at each share of examples). Robust accuracy is over the scanned examples: "
        "certified can only lie at or below empirical. Optimality divides each minimisation "
        "attack's distortion by the exact minimum where known, else by the best of all attacks."
    )
    return section("bracket", "How close the attacks come: certified brackets", body, intro)
