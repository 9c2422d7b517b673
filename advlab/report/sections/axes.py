"""Any metric against any grid axis: per configuration, its mean over seeds at its value of the
axis (bars: the 95% interval; hollow points: each seed), configurations side by side within
each value. The axes and metrics are the report's settings (`advlab report --chart AXIS
--chart-metric METRIC`); by default every axis that varies (at most DEFAULT_AXES) against the
test error and each kind of attack's headline number."""

from __future__ import annotations

import altair as alt
import pandas as pd

from advlab.report import charts
from advlab.report.html import chart, chart_row, section
from advlab.report.load import Compared
from advlab.report.select import metric_counts, metric_values
from advlab.report.settings import Metric

DEFAULT_AXES = 3


def varying_axes(compared: Compared) -> list[str]:
    return [a for a in compared.axes if len({c.values.get(a, "—") for c in compared.configs}) > 1]


def default_metrics(compared: Compared) -> list[Metric]:
    """The test error, the first minimisation attack's mean distortion in its norm and the
    first fixed-budget attack's success rate at its largest budget."""
    found = [Metric()]
    attacks = compared.attacks
    for kind in ("minimization", "fixed_budget"):
        runs = attacks[attacks["kind"] == kind]
        if runs.empty:
            continue
        first = runs.iloc[0]
        column = f"mean_dist_{first['norm']}" if kind == "minimization" else "success_rate"
        found.append(Metric(column=column, attack=str(first["attack"])))
    return found


def axis_rows(compared: Compared, axis: str, metric: Metric) -> pd.DataFrame:
    """Per configuration: its axis value (`x`) and the metric's mean, interval and seeds."""
    values = metric_values(compared, metric)
    counts = metric_counts(compared, metric)  # a rate's examples: the interval counts them
    trials = compared.ok_trials
    trials = trials[trials["trial_id"].isin(values.index)]
    at = {c.key: c.values.get(axis, "—") for c in compared.configs}
    frame = pd.DataFrame(
        {
            "config": trials["config"],
            "configuration": trials["configuration"],
            "x": trials["config"].map(at),
            "value": values.reindex(trials["trial_id"]).to_numpy(float),
        }
    )
    if counts is None:
        return charts.summarise(frame, ["x"], "value")
    frame["count"] = counts.reindex(trials["trial_id"]).to_numpy(float)
    return charts.summarise(frame, ["x"], "value", count="count")


def render(compared: Compared) -> str:
    settings = compared.settings
    axes = settings.chart_axes or varying_axes(compared)[:DEFAULT_AXES]
    metrics = settings.chart_metrics or default_metrics(compared)
    if compared.ok_trials.empty or not axes:
        return ""
    items = []
    for axis in axes:
        order = list(dict.fromkeys(c.values.get(axis, "—") for c in compared.configs))
        for metric in metrics:
            rows = axis_rows(compared, axis, metric)
            if rows.empty:
                continue
            spec = charts.trend(
                rows, compared.configs, x=alt.X("x:N", title=axis, sort=order,
                axis=alt.Axis(labelAngle=0, labelLimit=120)), x_offset="config:N",
                y_title=metric.title, title=f"{metric.title} against {axis}",
                y_format=".0%" if metric.is_rate else ".3~g", band=False,
                extra_tooltip=[alt.Tooltip("x:N", title=axis)],
            )  # fmt: skip
            attrs = {"axis": axis, "metric": metric.column, "attack": metric.attack or ""}
            items.append(chart(f"axis-{len(items)}", spec, shows="metric-by-axis", **attrs))
    if not items:
        return ""
    intro = (
        "Each point is a configuration's mean over seeds at its value of the axis (bars: 95% "
        "interval, over seeds and examples for a rate whose count is stored, the subtitle "
        "names the method; hollow points: each seed); configurations sharing a value stand side by "
        "side. Choose axes and metrics with advlab report --chart AXIS --chart-metric METRIC."
    )
    return section("axes", "Metrics against grid axes", chart_row(items), intro)
