"""The paper's other properties per configuration: Lipschitz upper bounds per layer (§4.3,
Table 5) and any other analysis (unit analysis, density) as one column per layer and metric."""

from __future__ import annotations

import pandas as pd

from advlab.report.html import Cell, Row, estimate_cell, section, swatch_cell, table
from advlab.report.load import Compared
from advlab.stats import estimate

TITLES = {
    "lipschitz": "Lipschitz upper bounds per layer (§4.3, Table 5)",
    "unit_analysis": "Unit analysis (§3)",
    "density": "Adversarial-example density",
}
LAST = "network"  # the whole network's bound closes its row


def columns_of(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(layer|metric, header) in the order the layers run, the whole network last."""
    pairs = list(dict.fromkeys(zip(rows["layer"], rows["metric"], strict=True)))
    pairs.sort(key=lambda pair: pair[0] == LAST)  # stable: layer order is kept
    single = len({m for _, m in pairs}) == 1
    return [
        (f"{layer}|{metric}", layer if single else f"{layer} {metric}") for layer, metric in pairs
    ]


def analysis_table(compared: Compared, analysis: str, rows: pd.DataFrame) -> str:
    columns = columns_of(rows)
    keyed = rows.assign(column=rows["layer"] + "|" + rows["metric"])
    body = []
    for config in compared.configs:
        mine = keyed[keyed["config"] == config.key]
        if mine.empty:
            continue
        cells: dict[str, Cell] = {"configuration": swatch_cell(config.name, config.colour)}
        for column, _ in columns:
            cells[column] = estimate_cell(
                estimate(mine.loc[mine["column"] == column, "value"]), False
            )
        cells["seeds"] = Cell(str(mine["trial_id"].nunique()))
        body.append(Row(cells, config.key))
    head = [("configuration", "configuration"), ("seeds", "seeds"), *columns]
    return f"<h3>{TITLES.get(analysis, analysis)}</h3>" + table(
        f"properties-{analysis}", head, body
    )


def render(compared: Compared) -> str:
    properties = compared.properties
    ok = set(compared.ok_trials["trial_id"])
    properties = properties[properties["trial_id"].isin(ok)] if not properties.empty else properties
    if properties.empty:
        return ""
    blocks = [
        analysis_table(compared, str(analysis), rows)
        for analysis, rows in properties.groupby("analysis", sort=False)
    ]
    intro = "Mean over seeds ± half-width of the 95% interval."
    return section("properties", "Properties", "".join(blocks), intro)
