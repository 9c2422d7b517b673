"""Table 1 of the paper, one row per configuration (repeats over seeds: mean, 95% interval, seeds).

Model, weight decay and the other grid values; train, test and held-out error; for every
minimisation attack the mean minimum distortion in its own norm and its success rate; for every
fixed-budget attack the success rate at each budget; and, when a measure of the sweeps can
raise a flag, which measures flagged the configuration's trials (their reasons on hover). Kinds
and norms come from the attacks table, and flags from the measures table, so an attack or a
measure added to the registry gets its columns with no change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from advlab.report.html import Cell, Row, esc, estimate_cell, section, swatch_cell, table, text_cell
from advlab.report.load import Compared, Config
from advlab.report.sections.robust import norm_title
from advlab.report.select import rank_note, table_configs
from advlab.stats import METHOD, RATE_METHOD, estimate
from advlab.tables import RATE_COUNTS, Status
from advlab.trial import flags, measure_defn

FLAGS = "flags"  # the column of the measures' flags (masking, health, any measure with a flag)
ERRORS = (("train_error", "train error"), ("test_error", "test error"),
          ("heldout_error", "held-out error"))  # fmt: skip


@dataclass(frozen=True)
class Measure:
    """One numeric column: where its per-trial values come from."""

    key: str
    title: str
    as_percent: bool
    group: str = ""  # the attack variant it belongs to (a heading over its columns)


COUNT = "|count"  # suffix of a rate's column of per-trial example counts in measures()' frame


def measures(compared: Compared) -> tuple[list[Measure], pd.DataFrame]:
    """The columns and a frame of per-trial values (index trial_id, one column per key); a
    rate's count of examples per trial (advlab.tables.RATE_COUNTS) is column key + COUNT."""
    trials = compared.ok_trials.set_index("trial_id")
    columns = [Measure(k, t, True) for k, t in ERRORS if trials[k].notna().any()]
    values = trials[[m.key for m in columns]].astype(float)
    for m in columns:
        count = RATE_COUNTS[("trials", m.key)]
        if count in trials:  # a sweep written before n_test was recorded has none
            values[m.key + COUNT] = trials[count].astype(float)
    for variant, group in compared.attacks.groupby("variant", sort=False):
        norm = group["norm"].iloc[0]
        if group["kind"].iloc[0] == "minimization":
            rows = group.set_index("trial_id")
            found = [
                (Measure(f"{variant}|dist", f"mean min. {norm_title(norm)}", False, variant),
                 rows[f"mean_dist_{norm}"], None),
                (Measure(f"{variant}|success", "success", True, variant),
                 rows["success_rate"], rows["n"]),
            ]  # fmt: skip
        else:
            found = [
                (Measure(f"{variant}|success@{b:g}", f"ε = {b:g}", True,
                         f"{variant}: success within ε ({norm_title(norm)})"),
                 rows.set_index("trial_id")["success_rate"], rows.set_index("trial_id")["n"])
                for b, rows in sorted(group.groupby("budget"), key=lambda item: item[0])
            ]  # fmt: skip
        for measure, series, counts in found:
            columns.append(measure)
            values[measure.key] = series.astype(float).reindex(values.index)
            if counts is not None:
                values[measure.key + COUNT] = counts.astype(float).reindex(values.index)
    return columns, values


def render(compared: Compared) -> str:
    if compared.ok_trials.empty:
        return ""
    columns, values = measures(compared)
    raised = raised_flags(compared)
    listed, hidden = table_configs(compared)
    listed = [c for c in listed if any(t in values.index for t in c.trial_ids)]
    varying, constant = split_axes(compared.axes, listed)
    head = [("configuration", "configuration")]
    head += [(a, a) for a in varying] + [("seeds", "seeds")]
    head += [(m.key, m.title) for m in columns]
    head += [(FLAGS, "flags")] if raised is not None else []
    rows = []
    for config in listed:
        ids = [t for t in config.trial_ids if t in values.index]
        rows.append(_row(varying, config, columns, values.loc[ids], raised))
    groups = {m.key: m.group for m in columns}
    intro = (
        "One row per configuration: trials that differ only in their seed are repeats, shown as "
        "their mean, its interval [lo, hi] and each seed's value beneath. Rates (errors, "
        f"success) whose count of examples is stored get the {RATE_METHOD}; distortions and "
        f"rates of older sweeps without counts the {METHOD} (hover a cell for its method). "
        "Distortions are means over the "
        "successful examples, in the attack's own norm (rms is the paper's "
        "sqrt(mean((x'−x)²)) over pixels in [0, 1])."
    )
    if raised is not None:
        intro += (
            " Flags: the measures that found a reason to look closer at a configuration's "
            "trials (gradient masking, evaluation health, ...); hover for their reasons."
        )
    body = _constant_caption(constant) + rank_note(compared, len(listed), hidden)
    body += table("table1", head, rows, groups=groups)
    return section("table1", "Table 1: errors and minimum distortion", body, intro)


def split_axes(axes: list[str], configs: list[Config]) -> tuple[list[str], dict[str, str]]:
    """(axes whose value differs between the listed configurations, {axis: its one value} of
    the others): a constant axis is said once above the table instead of in every row."""
    varying, constant = [], {}
    for axis in axes:
        values = {c.values.get(axis, "—") for c in configs}
        if len(values) > 1:
            varying.append(axis)
        else:
            constant[axis] = next(iter(values), "—")
    return varying, constant


def _constant_caption(constant: dict[str, str]) -> str:
    if not constant:
        return ""
    items = "; ".join(f"{esc(a)} = {esc(v)}" for a, v in constant.items())
    return f'<p class="note" data-constant-axes>Every row: {items}.</p>'


def _row(
    axes: list[str],
    config: Config,
    columns: list[Measure],
    values: pd.DataFrame,
    raised: pd.DataFrame | None,
) -> Row:
    cells: dict[str, Cell] = {"configuration": swatch_cell(config.name, config.colour)}
    cells |= {a: Cell(config.values.get(a, "—"), cls="text axis") for a in axes}
    cells["seeds"] = Cell(str(len(values)), value=float(len(values)))
    for measure in columns:
        counts = values.get(measure.key + COUNT)  # a rate over known examples: seeds and examples
        found = estimate(values[measure.key], counts)
        cells[measure.key] = estimate_cell(found, measure.as_percent)
    if raised is not None:
        cells[FLAGS] = _flags_cell(raised, list(values.index))
    return Row(cells, config.key)


def raised_flags(compared: Compared) -> pd.DataFrame | None:
    """(trial_id, measure, flag) of every flag a measure run raised on an ok trial (from the
    measures table, as W&B and the sweep's summary see them); None when no measure run of the
    sweeps could raise one (no measure there defines a flag), so the column is left out."""
    ok = set(compared.ok_trials["trial_id"])
    records = [r.measures for r in compared.runs if not r.measures.empty]
    if not records:
        return None
    runs = pd.concat(records, ignore_index=True)
    runs = runs[(runs["status"] == Status.OK) & runs["trial_id"].isin(ok)]
    can = [
        _can_flag(name) or bool(flag)
        for name, flag in zip(runs["name"], runs["flag"].fillna(""), strict=True)
    ]
    if not any(can):
        return None
    found = [
        (trial, measure, reason)
        for trial, raised in flags(runs).items()
        for measure, reason in raised.items()
    ]
    return pd.DataFrame(found, columns=["trial_id", "measure", "flag"])


def _can_flag(name: str) -> bool:
    defn = measure_defn(name)
    return defn is not None and defn.flag is not None


def _flags_cell(raised: pd.DataFrame, trial_ids: list[str]) -> Cell:
    """Each measure that flagged some of the configuration's trials (how many, with seeds), its
    reasons on hover; or "no"."""
    mine = raised[raised["trial_id"].isin(trial_ids)]
    if mine.empty:
        return text_cell("no")
    parts, reasons = [], []
    for measure, group in mine.groupby("measure", sort=True):  # the same order in every row
        count = group["trial_id"].nunique()
        parts.append(f"{measure} ({count} of {len(trial_ids)})" if len(trial_ids) > 1 else measure)
        reasons.append(f"{measure}: " + "; ".join(dict.fromkeys(group["flag"])))
    text = ", ".join(parts)
    return Cell(text, cls="text flag", title=" | ".join(reasons), raw=f"⚠ {esc(text)}")
