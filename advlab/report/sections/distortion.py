"""Mean minimum distortion against weight decay, for every minimisation attack (§4.3's question:
does regularisation make adversarial examples bigger?)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import altair as alt
import numpy as np
import pandas as pd

from advlab.report import charts
from advlab.report.html import chart, chart_row, section
from advlab.report.load import Compared
from advlab.report.sections.robust import norm_title


def plotted_decay(value: object) -> float:
    """One λ per trial: a per-layer list is plotted at its largest value."""
    values = [float(v) for v in _flat(value)]
    return max(values) if values else math.nan


def _flat(value: object) -> Iterable[float]:
    if value is None:
        return []
    if isinstance(value, list | tuple | np.ndarray):
        return list(value)
    return [value]  # type: ignore[list-item]


def decay_rows(compared: Compared, attack: str, norm: str) -> pd.DataFrame:
    """Per configuration: λ, and the mean (over seeds) of each trial's mean distortion."""
    attacks = compared.attacks
    mine = attacks[(attacks["attack"] == attack) & (attacks["kind"] == "minimization")]
    mine = mine[mine["norm"] == norm]
    decay = compared.trials.set_index("trial_id")["weight_decay"]
    frame = mine.assign(
        decay=[plotted_decay(decay.get(t)) for t in mine["trial_id"]],
        distortion=mine[f"mean_dist_{norm}"].astype(float),
    )
    rows = charts.summarise(frame, ["decay"], "distortion")
    lines = {
        c.key: json.dumps({k: v for k, v in c.values.items() if k != "weight_decay"})
        for c in compared.configs
    }
    return rows.assign(line=rows["config"].map(lines))


def with_zero_placed(rows: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """A log axis has no 0: λ = 0 is drawn a decade below the smallest positive λ (ticked 0)."""
    positive = rows.loc[rows["decay"] > 0, "decay"]
    zero_at = float(positive.min()) / 10 if len(positive) else 1e-6
    placed = rows["decay"].where(rows["decay"] > 0, zero_at)
    has_zero = bool((rows["decay"] == 0).any())
    return rows.assign(x=placed, decay_text=rows["decay"].map(lambda v: f"{v:g}")), (
        zero_at if has_zero else None
    )


def decay_axis(rows: pd.DataFrame, zero_at: float | None) -> alt.X:
    """Log λ, ticked at each decade the data spans (and at 0's stand-in, labelled 0)."""
    low, high = rows["x"].min(), rows["x"].max()
    decades = [10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    ticks = sorted({*decades, *([zero_at] if zero_at else [])})
    label = "format(datum.value, '~g')"
    if zero_at:
        label = f"datum.value == {zero_at!r} ? '0' : {label}"
    axis = alt.Axis(values=ticks, labelExpr=label, grid=True)
    return alt.X("x:Q", title="weight decay λ", scale=alt.Scale(type="log"), axis=axis)


def render(compared: Compared) -> str:
    attacks = compared.attacks
    minimising = attacks[attacks["kind"] == "minimization"]
    if minimising.empty or compared.trials["weight_decay"].map(plotted_decay).nunique() < 2:
        return ""
    items, zeros = [], False
    pairs = minimising[["attack", "norm"]].drop_duplicates().itertuples(index=False)
    for number, (attack, norm) in enumerate(pairs):
        rows, zero_at = with_zero_placed(decay_rows(compared, attack, norm))
        if rows.empty:
            continue
        zeros |= zero_at is not None
        spec = charts.trend(
            rows, compared.configs, x=decay_axis(rows, zero_at),
            y_title=f"mean minimum {norm_title(norm)}",
            title=f"{attack}: distortion against weight decay", y_format=".3~g", band=False,
            connect="line", extra_tooltip=[alt.Tooltip("decay_text:N", title="λ")],
        )  # fmt: skip
        items.append(chart(f"decay-{number}", spec, shows="distortion", attack=attack, norm=norm))
    per_layer = compared.trials["weight_decay"].map(lambda v: len(set(_flat(v))) > 1).any()
    intro = (
        "Each point is a configuration's mean over seeds (bars: 95% interval, hollow points: "
        "each seed); gray lines join configurations that differ only in λ."
        + (" A per-layer λ is plotted at its largest value." if per_layer else "")
        + (" λ = 0 sits a decade below the smallest positive λ." if zeros else "")
    )
    return (
        section("distortion", "Distortion against weight decay", chart_row(items), intro)
        if items
        else ""
    )
