"""Transfer between models in the shape of the paper's Table 2: per sweep, one matrix per attack
and budget with the models the examples were made on as rows and the models (and non-neural
controls) they were fed to as columns; each cell is the column model's error on the row's
examples. The sweep's fixed-stddev Gaussian-noise rows close every matrix, as in the paper;
the per-example matched noise and the amplified perturbations (Table 4) fold out below it.
"""

from __future__ import annotations

import math

import pandas as pd

from advlab.report.html import Cell, Row, esc, percent, section, table, text_cell
from advlab.report.load import Compared
from advlab.report.sections import transfer_grouped as grouped
from advlab.report.sections.transfer_cells import budget_text, heat, kind_title
from advlab.results import Results
from advlab.tables import NOISE_SOURCE, Status


def orders(run: Results, rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Sources and targets in grid order; controls after the trials, in the order they ran."""
    trial_order = list(run.trials["trial_id"])
    rank = {t: i for i, t in enumerate(trial_order)}
    sources = sorted(
        set(rows["source_trial"]) - {NOISE_SOURCE}, key=lambda t: rank.get(t, len(rank))
    )
    trials = rows[rows["target_kind"] == "trial"]["target"]
    controls = list(dict.fromkeys(rows.loc[rows["target_kind"] != "trial", "target"]))
    return sources, sorted(set(trials), key=lambda t: rank.get(t, len(rank))) + controls


def matrix(
    run: Results, rows: pd.DataFrame, noise: pd.DataFrame, sweep: str, title: tuple[str, ...]
) -> str:
    """One matrix: rows of one (attack, budget, kind, amplified_to), then the fixed-stddev
    noise rows."""
    attack, budget, kind, amplified_to = title
    sources, targets = orders(run, pd.concat([rows, noise]))
    labels = run.labels
    columns = [("source", "examples made on")] + [(t, labels.get(t, t)) for t in targets]
    columns.append(("rms", "mean rms"))
    body = [_source_row(rows[rows["source_trial"] == s], s, labels, targets) for s in sources]
    for stddev, group in noise.groupby("budget", sort=True):
        body.append(_source_row(group, f"Gaussian noise σ = {stddev:g}", labels, targets))
    return table(
        "transfer", columns, body, cls="matrix", header_class={t: "col" for t in targets},
        sweep=sweep, attack=attack, budget=budget, kind=kind, amplified_to=amplified_to,
    )  # fmt: skip


def _source_row(rows: pd.DataFrame, source: str, labels: dict[str, str], targets: list[str]) -> Row:
    by_target = rows.set_index("target")
    cells: dict[str, Cell] = {"source": text_cell(labels.get(source, source))}
    for target in targets:
        if target not in by_target.index:
            continue
        found = by_target.loc[target]
        value = float(found["error_adv"])
        clean = percent(float(found["error_clean"]))
        who = f"{labels.get(target, target)} on {labels.get(source, source)}'s examples"
        cells[target] = Cell(
            percent(value), value=value, cls="cell diag" if target == source else "cell",
            attrs={"style": heat(value)},
            title=f"{who}: {percent(value)} wrong (clean {clean}, n = {found['n']})",
        )  # fmt: skip
    rms = float(rows["rms"].mean()) if len(rows) else math.nan
    cells["rms"] = Cell(f"{rms:.3f}" if math.isfinite(rms) else "", value=rms)
    return Row(cells)


def sweep_block(compared: Compared, run: Results, sweep: str) -> str:
    frame = run.transfer
    ok = frame[frame["status"].fillna(Status.OK) == Status.OK]
    shown = set(compared.trials["trial_id"])  # the trials the report's filters kept
    ok = ok[(ok["target_kind"] != "trial") | ok["target"].isin(shown)]
    noise = ok[(ok["source_trial"] == NOISE_SOURCE) & (ok["kind"] == "noise")]
    made = ok[ok["source_trial"].isin(shown)]
    if made["source_trial"].nunique() > compared.settings.matrix_trials:
        blocks = grouped.blocks(compared, made, noise, sweep)
    else:
        blocks = per_trial_blocks(run, made, noise, sweep)
    failed = frame[frame["status"].fillna(Status.OK) != Status.OK]
    notes = "".join(
        f'<p class="note flag">Target {esc(row["target"])} failed: {esc(row["reason"])}</p>'
        for row in failed.drop_duplicates("target").to_dict("records")
    )
    return f"<h3>{esc(sweep)}</h3>{notes}{blocks}"


def per_trial_blocks(run: Results, made: pd.DataFrame, noise: pd.DataFrame, sweep: str) -> str:
    """Per attack: the matrix at its largest budget, its other budgets and its noise and
    amplified rows folded out below (one matrix per attack open, however many budgets)."""
    blocks = []
    for attack, runs in made.groupby("attack", sort=False):
        parts = []
        budgets = sorted(runs["budget"].dropna().unique(), reverse=True) or [None]
        for number, budget in enumerate(budgets):
            group = runs if budget is None else runs[runs["budget"] == budget]
            shown = budget_text(budget)
            name = attack if not shown else f"{attack} at ε = {shown}"
            adversarial = group[group["kind"] == "adversarial"]
            inner = matrix(run, adversarial, noise, sweep, (attack, shown, "adversarial", ""))
            inner += "".join(
                folded(kind_title(str(kind), to), matrix(run, rows, noise.iloc[0:0], sweep,
                       (attack, shown, str(kind), budget_text(to))))
                for (kind, to), rows in group[group["kind"] != "adversarial"].groupby(
                    ["kind", "amplified_to"], sort=False, dropna=False)
            )  # fmt: skip
            parts.append(f"<h4>{esc(name)}</h4>{inner}" if number == 0 else folded(name, inner))
        blocks.append(f'<div class="matrix-block">{"".join(parts)}</div>')
    return f'<div class="matrices">{"".join(blocks)}</div>'


def folded(summary: str, inner: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{inner}</details>"


def render(compared: Compared) -> str:
    blocks = [
        sweep_block(compared, run, name)
        for run, name in zip(compared.runs, compared.sweep_names, strict=True)
        if not run.transfer.empty
    ]
    if not blocks:
        return ""
    intro = (
        "Error of each column's model on the examples made for each row's model (the paper's "
        "Table 2). The outlined diagonal is the attack's own success rate; the last column the "
        "perturbation's mean rms. Controls are non-neural models trained on the source's data."
    )
    return section("transfer", "Transfer between models", "".join(blocks), intro)
