"""Every measure's table (Lipschitz bounds, unit analysis, density, the masking check, your own
measure's), one generic section each: per configuration and per value of the measure's
grouping columns, the mean of each numeric column (a share for true/false ones) with its 95%
interval over the rows behind it (its seeds, and for per-example measures its examples)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from advlab.measures import registry
from advlab.report.html import (
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
from advlab.stats import estimate
from advlab.text import value_text

SKIP = {"trial_id", "example"}  # keys of the rows, not what was measured


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
    by, values, flags = columns_of(name, frame)
    body = []
    for config in compared.configs:
        mine = frame[frame["config"] == config.key]
        groups = mine.groupby(by, sort=False, dropna=False) if by else [((), mine)]
        for keys, rows in groups:
            if rows.empty:
                continue
            cells: dict[str, Cell] = {"configuration": swatch_cell(config.name, config.colour)}
            shown = keys if isinstance(keys, tuple) else (keys,)
            cells |= {k: text_cell(value_text(v)) for k, v in zip(by, shown, strict=True)}
            cells["n"] = Cell(str(len(rows)), value=float(len(rows)))
            for column in values:
                series = rows[column].astype("float64") if column in flags else rows[column]
                cells[column] = estimate_cell(estimate(series), column in flags)
            body.append(Row(cells, config.key))
    head = [("configuration", "configuration"), *[(k, k) for k in by], ("n", "rows")]
    head += [(v, v) for v in values]
    defn = registry.by_table(name)
    title = defn.summary if defn is not None and defn.summary else name
    return f"<h3>{esc(title)}</h3>" + table(f"measure-{name}", head, body, measure=name)


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
        "One table per measure (advlab.measures). Mean ± half-width of the 95% interval over "
        "the rows behind each cell: its seeds and, for per-example measures, its examples; "
        "true/false columns as the share that is true."
    )
    return section("measures", "Measures", "".join(blocks), intro)
