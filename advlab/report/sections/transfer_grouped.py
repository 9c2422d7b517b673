"""Transfer beyond a readable size: trials pooled by configuration (their seeds together).

Past `matrix_trials` source trials a per-trial matrix is no longer read by anyone, and its
cells grow with the square of the trials. Here each row is a source configuration and each
column a target configuration or control: the mean error over every (source trial, target
trial) pair between them, each trial's own model apart in an `own model` column (that is the
attack's success rate, not transfer). Past `matrix_configs` configurations the matrix keeps the
best ones by the report's rank metric, and a summary lists every configuration (up to the
table limit) in one row: own model, the other seeds of its configuration, the other
configurations, each control. So the page grows with the configurations, not with their square.
"""

from __future__ import annotations

import math

import pandas as pd

from advlab.report.html import Cell, Row, esc, percent, table, text_cell
from advlab.report.load import Compared, Config
from advlab.report.sections.transfer_cells import budget_text, heat, kind_title
from advlab.report.select import rank_note, ranked, table_configs

OWN = "own"  # a source's examples on its own model
SAME = "same"  # on the other seeds of its configuration
OTHER = "other"  # on the models of every other configuration


def pairs(rows: pd.DataFrame, config_of: dict[str, str]) -> pd.DataFrame:
    """The rows with their source configuration (`row`), the column they pool into
    (OWN, a target configuration or a control) and their category for the summary."""
    source = rows["source_trial"].map(config_of)
    target = rows["target"].map(config_of)
    own = rows["target"] == rows["source_trial"]
    column = target.where(target.notna(), rows["target"]).where(~own, OWN)
    category = rows["target"].where(target.isna(), OTHER)
    category = category.where(~(target == source), SAME).where(~own, OWN)
    return rows.assign(row=source, column=column, category=category)


def pooled(rows: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean error (perturbed and clean), examples and pairs per (row, `by`)."""
    return (
        rows.groupby(["row", by], sort=False)
        .agg(
            error_adv=("error_adv", "mean"),
            error_clean=("error_clean", "mean"),
            n=("n", "sum"),
            pairs=("error_adv", "size"),
        )
        .reset_index()
    )


def heat_cell(found: pd.Series | None, who: str) -> Cell:
    if found is None:
        return Cell()
    value = float(found["error_adv"])
    return Cell(
        percent(value), value=value, cls="cell", attrs={"style": heat(value),
        "data-pairs": str(int(found["pairs"]))},
        title=f"{who}: {percent(value)} wrong, mean of {int(found['pairs'])} pairs "
        f"(clean {percent(float(found['error_clean']))}, n = {int(found['n'])})",
    )  # fmt: skip


def pooled_matrix(
    rows: pd.DataFrame, noise: pd.DataFrame, configs: list[Config], controls: list[str],
    attrs: dict[str, str],
) -> str:  # fmt: skip
    """Source configurations x (own model, target configurations, controls)."""
    keys = [c.key for c in configs]
    mine = rows[rows["row"].isin(keys) & (rows["column"].isin([OWN, *keys, *controls]))]
    cells = pooled(mine, "column").set_index(["row", "column"])
    names = {c.key: c.name for c in configs}
    columns = [("source", "examples made on"), (OWN, "own model")]
    columns += [(k, names[k]) for k in keys] + [(c, c) for c in controls] + [("rms", "mean rms")]
    body = []
    for config in configs:
        row_cells: dict[str, Cell] = {"source": text_cell(config.name)}
        for key, title in columns[1:-1]:
            found = cells.loc[(config.key, key)] if (config.key, key) in cells.index else None
            row_cells[key] = heat_cell(found, f"{title} on {config.name}'s examples")
        rms = float(mine.loc[mine["row"] == config.key, "rms"].mean())
        row_cells["rms"] = Cell(f"{rms:.3f}" if math.isfinite(rms) else "", value=rms)
        body.append(Row(row_cells, config.key))
    for stddev, group in noise.groupby("budget", sort=True):
        pooled_noise = pooled(group.assign(row="noise"), "column").set_index("column")
        row_cells = {"source": text_cell(f"Gaussian noise σ = {stddev:g}")}
        for key, title in columns[2:-1]:
            found = pooled_noise.loc[key] if key in pooled_noise.index else None
            row_cells[key] = heat_cell(found, f"{title} on noise")
        body.append(Row(row_cells))
    header = {k: "col" for k, _ in columns[1:-1]}
    return table("transfer", columns, body, cls="matrix", header_class=header, grouped="config",
                 **attrs)  # fmt: skip


def summary(rows: pd.DataFrame, configs: list[Config], controls: list[str], sweep: str,
            attack: str, budget: str) -> str:  # fmt: skip
    """One row per configuration: own model, other seeds, other configurations, each control."""
    cells = pooled(rows, "category").set_index(["row", "category"])
    columns = [("source", "examples made on"), (OWN, "own model"), (SAME, "other seeds"),
               (OTHER, "other configurations"), *[(c, c) for c in controls]]  # fmt: skip
    body = []
    for config in configs:
        row_cells: dict[str, Cell] = {"source": text_cell(config.name)}
        for key, title in columns[1:]:
            found = cells.loc[(config.key, key)] if (config.key, key) in cells.index else None
            row_cells[key] = heat_cell(found, f"{title} on {config.name}'s examples")
        body.append(Row(row_cells, config.key))
    return table("transfer-summary", columns, body, cls="matrix summary", sweep=sweep,
                 attack=attack, budget=budget)  # fmt: skip


def blocks(compared: Compared, made: pd.DataFrame, noise: pd.DataFrame, sweep: str) -> str:
    """Per attack (at its largest budget; other budgets and kinds folded out): the pooled
    matrix of the configurations shown, and the summary when some are not in it."""
    config_of = dict(zip(compared.trials["trial_id"], compared.trials["config"], strict=True))
    configs = [c for c in compared.configs if c.sweep == sweep]
    limit = compared.settings.matrix_configs
    in_matrix = configs
    if len(configs) > limit:
        settings = compared.settings
        order = ranked(compared, settings.rank_by, settings.descending)
        in_matrix = [c for c in order if c.sweep == sweep][:limit]
    listed, hidden = table_configs(compared)
    listed = [c for c in listed if c.sweep == sweep]
    controls = list(dict.fromkeys(made.loc[made["target_kind"] != "trial", "target"]))
    tagged = pairs(made, config_of)
    noise = pairs(noise.assign(source_trial=""), config_of)
    out = []
    for attack, runs in tagged.groupby("attack", sort=False):
        budgets = sorted(runs["budget"].dropna().unique(), reverse=True) or [None]
        parts = []
        for number, budget in enumerate(budgets):
            group = runs if budget is None else runs[runs["budget"] == budget]
            shown = budget_text(budget)
            name = attack if not shown else f"{attack} at ε = {shown}"
            inner = ""
            for (kind, to), rows in group.groupby(["kind", "amplified_to"], sort=False,
                                                  dropna=False):  # fmt: skip
                attrs = {"sweep": sweep, "attack": str(attack), "budget": shown,
                         "kind": str(kind), "amplified_to": budget_text(to)}  # fmt: skip
                one = pooled_matrix(rows, noise if kind == "adversarial" else noise.iloc[0:0],
                                    in_matrix, controls, attrs)  # fmt: skip
                if kind == "adversarial":
                    inner = one + inner
                else:
                    inner += f"<details><summary>{esc(kind_title(str(kind), to))}</summary>"
                    inner += f"{one}</details>"
            if number == 0 and len(configs) > limit:
                adversarial = group[group["kind"] == "adversarial"]
                inner += (
                    "<h5>Every configuration, pooled</h5>"
                    + rank_note(compared, len(listed), hidden)
                    + summary(adversarial, listed, controls, sweep, str(attack), shown)
                )
            head = f"<h4>{esc(name)}</h4>"
            parts.append(head + inner if number == 0 else f"<details><summary>{esc(name)}"
                         f"</summary>{inner}</details>")  # fmt: skip
        out.append(f'<div class="matrix-block">{"".join(parts)}</div>')
    note = ""
    if len(configs) > limit:
        note = (f'<p class="note">{len(in_matrix)} of {len(configs)} configurations in each '
                "matrix (the best by the report's rank metric); the summary below each "
                "lists them all.</p>")  # fmt: skip
    return note + f'<div class="matrices">{"".join(out)}</div>'
