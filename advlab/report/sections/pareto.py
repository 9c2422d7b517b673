"""A multi-objective search's Pareto front (the `pareto` table, `Results.objectives`): per sweep,
the first objective against each other one, one point per ok trial labelled with its number in
the table (and, on the front, its label; hover for any point's), the front highlighted and
joined in order; and a table of every trial's number, label, objective values and whether it
is on the front (over all objectives at once)."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

from advlab.report import charts
from advlab.report.html import (
    Cell,
    Row,
    chart,
    chart_row,
    esc,
    number,
    section,
    swatch_cell,
    table,
    text_cell,
)
from advlab.report.load import Compared
from advlab.results import Results

FRONT, DOMINATED = "on the front", "dominated"
FRONT_COLOUR, DOMINATED_COLOUR = "#d62728", "#9a9a9a"


def chart_rows(run: Results, compared: Compared, x: str, y: str) -> pd.DataFrame:
    """One row per trial: label, config key (the page's filters), x, y and whether on the front."""
    wide = run.objectives()
    keys = dict(zip(compared.trials["trial_id"], compared.trials["config"], strict=True))
    numbers = range(1, len(wide) + 1)  # each trial's row in the table below the chart
    return pd.DataFrame(
        {
            "trial_id": wide["trial_id"],
            "label": wide["label"],
            # The point's text: its number, and on the front its label too (labels of every
            # point would overprint each other; hover shows any point's label).
            "tag": [
                f"{n}: {label}" if front else str(n)
                for n, label, front in zip(numbers, wide["label"], wide["on_front"], strict=True)
            ],
            "config": [keys.get(t, "") for t in wide["trial_id"]],
            "x": wide[x].astype(float),
            "y": wide[y].astype(float),
            "front": [FRONT if f else DOMINATED for f in wide["on_front"]],
        }
    )


def front_chart(
    rows: pd.DataFrame, compared: Compared, x: str, y: str, modes: dict[str, str], title: str
) -> dict[str, Any]:
    """Every trial as a labelled point, the front's in red and joined in order of x."""
    x_axis = alt.X("x:Q", title=f"{x} ({modes[x]})", scale=alt.Scale(zero=False))
    y_axis = alt.Y("y:Q", title=f"{y} ({modes[y]})", scale=alt.Scale(zero=False))
    colour = alt.Color(
        "front:N",
        scale=alt.Scale(domain=[FRONT, DOMINATED], range=[FRONT_COLOUR, DOMINATED_COLOUR]),
        legend=alt.Legend(title=None, orient="bottom"),
    )
    base = alt.Chart().encode(x=x_axis, y=y_axis)
    line = (
        base.transform_filter(f"datum.front === '{FRONT}'")
        .mark_line(color=FRONT_COLOUR, strokeWidth=1.5, strokeDash=[4, 3])
        .encode(order="x:Q")
    )
    tooltip = [
        alt.Tooltip("label:N", title="trial"),
        alt.Tooltip("x:Q", title=x, format=".4g"),
        alt.Tooltip("y:Q", title=y, format=".4g"),
        alt.Tooltip("front:N", title="Pareto"),
    ]
    points = (
        base.mark_point(filled=True, opacity=0.9)
        .encode(
            color=colour,
            size=alt.condition(f"datum.front === '{FRONT}'", alt.value(90), alt.value(40)),
            tooltip=tooltip,
        )
        .properties(name=charts.POINTS)
    )
    labels = base.mark_text(align="left", dx=6, dy=-4, fontSize=10, color="#444").encode(
        text="tag:N"
    )
    layered = alt.layer(line, points, labels, data=charts.NAMED)
    return charts.finish(layered, compared.configs, title, charts.records(rows))


def objectives_table(run: Results, compared: Compared, sweep: str, modes: dict[str, str]) -> str:
    """Every trial: its label, each objective's value and whether it is on the front."""
    wide = run.objectives()
    metrics = list(modes)
    by_trial = {t: c for c in compared.configs for t in c.trial_ids}
    head = [("number", "#"), ("label", "trial"), *[(m, f"{m} ({modes[m]})") for m in metrics]]
    head.append(("front", "front"))
    body = []
    for number_, row in enumerate(wide.to_dict("records"), start=1):
        config = by_trial.get(row["trial_id"])
        colour = config.colour if config is not None else DOMINATED_COLOUR
        cells: dict[str, Cell] = {"number": Cell(str(number_), value=float(number_))}
        cells["label"] = swatch_cell(row["label"], colour)
        cells |= {m: Cell(number(row[m]), value=float(row[m])) for m in metrics}
        cells["front"] = text_cell("yes" if row["on_front"] else "no")
        body.append(Row(cells, config.key if config is not None else None))
    return table("pareto", head, body, sweep=sweep)


def render(compared: Compared) -> str:
    blocks = []
    for run, sweep in zip(compared.runs, compared.sweep_names, strict=True):
        if run.pareto.empty:
            continue
        modes = dict(zip(run.pareto["metric"], run.pareto["mode"], strict=True))
        metrics = list(modes)
        items = []
        for number_, y in enumerate(metrics[1:]):
            rows = chart_rows(run, compared, metrics[0], y)
            spec = front_chart(rows, compared, metrics[0], y, modes, f"{sweep}: {y} against "
                               f"{metrics[0]}")  # fmt: skip
            target = f"pareto-{len(blocks)}-{number_}"
            items.append(chart(target, spec, shows="pareto", sweep=sweep, x=metrics[0], y=y))
        front = int(run.objectives()["on_front"].sum())
        heading = f"<h3>{esc(sweep)}: {front} of {len(run.objectives())} trials on the front</h3>"
        blocks.append(heading + chart_row(items) + objectives_table(run, compared, sweep, modes))
    if not blocks:
        return ""
    intro = (
        "A multi-objective search's trials (the pareto table): every ok trial is a point, "
        "numbered as in the table below it (hover for its sampled values; the front's points "
        "carry them too); the Pareto front (no other trial as good in every "
        "objective and better in one, over all objectives at once) is red and joined in order. "
        "With more than two objectives, a front point can look dominated in one pair's plot."
    )
    return section("pareto", "Pareto front", "".join(blocks), intro)
