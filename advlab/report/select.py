"""Which configurations a report shows: the settings' filters (`where`), ranking by a metric's
mean over seeds, and top-k. Also the one place a metric's per-trial values are read."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd

from advlab.report.load import Compared, Config
from advlab.report.settings import Metric, ReportSettings, ReportSettingsError
from advlab.tables import RATE_COUNTS


def metric_values(compared: Compared, metric: Metric) -> pd.Series:
    """The metric per ok trial (index trial_id); trials without it are left out."""
    values = metric_rows(compared, metric)[metric.column].astype(float)
    return values.dropna() if metric.attack is None else values


def metric_counts(compared: Compared, metric: Metric) -> pd.Series | None:
    """Per ok trial, the count of examples the metric is a share of (advlab.tables.RATE_COUNTS:
    the trial's n_test for its test error, the run's n for a success rate); None when the
    metric is not such a rate or the sweeps did not record the count."""
    table = "trials" if metric.attack is None else "attacks"
    count = RATE_COUNTS.get((table, metric.column))
    rows = metric_rows(compared, metric)
    return None if count is None or count not in rows else rows[count].astype(float)


def metric_rows(compared: Compared, metric: Metric) -> pd.DataFrame:
    """The rows (index trial_id, one per ok trial) the metric is read from: the trials', or
    the metric's attack's run (at its budget for a fixed-budget attack)."""
    if metric.attack is None:
        return compared.ok_trials.set_index("trial_id")
    attacks = compared.attacks
    runs = attacks[attacks["attack"] == metric.attack]
    if runs.empty:
        known = ", ".join(dict.fromkeys(attacks["attack"])) or "none"
        raise ReportSettingsError(
            f"metric: the sweeps have no attack {metric.attack!r}; attacks: {known}"
        )
    if runs["budget"].notna().any():  # a fixed-budget attack: one run per budget
        budget = metric.budget if metric.budget is not None else float(runs["budget"].max())
        runs = runs[runs["budget"] == budget]
        if runs.empty:
            raise ReportSettingsError(f"metric: {metric.attack} ran at no budget {budget:g}")
    runs = runs[runs["trial_id"].isin(set(compared.ok_trials["trial_id"]))]
    return runs.drop_duplicates("trial_id").set_index("trial_id")


def ranked(compared: Compared, metric: Metric, descending: bool = False) -> list[Config]:
    """Configurations by their mean of `metric` over seeds (lowest first unless descending);
    ties and configurations without a value keep grid order, the latter last."""
    values = metric_values(compared, metric)
    config_of = compared.trials.set_index("trial_id")["config"]
    by_config = values.groupby(config_of.reindex(values.index)).mean()  # the mean over seeds
    means = [float(by_config.get(c.key, math.nan)) for c in compared.configs]
    sign = -1.0 if descending else 1.0
    order = sorted(
        range(len(means)),
        key=lambda i: (math.isnan(means[i]), sign * means[i] if not math.isnan(means[i]) else 0, i),
    )
    return [compared.configs[i] for i in order]


def check_where(compared: Compared, where: dict[str, list[str]]) -> None:
    """Every axis named is one the page can filter on, and every value one it takes."""
    for axis, wanted in where.items():
        known = list(dict.fromkeys(c.values.get(axis, "—") for c in compared.configs))
        if axis != "sweep" and axis not in compared.axes:
            axes = ", ".join(["sweep", *compared.axes])
            raise ReportSettingsError(f"--where {axis}=...: no grid axis {axis!r}; axes: {axes}")
        missing = [v for v in wanted if v not in known]
        if missing:
            raise ReportSettingsError(
                f"--where {axis}={missing[0]}: {axis} takes none such; its values: "
                + ", ".join(known)
            )


def select(compared: Compared, settings: ReportSettings) -> Compared:
    """The report's configurations after `where` and `top` (top-k in rank order), every table
    cut to their trials; the same Compared when nothing is filtered."""
    check_where(compared, settings.where)
    for axis in settings.chart_axes or []:
        if axis != "sweep" and axis not in compared.axes:
            axes = ", ".join(["sweep", *compared.axes])
            raise ReportSettingsError(f"--chart {axis}: no grid axis {axis!r}; axes: {axes}")
    for metric in [settings.rank_by, *(settings.chart_metrics or [])]:
        metric_values(compared, metric)  # an attack the sweeps lack is said before any work
    kept = [
        c
        for c in compared.configs
        if all(c.values.get(a, "—") in values for a, values in settings.where.items())
    ]
    if settings.top is not None:
        order = ranked(replace(compared, configs=kept), settings.rank_by, settings.descending)
        kept = order[: settings.top]
    if len(kept) == len(compared.configs) and kept == compared.configs:
        return compared
    return narrowed(compared, kept)


def narrowed(compared: Compared, configs: list[Config]) -> Compared:
    keys = {c.key for c in configs}
    trials = compared.trials[compared.trials["config"].isin(keys)]

    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["config"].isin(keys)] if "config" in frame else frame

    return replace(
        compared,
        configs=configs,
        trials=trials,
        attacks=cut(compared.attacks),
        curves=cut(compared.curves),
        epochs=cut(compared.epochs),
        measures={n: cut(f) for n, f in compared.measures.items()},
        left_out=compared.left_out + len(compared.configs) - len(configs),
    )


def table_configs(compared: Compared) -> tuple[list[Config], int]:
    """The configurations a table lists (at most settings.rows: the best by rank_by, in rank
    order, when there are more) and how many it leaves out."""
    rows = compared.settings.rows
    if len(compared.configs) <= rows:
        return compared.configs, 0
    order = ranked(compared, compared.settings.rank_by, compared.settings.descending)
    return order[:rows], len(order) - rows


def rank_note(compared: Compared, shown: int, hidden: int, what: str = "configurations") -> str:
    """A line saying a table lists only the best `shown` configurations, and how to see others."""
    if not hidden:
        return ""
    settings = compared.settings
    order = "highest" if settings.descending else "lowest"
    return (
        f'<p class="note">The {shown} {what} with the {order} mean {settings.rank_by.title}; '
        f"{hidden} more not listed (choose with advlab report --top, --rank-by, --where).</p>"
    )
