"""One measure run: the measure's function on a context, its rows keyed and checked against its
table's declared schema, and the record of the run (advlab.tables.MEASURES). A measure that
raises, or returns rows its schema refuses, costs that run only: its record says why."""

from __future__ import annotations

import json
import numbers
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from advlab.measures.registry import MeasureContext, Rows
from advlab.plan import MeasureRun
from advlab.plugins import describe
from advlab.tables import Status, table


@dataclass
class MeasureOutcome:
    data: pa.Table | None  # the rows as the measure's table; None when the run failed
    rows: Rows
    record: dict[str, Any]  # its row of the measures table


def execute(run: MeasureRun, ctx: MeasureContext, trial_id: str) -> MeasureOutcome:
    measure, defn = run.measure, run.measure.defn
    head = {
        "trial_id": trial_id,
        "measure": measure.key,
        "measure_id": run.run_id,
        "name": measure.name,
        "scope": defn.scope,
        "attack": None if run.attack is None else run.attack.key,
        "table": defn.table,
        "settings": json.dumps(measure.settings.model_dump(mode="json"), sort_keys=True),
    }
    start = time.perf_counter()
    try:
        rows = [keyed(dict(row), trial_id, run) for row in defn.run(ctx, measure.settings)]
        data = table(defn.table, rows)
        flag = (defn.flag(rows) if defn.flag is not None else None) or ""
    except (Exception, SystemExit) as err:  # a measure's own code may call sys.exit too
        failed = {"status": Status.FAILED, "reason": describe(err), "rows": 0, "flag": ""}
        return MeasureOutcome(None, [], head | failed | _seconds(start))
    done = {"status": Status.OK, "reason": "", "rows": len(rows), "flag": flag}
    return MeasureOutcome(data, rows, head | done | _seconds(start))


def keyed(row: dict[str, Any], trial_id: str, run: MeasureRun) -> dict[str, Any]:
    """A measure's row with the keys its scope fixes: the trial, and the attack run it saw."""
    row["trial_id"] = trial_id
    if run.attack is not None:
        row["attack"] = run.attack.key
    example = row.get("example")
    if run.measure.defn.scope == "example" and not isinstance(example, numbers.Integral):
        raise ValueError(
            f"{run.measure.key}: every row needs its `example` (the attacked example's position)"
        )
    return row


def _seconds(start: float) -> dict[str, float]:
    return {"seconds": time.perf_counter() - start}
