"""Distortion and input-gradient norms against the input dimension d (a sweep over
`dataset.resolution`): one log-log chart per quantity and attack, and the fitted exponents with
their intervals over seeds beside what each claim predicts (advlab.dimension,
through advlab.results)."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

from advlab.report import charts
from advlab.report.html import Cell, Row, chart, chart_row, number, section, table, text_cell
from advlab.report.load import Compared

TITLES = {
    "dist_l2": "mean minimum L2 distortion",
    "dist_rms": "mean minimum rms distortion",
    "grad_l1": "mean ‖∇ₓ loss‖₁",
    "grad_l2": "mean ‖∇ₓ loss‖₂",
}


def dimension_points(compared: Compared) -> pd.DataFrame:
    """Every sweep's points (Results.dimension), tagged with the trial's configuration, and the
    line that joins a group's resolutions (its sweep and the grid values besides d and seed)."""
    frames = [
        run.dimension().assign(line=lambda f, s=name: s + " " + f["group"])
        for run, name in zip(compared.runs, compared.sweep_names, strict=True)
    ]
    found = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if found.empty:
        return found
    tags = compared.trials[["trial_id", "config", "configuration"]]
    return found.merge(tags, on="trial_id", how="inner").assign(
        attack=lambda f: f["attack"].fillna("")
    )


def _chart(rows: pd.DataFrame, compared: Compared, quantity: str, attack: str) -> dict[str, Any]:
    summary = charts.summarise(rows, ["input_dim", "line"], "value")
    x = alt.X("input_dim:Q", title="input dimension d = C·H·W", scale=alt.Scale(type="log"))
    name = TITLES[quantity] + (f" ({attack})" if attack else "")
    return charts.trend(
        summary, compared.configs, x=x, y_title=name, title=f"{name} against d",
        y_format=".3~g", band=False, connect="line",
    )  # fmt: skip


def exponent_table(compared: Compared) -> str:
    columns = [
        ("sweep", "sweep"), ("group", "group"), ("attack", "attack"), ("quantity", "quantity"),
        ("exponent", "exponent k (value ∝ d^k)"), ("interval", "95% interval over seeds"),
        ("n_seeds", "seeds"), ("predicted", "predicted k"), ("consistent", "interval holds it"),
        ("claim", "claim"),
    ]  # fmt: skip
    rows = []
    for run, sweep in zip(compared.runs, compared.sweep_names, strict=True):
        for fit in run.dimension_exponents().to_dict("records"):
            attack = fit["attack"] if isinstance(fit["attack"], str) else ""  # null: gradients
            rows.append(Row({
                "sweep": text_cell(sweep), "group": text_cell(fit["group"]),
                "attack": text_cell(attack), "quantity": text_cell(fit["quantity"]),
                "exponent": _number_cell(fit["exponent"]),
                "interval": text_cell(charts.interval_text(fit["lo"], fit["hi"])),
                "n_seeds": _number_cell(fit["n_seeds"]),
                "predicted": _number_cell(fit["predicted"]),
                "consistent": text_cell(
                    {True: "yes", False: "no", None: "one seed"}[fit["consistent"]]
                ),
                "claim": text_cell(fit["claim"]),
            }))  # fmt: skip
    return table("dimension-exponents", columns, rows) if rows else ""


def _number_cell(value: float) -> Cell:
    return Cell(text=number(float(value), 3), value=float(value))


def render(compared: Compared) -> str:
    found = dimension_points(compared)
    if found.empty or found.groupby("line")["input_dim"].nunique().max() < 2:
        return ""  # no sweep varies d
    items = []
    pairs = found[["quantity", "attack"]].drop_duplicates().itertuples(index=False)
    for number_, (quantity, attack) in enumerate(pairs):
        rows = found[(found["quantity"] == quantity) & (found["attack"] == attack)]
        spec = _chart(rows, compared, quantity, attack)
        items.append(chart(f"dimension-{number_}", spec, shows=quantity, attack=attack))
    intro = (
        "Each point is a configuration's mean over seeds (bars: 95% interval, hollow points: "
        "each seed); gray lines join the resolutions of one setting. The table fits value ∝ d^k "
        "per seed (least squares on log-log) and gives k's mean and its 95% bootstrap interval "
        "over seeds. Distortions are each minimum-norm attack's mean over the examples it "
        "fooled; the rms exponent is the L2 one less 1/2 by definition (rms = L2/√d)."
    )
    body = chart_row(items) + exponent_table(compared)
    return section("dimension", "Distortion and gradients against input dimension", body, intro)
