"""What ASHA saves: the same grid sweep run to the end and with ASHA early stopping, side by side.

    .venv/bin/python benchmarks/asha.py [--sweep sweeps/asha_digits.yaml] [--storage DIR]

Core-seconds are the trials' own work, summed: every epoch's training time (the epochs table,
which holds a stopped trial's epochs too) plus every attack run's time (the attacks table).
Both runs use the same file; the full run only sets scheduler.name=none. The best point is the
ok trial with the lowest test error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import advlab
from advlab import results


def run(sweep: str, storage: str, scheduler: str) -> dict[str, Any]:
    spec = advlab.load_sweep(
        sweep, **{"scheduler.name": scheduler, "storage": storage, "wandb.mode": "disabled"}
    )
    start = time.perf_counter()
    outcome = advlab.run(spec)
    wall = time.perf_counter() - start
    res = results.load(outcome.store.uri)
    ok = res.trials[res.trials["status"] == "ok"]
    best = ok.loc[ok["test_error"].idxmin()]
    core = float(res.epochs["seconds"].sum() + res.attacks["seconds"].sum())
    return {
        "scheduler": scheduler,
        "wall_seconds": round(wall, 1),
        "core_seconds": round(core, 1),
        "epochs_trained": len(res.epochs),
        "trials_ok": len(ok),
        "trials_stopped": int((res.trials["status"] == "stopped").sum()),
        "best": str(best["label"]),
        "best_test_error": float(best["test_error"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", default="sweeps/asha_digits.yaml")
    parser.add_argument("--storage", default=tempfile.mkdtemp(prefix="asha-bench-"))
    args = parser.parse_args()
    full = run(args.sweep, f"{args.storage}/full", "none")
    asha = run(args.sweep, f"{args.storage}/asha", "asha")
    print(json.dumps([full, asha], indent=2))
    print(
        f"ASHA: {asha['core_seconds'] / full['core_seconds']:.2f}x the core-seconds, "
        f"{asha['epochs_trained']} of {full['epochs_trained']} epochs; best: "
        f"{asha['best']} ({asha['best_test_error']:.4f}) vs {full['best']} "
        f"({full['best_test_error']:.4f})"
    )


if __name__ == "__main__":
    main()
