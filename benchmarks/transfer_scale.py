"""The transfer stage's time and rows as a sweep grows, `pairs: sample` beside `pairs: all`.

Runs on finished sweeps of benchmarks/transfer_scale.yaml (trained with transfer off), e.g.

    advlab sweep benchmarks/transfer_scale.yaml --storage /tmp/ts --set name=ts16
    advlab sweep benchmarks/transfer_scale.yaml --storage /tmp/ts --set name=ts64 \\
        --set 'grid.seed=[0,1,...,31]'
    python benchmarks/transfer_scale.py /tmp/ts/ts16 /tmp/ts/ts64 --pairs sample all

For each sweep and each pairs setting the stage runs from nothing (its table and record
removed first), with the default controls, noise and amplified rows and an offline W&B run,
as Ray tasks on this machine's cores; the W&B run folders it makes are removed after.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from advlab.store import TRANSFER_RECORD, SweepStore
from advlab.sweep_settings import TransferSpec
from advlab.transfer import run_transfer
from advlab.tuning import init_ray


def fresh(sweep: Path) -> None:
    for name in ("transfer", "transfer_examples"):
        shutil.rmtree(sweep / name, ignore_errors=True)
    (sweep / TRANSFER_RECORD).unlink(missing_ok=True)
    for run in (sweep / "wandb").glob("*transfer*"):
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["sample", "all"])
    parser.add_argument("--sample", type=int, default=8)
    args = parser.parse_args()
    init_ray(None)
    print("| trials | pairs | source-target pairs | shards | rows | bytes | stage (s) |")
    print("|---|---|---|---|---|---|---|")
    for sweep in args.sweeps:
        trials = len(SweepStore.from_dir(str(sweep)).read("trials", ["trial_id"]))
        for pairs in args.pairs:
            settings = TransferSpec(pairs=pairs, sample=args.sample, max_pairs=10**8)
            fresh(sweep)
            start = time.perf_counter()
            outcome = run_transfer(str(sweep), settings, wandb_mode="offline")
            seconds = time.perf_counter() - start
            assert not outcome.failed_targets, outcome.failed_targets
            rows = outcome.rows
            pair_count = len(rows[["source_trial", "target"]].drop_duplicates())
            size = sum(f.stat().st_size for f in (sweep / "transfer").glob("*.parquet"))
            print(
                f"| {trials} | {pairs} | {pair_count:,} | {outcome.shards} | {len(rows):,} | "
                f"{size / 1e6:.1f} MB | {seconds:.1f} |",
                flush=True,
            )
            fresh(sweep)


if __name__ == "__main__":
    main()
