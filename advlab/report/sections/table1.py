"""Table 1 of the paper, one row per configuration (repeats over seeds as mean ± 95% interval).

Model, weight decay and the other grid values; train, test and held-out error; for every
minimisation attack the mean minimum distortion in its own norm and its success rate; for every
fixed-budget attack the success rate at each budget. Kinds and norms come from the attacks
table, so an attack added to the registry gets its columns with no change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from advlab.report.html import Cell, Row, esc, estimate_cell, section, swatch_cell, table, text_cell
from advlab.report.load import Compared, Config
from advlab.report.sections.robust import norm_title
from advlab.stats import estimate

MASKING = "masking"  # the masking check's table; its column shows where a check ran (not null)
ERRORS = (("train_error", "train error"), ("test_error", "test error"),
          ("heldout_error", "held-out error"))  # fmt: skip


@dataclass(frozen=True)
class Measure:
    """One numeric column: where its per-trial values come from."""

    key: str
    title: str
    as_percent: bool
    group: str = ""  # the attack variant it belongs to (a heading over its columns)


def measures(compared: Compared) -> tuple[list[Measure], pd.DataFrame]:
    """The columns and a frame of per-trial values (index trial_id, one column per key)."""
    trials = compared.ok_trials.set_index("trial_id")
    columns = [Measure(k, t, True) for k, t in ERRORS if trials[k].notna().any()]
    values = trials[[m.key for m in columns]].astype(float)
    attacks = compared.attacks
    for variant, group in attacks.groupby("variant", sort=False):
        if group["kind"].iloc[0] == "minimization":
            norm = group["norm"].iloc[0]
            found = [
                (Measure(f"{variant}|dist", f"mean min. {norm_title(norm)}", False, variant),
                 group.set_index("trial_id")[f"mean_dist_{norm}"]),
                (Measure(f"{variant}|success", "success", True, variant),
                 group.set_index("trial_id")["success_rate"]),
            ]  # fmt: skip
        else:
            norm = group["norm"].iloc[0]
            found = [
                (Measure(f"{variant}|success@{b:g}", f"ε = {b:g}", True,
                         f"{variant}: success within ε ({norm_title(norm)})"),
                 rows.set_index("trial_id")["success_rate"])
                for b, rows in sorted(group.groupby("budget"), key=lambda item: item[0])
            ]  # fmt: skip
        for measure, series in found:
            columns.append(measure)
            values[measure.key] = series.astype(float).reindex(values.index)
    return columns, values


def render(compared: Compared) -> str:
    if compared.ok_trials.empty:
        return ""
    columns, values = measures(compared)
    verdicts = compared.measures.get(MASKING)
    masking = verdicts is not None and bool(verdicts["flagged"].notna().any())
    head = [("configuration", "configuration")]
    head += [(a, a) for a in compared.axes] + [("seeds", "seeds")]
    head += [(m.key, m.title) for m in columns]
    head += [("masking", "gradient masking")] if masking else []
    rows = []
    for config in compared.configs:
        ids = [t for t in config.trial_ids if t in values.index]
        if ids:
            rows.append(_row(compared, config, columns, values.loc[ids], masking))
    groups = {m.key: m.group for m in columns}
    intro = (
        "One row per configuration: trials that differ only in their seed are repeats, shown as "
        "mean ± half-width of the 95% t-interval over seeds. Distortions are means over the "
        "successful examples, in the attack's own norm (rms is the paper's "
        "sqrt(mean((x'−x)²)) over pixels in [0, 1])."
    )
    body = table("table1", head, rows, groups=groups)
    return section("table1", "Table 1: errors and minimum distortion", body, intro)


def _row(
    compared: Compared, config: Config, columns: list[Measure], values: pd.DataFrame, masking: bool
) -> Row:
    cells: dict[str, Cell] = {"configuration": swatch_cell(config.name, config.colour)}
    cells |= {a: text_cell(config.values.get(a, "—")) for a in compared.axes}
    cells["seeds"] = Cell(str(len(values)), value=float(len(values)))
    for measure in columns:
        cells[measure.key] = estimate_cell(estimate(values[measure.key]), measure.as_percent)
    if masking:
        cells["masking"] = _masking_cell(compared, config)
    return Row(cells, config.key)


def _masking_cell(compared: Compared, config: Config) -> Cell:
    """Flagged when any seed's trial was flagged; the reasons on hover."""
    verdicts = compared.measures[MASKING]
    ok = set(compared.ok_trials["trial_id"])
    mine = verdicts[(verdicts["config"] == config.key) & verdicts["trial_id"].isin(ok)]
    flagged = mine[mine["flagged"].fillna(False).astype(bool)]
    if flagged.empty:
        return text_cell("no")
    reasons = "; ".join(dict.fromkeys(str(r) for r in flagged["reason"] if r))
    text = f"yes ({len(flagged)} of {len(mine)})" if len(mine) > 1 else "yes"
    return Cell(text, cls="text flag", title=reasons, raw=f"⚠ {esc(text)}: {esc(reasons)}")
