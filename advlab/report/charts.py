"""Vega-Lite charts (through altair) that share one colour per configuration.

Every chart takes rows already aggregated over seeds (config, configuration, x, mean, lo, hi, n,
values, ci, method) and draws the mean as points and lines, the 95% interval as a band or bars
(its method in the subtitle and each point's tooltip), and each seed's own value as a small
hollow point. Each chart
carries two parameters the page drives: `visible`, the configuration keys the page's filters let
through (a filter transform), and `pick`, bound to the chart's own legend (click an entry to
bring one configuration forward). Hover a point for its values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import altair as alt
import pandas as pd

from advlab.report.load import Config
from advlab.stats import aggregate

WIDTH, HEIGHT = 430, 250
POINTS = "points"  # the name of the layer that holds the plotted means (tests read it back)
SEEDS = "seeds"  # the layer of each seed's own value (hollow points)
FADED = 0.12
NAMED = alt.Data(name="rows")  # what a chart's rows stand under while altair builds its spec
LEGEND_MAX = 20  # past this many configurations a legend is a wall of names: hover and filters


def colour(configs: Sequence[Config]) -> alt.Color:
    """One colour per configuration, the same in every chart, whatever the chart shows. Past
    LEGEND_MAX configurations each row carries its colour (`finish` adds it) and no legend is
    drawn: a scale listing hundreds of names would be copied into every layer of every chart."""
    if len(configs) > LEGEND_MAX:
        return alt.Color("colour:N", scale=None, legend=None)
    scale = alt.Scale(domain=[c.name for c in configs], range=[c.colour for c in configs])
    legend = alt.Legend(
        title=None, orient="bottom", columns=2, labelLimit=320, symbolType="circle", symbolOpacity=1
    )
    return alt.Color("configuration:N", scale=scale, legend=legend)


def trend(
    rows: pd.DataFrame,
    configs: Sequence[Config],
    *,
    x: alt.X,
    y_title: str,
    title: str,
    y_format: str = ".0%",
    band: bool = True,
    connect: str | None = None,
    extra_tooltip: Sequence[alt.Tooltip] = (),
    x_offset: str | None = None,
) -> dict[str, Any]:
    """Means against x, one line per configuration, with its 95% interval (band or bars).

    connect: a field whose equal values one gray line joins across configurations (a model's
    points at each weight decay) instead of one coloured line per configuration.
    x_offset: a field that sets points side by side within each value of a nominal x."""
    pick, emphasis = _legend_pick()
    base = alt.Chart().encode(x=x, color=colour(configs))
    if x_offset is not None:
        base = base.encode(xOffset=x_offset)
    y = alt.Y("mean:Q", title=y_title, axis=alt.Axis(format=y_format))
    low = alt.Y("lo:Q", title=y_title)  # the same title as the means', so it shows once
    spread = (
        base.mark_area(opacity=0.13).encode(y=low, y2="hi:Q")
        if band
        else base.mark_errorbar(ticks=True).encode(y=low, y2="hi:Q", opacity=emphasis)
    )
    line = base.mark_line(strokeWidth=2).encode(y=y, opacity=emphasis, detail="config:N")
    if connect is not None:
        line = (
            alt.Chart()
            .mark_line(color="#999", strokeWidth=1)
            .encode(x=x, y=y, detail=f"{connect}:N", order=alt.Order(str(x.shorthand)))
        )
    tooltip = [
        alt.Tooltip("configuration:N"),
        *extra_tooltip,
        alt.Tooltip("mean:Q", title="mean", format=".4g"),
        alt.Tooltip("ci:N", title="95% interval"),
        alt.Tooltip("method:N", title="interval method"),  # rates: over seeds and examples
        alt.Tooltip("n:Q", title="seeds"),
    ]
    points = _mean_points(base.encode(y=y), pick, emphasis, tooltip, size=55)
    # A layer without data would make Vega warn of an infinite extent: the band needs an
    # interval (one seed has one where its rate's count is known), the seed points two seeds.
    layers = [spread] if rows[["lo", "hi"]].notna().any().any() else []
    layers.append(line)
    if (rows["n"] > 1).any():
        layers.append(_seed_points(base, y_title, emphasis, extra_tooltip))
    layers.append(points)
    methods = list(dict.fromkeys(rows["method"].dropna())) if "method" in rows else []
    heading = alt.Title(title, subtitle=f"interval: {'; '.join(methods)}") if methods else title
    return finish(alt.layer(*layers, data=NAMED), configs, heading, records(rows))


def _legend_pick() -> tuple[Any, Any]:
    """The `pick` selection bound to a chart's legend, and the opacity it drives."""
    pick = alt.selection_point(fields=["configuration"], bind="legend", name="pick")
    return pick, alt.when(pick).then(alt.value(1.0)).otherwise(alt.value(FADED))


def _mean_points(
    base: alt.Chart, pick: Any, emphasis: Any, tooltip: list[alt.Tooltip], size: int
) -> alt.Chart:
    """The plotted means (the layer tests read back as POINTS), carrying the legend pick."""
    return (
        base.mark_point(filled=True, size=size)
        .encode(opacity=emphasis, tooltip=tooltip)
        .add_params(pick)
        .properties(name=POINTS)
    )


def _seed_points(
    base: alt.Chart, y_title: str, emphasis: Any, extra_tooltip: Sequence[alt.Tooltip]
) -> alt.Chart:
    """One hollow point per seed behind each mean of more than one seed."""
    return (
        base.transform_filter("datum.n > 1")
        .transform_flatten(["values"], as_=["seed_value"])
        .mark_point(filled=False, size=22, strokeWidth=1)
        .encode(
            y=alt.Y("seed_value:Q", title=y_title),
            opacity=emphasis,
            tooltip=[
                alt.Tooltip("configuration:N"),
                *extra_tooltip,
                alt.Tooltip("seed_value:Q", title="one seed", format=".4g"),
            ],
        )
        .properties(name=SEEDS)
    )


def finish(
    chart: alt.LayerChart,
    configs: Sequence[Config],
    title: str | alt.Title,
    values: list[dict[str, Any]],
) -> dict[str, Any]:
    """The page's `visible` filter, size and title; the Vega-Lite spec as a dict, its data
    `values` (records()).

    Altair copies and validates every inline value against the schema: seconds per chart at
    hundreds of configurations. So charts are built on a named stand-in (NAMED) and get their
    rows once the spec is a dict."""
    visible = alt.param(name="visible", value=[c.key for c in configs])
    chart = (
        chart.transform_filter("indexof(visible, datum.config) >= 0")
        .add_params(visible)
        .properties(width=WIDTH, height=HEIGHT, title=title)
        .configure_view(stroke=None)
        .configure_axis(labelFontSize=11, titleFontSize=12, grid=True, gridOpacity=0.5)
    )
    spec = chart.to_dict()
    colours = {c.key: c.colour for c in configs}
    spec["data"] = {"values": [r | {"colour": colours.get(r.get("config"))} for r in values]}
    return spec


def records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as inline values, NaN as null (JSON has no NaN)."""
    columns = {}
    for name in rows.columns:
        column = rows[name]
        if column.dtype.kind == "f":
            columns[name] = [None if math.isnan(v) else float(v) for v in column]
        else:
            columns[name] = [_plain(v) for v in column]
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _plain(value: Any) -> Any:
    """A JSON-ready value: NaN as null, numpy scalars as Python's."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def summarise(
    frame: pd.DataFrame, by: Sequence[str], value: str, count: str | None = None
) -> pd.DataFrame:
    """Per configuration and `by` key (in order): mean, interval, seeds, the seeds' values of
    `value` and the interval's method (advlab.stats: inside [0, 1] for a rate and inside the
    values seen otherwise, so it needs no clipping). count: the column of each row's count of
    examples when `value` is a rate over them (the interval over seeds and examples)."""
    rows = aggregate(frame, ["config", "configuration", *by], value, count)
    return rows.assign(
        ci=[interval_text(lo, hi) for lo, hi in zip(rows["lo"], rows["hi"], strict=True)]
    )


def interval_text(lo: float, hi: float, digits: int = 3) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "one seed"
    return f"{lo:.{digits}g} to {hi:.{digits}g}"


def transfer_heatmap(
    matrix: pd.DataFrame, title: str, row_title: str, column_title: str
) -> dict[str, Any]:
    """A labelled heatmap of a transfer matrix (rows x columns of errors in [0, 1])."""
    long = matrix.reset_index(names="row").melt(id_vars="row", var_name="column", value_name="v")
    order = {"rows": list(matrix.index), "columns": list(matrix.columns)}
    base = alt.Chart(long).encode(
        x=alt.X(
            "column:N", sort=order["columns"], title=column_title, axis=alt.Axis(labelAngle=-40)
        ),
        y=alt.Y("row:N", sort=order["rows"], title=row_title),
    )
    cells = base.mark_rect().encode(
        color=alt.Color(
            "v:Q", title="error", scale=alt.Scale(domain=[0, 1], scheme="reds"),
            legend=alt.Legend(format=".0%"),
        )
    )  # fmt: skip
    text = base.mark_text(fontSize=11).encode(
        text=alt.Text("v:Q", format=".0%"),
        color=alt.condition("datum.v > 0.6", alt.value("white"), alt.value("black")),
    )
    size = {"width": 48 * len(matrix.columns), "height": 26 * len(matrix.index)}
    return (cells + text).properties(title=title, **size).to_dict()


def png(spec: dict[str, Any], scale: float = 2) -> bytes:
    """A chart as PNG bytes, drawn without a browser (vl-convert)."""
    import vl_convert

    return vl_convert.vegalite_to_png(spec, scale=scale)


def dashed_pairs(
    rows: pd.DataFrame,
    configs: Sequence[Config],
    *,
    x: alt.X,
    y: alt.Y,
    kind: str,
    title: str,
) -> dict[str, Any]:
    """Means against x, one colour per configuration and one dash per value of `kind` (a
    certified bound beside the best attack, certified beside empirical accuracy)."""
    pick, emphasis = _legend_pick()
    base = alt.Chart().encode(
        x=x, y=y, color=colour(configs), strokeDash=alt.StrokeDash(f"{kind}:N", title=None)
    )
    line = base.mark_line(strokeWidth=2).encode(opacity=emphasis, detail="config:N")
    tooltip = [
        alt.Tooltip("configuration:N"),
        alt.Tooltip(f"{kind}:N"),
        alt.Tooltip(str(x.shorthand)),
        alt.Tooltip("mean:Q", title="mean", format=".4g"),
        alt.Tooltip("n:Q", title="seeds"),
    ]
    points = _mean_points(base, pick, emphasis, tooltip, size=30)
    return finish(alt.layer(line, points, data=NAMED), configs, title, records(rows))
