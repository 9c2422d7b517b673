"""The transfer table summarised for charts and W&B, whatever the sweep's size.

A chart library or W&B refuses or truncates data past a row cap (Altair's 5,000 rows, W&B's
10,000-row tables), and a 192-trial sweep's transfer table holds 450,000 rows, so nothing is
drawn or logged from the rows themselves:
- `summary`: one row per (attack, budget, kind, amplified_to, relation), the relation of
  target to source being `self`, `same configuration` (another seed of it), `other
  configuration` or `control <name>`; pooled counts and the error they make.
- `matrices`: per attack and budget, the adversarial error of sources (rows) x targets
  (columns): by trial while both fit MAX_SIDE, else by configuration (trials repeated over
  seeds pooled: errors summed over n summed), the first MAX_SIDE configurations in grid order
  when even those are too many; at most MAX_CELLS cells either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from advlab import manifest

MAX_SIDE = 48  # rows (and trial columns) of a matrix still readable as labelled cells
MAX_CELLS = 4_800  # under Altair's 5,000-row cap: one data row per cell
KEYS = ["attack", "budget", "kind", "amplified_to"]


@dataclass
class Matrix:
    frame: pd.DataFrame  # index: source labels; columns: target labels; errors in [0, 1]
    note: str  # how it was summarised ("" when every pair is a cell)


def in_order(frame: pd.DataFrame, recorded: dict[str, Any] | None) -> pd.DataFrame:
    """Rows by source, then target, in the sweep's trial order, controls after the trials in
    the order the sweep lists them: shard files come back in the order of their names (hashes),
    which is no order at all."""
    controls = ((recorded or {}).get("transfer") or {}).get("controls") or []
    rank = {t: i for i, t in enumerate([*manifest.trial_order(recorded), *controls])}
    keys = pd.DataFrame(
        {
            "s": frame["source_trial"].map(lambda t: rank.get(t, len(rank))).to_numpy(),
            "t": frame["target"].map(lambda t: rank.get(t, len(rank))).to_numpy(),
        }
    )  # by position: a frame read from many files may repeat index labels
    ordered = keys.sort_values(["s", "t"], kind="stable").index
    return frame.iloc[ordered].reset_index(drop=True)


def with_errors(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of errors per row; rows written before the counts existed give them back from
    the exact fractions (error * n is a whole number to float64's precision)."""
    errors = frame["errors_adv"] if "errors_adv" in frame else pd.Series(pd.NA, index=frame.index)
    rebuilt = (frame["error_adv"].astype(float) * frame["n"].astype(float)).round()
    return frame.assign(errors=errors.astype("Float64").fillna(rebuilt).astype(float))


def relation(frame: pd.DataFrame, config: dict[str, str]) -> pd.Series:
    """What each row's target is to its source."""
    source = frame["source_trial"].map(lambda t: config.get(t, t))
    target = frame["target"].map(lambda t: config.get(t, t))
    named = (
        frame["target_kind"]
        .eq("control")
        .map({True: "control ", False: ""})
        .str.cat(frame["target"].astype(str))
    )
    out = pd.Series("other configuration", index=frame.index)
    out[source == target] = "same configuration"
    out[frame["source_trial"] == frame["target"]] = "self"
    out[frame["target_kind"] == "control"] = named[frame["target_kind"] == "control"]
    return out


def summary(frame: pd.DataFrame, config: dict[str, str]) -> pd.DataFrame:
    """Pooled transfer per (attack, budget, kind, amplified_to, relation): a handful of rows
    whatever the number of trials. `config`: trial id -> its configuration's name."""
    if frame.empty:
        return pd.DataFrame(columns=[*KEYS, "relation", "pairs", "n", "errors", "error"])
    rows = with_errors(frame).assign(relation=lambda f: relation(f, config))
    grouped = rows.groupby([*KEYS, "relation"], dropna=False, sort=True)
    out = grouped.agg(pairs=("n", "size"), n=("n", "sum"), errors=("errors", "sum"))
    out = out.reset_index().astype({"n": int, "errors": int, "amplified_to": float})
    return out.assign(budget=out["budget"].astype(float), error=out["errors"] / out["n"])


def matrices(
    frame: pd.DataFrame, labels: dict[str, str], config: dict[str, str]
) -> dict[str, Matrix]:
    """Per attack (and budget): error on adversarial examples, sources x targets, named by
    labels (controls by their own names) in the order they come, summarised past MAX_SIDE."""
    out = {}
    adversarial = frame[frame["kind"] == "adversarial"] if len(frame) else frame
    for (attack, budget), group in adversarial.groupby(["attack", "budget"], dropna=False):
        name = attack if pd.isna(budget) else f"{attack}@{budget:g}"
        out[name] = _matrix(with_errors(group), labels, config)
    return out


def _matrix(group: pd.DataFrame, labels: dict[str, str], config: dict[str, str]) -> Matrix:
    trials = group["target_kind"] != "control"
    sources = group["source_trial"].nunique()
    note = ""
    names = labels
    if max(sources, group.loc[trials, "target"].nunique()) > MAX_SIDE:
        names = {t: config.get(t, labels.get(t, t)) for t in set(group["source_trial"])}
        names |= {t: config.get(t, labels.get(t, t)) for t in set(group.loc[trials, "target"])}
        note = "by configuration (seeds pooled)"
    rows = group["source_trial"].map(lambda t: names.get(t, t))
    cols = group["target"].map(lambda t: names.get(t, t))
    pooled = group.assign(row=rows, col=cols).groupby(["row", "col"], sort=False)
    cells = pooled[["errors", "n"]].sum().astype(float)
    table = (cells["errors"] / cells["n"]).unstack("col")
    order_rows = list(dict.fromkeys(rows))
    order_cols = list(dict.fromkeys(cols[trials])) + list(dict.fromkeys(cols[~trials]))
    if len(order_rows) > MAX_SIDE or len(order_cols) * min(len(order_rows), MAX_SIDE) > MAX_CELLS:
        total = len(order_rows)
        order_rows = order_rows[:MAX_SIDE]
        shown = [c for c in order_cols if c in set(order_rows) or c in set(cols[~trials])]
        order_cols = shown[: MAX_CELLS // max(1, len(order_rows))]
        note = f"{note or 'by trial'}; the first {len(order_rows)} of {total} in grid order"
    return Matrix(table.reindex(index=order_rows, columns=order_cols), note)
