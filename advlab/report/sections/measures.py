"""Every measure's table (Lipschitz bounds, unit analysis, density, the masking check, your own
measure's), one generic section each: per configuration and per value of the measure's
grouping columns, the mean of each numeric column (a share for true/false ones) with its 95%
interval over the rows behind it (its seeds, and for per-example measures its examples)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pyarrow as pa

from advlab.measures import registry
from advlab.report.html import (
    SHOWN_VALUES,
    Cell,
    Row,
    esc,
    estimate_cell,
    section,
    swatch_cell,
    table,
    text_cell,
)
from advlab.report.load import Compared
from advlab.report.select import rank_note, table_configs
from advlab.stats import estimate
from advlab.text import value_text

SKIP = {"trial_id", "example"}  # keys of the rows, not what was measured
ROWS = "95% percentile bootstrap over the rows behind the cell"


def columns_of(name: str, frame: pd.DataFrame) -> tuple[list[str], list[str], set[str]]:
    """(grouping columns, value columns, boolean value columns) of a measure table."""
    defn = registry.by_table(name)
    fields = list(defn.schema) if defn is not None else _guessed(frame)
    text = [f.name for f in fields if pa.types.is_string(f.type) and f.name not in SKIP]
    by = list(defn.report_by) if defn is not None and defn.report_by is not None else text
    flags = {f.name for f in fields if pa.types.is_boolean(f.type)}
    numeric = [
        f.name for f in fields if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    ]
    values = [c for c in [*numeric, *sorted(flags)] if c not in SKIP and c not in by]
    return by, values, flags


def _guessed(frame: pd.DataFrame) -> list[pa.Field]:
    """The fields of a table whose measure this process does not know, from its values."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    return [f for f in schema if not f.name.startswith("trial_")]


def measure_table(compared: Compared, name: str, frame: pd.DataFrame) -> str:
    defn = registry.by_table(name)
    by, values, flags = columns_of(name, frame)
    across = [c for c in (defn.report_across if defn is not None else ()) if c in by]
    down = [c for c in by if c not in across]
    spread = _spread(frame, across, values)  # (cell key, header, selector) per column
    body = []
    listed, hidden = table_configs(compared)
    for config in listed:
        mine = frame[frame["config"] == config.key]
        groups = mine.groupby(down, sort=False, dropna=False) if down else [((), mine)]
        for keys, rows in groups:
            if rows.empty:
                continue
            cells: dict[str, Cell] = {"configuration": swatch_cell(config.name, config.colour)}
            shown = keys if isinstance(keys, tuple) else (keys,)
            cells |= {k: text_cell(value_text(v)) for k, v in zip(down, shown, strict=True)}
            trials = rows["trial_id"].nunique()  # its seeds; a cell's data-n counts its rows
            cells["n"] = Cell(str(trials), value=float(trials))
            for key, _, (column, chosen) in spread:
                series = rows.loc[chosen(rows), column]
                series = series.astype("float64") if column in flags else series
                found = estimate(series)  # its values are the rows: seeds, or seeds' examples
                cells[key] = estimate_cell(found, column in flags, unit="values", method=ROWS)
            body.append(Row(cells, config.key))
    head = [("configuration", "configuration"), *[(k, k) for k in down], ("n", "trials")]
    head += [(key, header) for key, header, _ in spread]
    title = defn.summary if defn is not None and defn.summary else name
    note = rank_note(compared, len(listed), hidden)
    return f"<h3>{esc(title)}</h3>{note}" + table(f"measure-{name}", head, body, measure=name)


Selector = tuple[str, Callable[[pd.DataFrame], pd.Series]]


def _spread(
    frame: pd.DataFrame, across: list[str], values: list[str]
) -> list[tuple[str, str, Selector]]:
    """The value columns, each once per combination of the `across` columns' values (in the
    order each trial's rows give them), with a header naming it."""
    if not across:
        return [(v, v, (v, lambda rows: rows.index == rows.index)) for v in values]
    combos = _merged_order(frame, across)
    out = []
    for combo in combos:
        label = " ".join(dict.fromkeys(combo))  # "network network" reads "network"
        for v in values:
            key = "|".join([*combo, v])
            header = label if len(values) == 1 else f"{label} {v}"
            out.append((key, header, (v, _matching(across, combo))))
    return out


def _merged_order(frame: pd.DataFrame, across: list[str]) -> list[tuple[str, ...]]:
    """The combinations in an order that keeps every trial's own row order (a deeper net's
    extra layers go between the layers it shares with a shallower one and its network row)."""
    order: list[tuple[str, ...]] = []
    for _, rows in frame.groupby("trial_id", sort=False):
        at = -1
        for combo in dict.fromkeys(map(tuple, rows[across].astype(str).to_numpy().tolist())):
            if combo in order:
                at = order.index(combo)
            else:
                at += 1
                order.insert(at, combo)
    return order


def _matching(across: list[str], combo: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.Series]:
    def chosen(rows: pd.DataFrame) -> pd.Series:
        return (rows[across].astype(str) == list(combo)).all(axis=1)

    return chosen


def render(compared: Compared) -> str:
    ok = set(compared.ok_trials["trial_id"])
    blocks = [
        measure_table(compared, name, frame[frame["trial_id"].isin(ok)])
        for name, frame in compared.measures.items()
        if not frame.empty and frame["trial_id"].isin(ok).any()
    ]
    if not blocks:
        return ""
    intro = (
        "One table per measure (advlab.measures). The mean of the rows behind each cell (its "
        "seeds and, for per-example measures, its examples) with its 95% percentile bootstrap "
        "interval [lo, hi] over those rows, and the values themselves when there are at most "
        f"{SHOWN_VALUES}; true/false columns as the share that is true."
    )
    return section("measures", "Measures", "".join(blocks), intro)
