"""Trials that failed (with the reason they recorded) and trials that left no result yet."""

from __future__ import annotations

from advlab import manifest
from advlab.report.html import Row, section, table, text_cell
from advlab.report.load import Compared, sweep_labels
from advlab.tables import Status


def render(compared: Compared) -> str:
    rows = []
    for run, name in zip(compared.runs, compared.sweep_names, strict=True):
        failed = run.trials[run.trials["status"] != Status.OK]
        config = dict(zip(compared.trials["trial_id"], compared.trials["config"], strict=True))
        for row in failed.to_dict("records"):
            rows.append(_row(name, row["trial_id"], row["label"], row["status"], row["reason"]))
            rows[-1].config = config.get(row["trial_id"])
        labels = sweep_labels(run)
        present = set(run.trials["trial_id"])
        for trial in manifest.current_ids(run.manifest):
            if trial not in present:
                why = "listed in sweep.json, no trials row: still running, or its worker was lost"
                rows.append(_row(name, trial, labels.get(trial, trial), "no result", why))
    if not rows:
        return ""
    columns = [("sweep", "sweep"), ("trial", "trial"), ("trial_id", "id"),
               ("status", "status"), ("reason", "reason")]  # fmt: skip
    intro = "Left out of every table and chart above and below. Rerun the sweep to retry them."
    return section("failed", "Failed and unfinished trials", table("failed", columns, rows), intro)


def _row(sweep: str, trial_id: str, label: str, status: str, reason: str) -> Row:
    cells = {
        "sweep": text_cell(sweep),
        "trial": text_cell(label),
        "trial_id": text_cell(trial_id),
        "status": text_cell(status),
        "reason": text_cell(reason),
    }
    cells["reason"].cls = "text wrap"
    return Row(cells)
