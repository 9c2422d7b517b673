"""`advlab.load` on a large store: a small real sweep's files copied to N trials with new ids.

    python benchmarks/load_speed.py SEED_SWEEP_DIR --trials 1000 --out /tmp/big [--compact]

Each copy is the seed trial's files with the trial id replaced (file names, the trial_id
column, sweep.json), so every table holds N trials' rows as a real sweep writes them. Prints
the parquet file count and the load time (median of --repeat runs, each in a new process so no
cache of this process helps), before and after compaction when --compact is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def clone(seed: Path, out: Path, trials: int) -> None:
    """Copy the seed sweep's trial files to `trials` trials with new ids."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    recorded = json.loads((seed / "sweep.json").read_text())
    seeds = sorted(recorded["trials"])
    copies = -(-trials // len(seeds))
    ids = {
        (old, k): hashlib.sha256(f"{old}/{k}".encode()).hexdigest()[:10]
        for old in seeds
        for k in range(copies)
    }
    chosen = sorted(ids.items(), key=lambda item: (item[0][1], item[0][0]))[:trials]
    for table in sorted(p for p in seed.iterdir() if p.is_dir() and p.name != "models"):
        (out / table.name).mkdir()
        for path in sorted(table.glob("*.parquet")):
            old, _, part = path.name.removesuffix(".parquet").partition(".")
            if old not in seeds:  # a sweep-wide file (transfer): left out
                continue
            data = pq.read_table(path)
            for (source, _), new in chosen:
                if source == old:
                    column = pa.array([new] * len(data), data.schema.field("trial_id").type)
                    index = data.schema.get_field_index("trial_id")
                    copy = data.set_column(index, "trial_id", column)
                    name = f"{new}.{part}.parquet" if part else f"{new}.parquet"
                    pq.write_table(copy, out / table.name / name)
    entries = {
        new: recorded["trials"][old] | {"index": i} for i, ((old, _), new) in enumerate(chosen)
    }
    recorded["trials"] = entries
    recorded["versions"][-1]["trial_ids"] = list(entries)
    recorded["name"] = out.name
    (out / "sweep.json").write_text(json.dumps(recorded))


def timed_load(folder: Path) -> float:
    """Seconds for advlab.load and the examples with their images, in a new process (the
    import of advlab itself is not counted)."""
    code = (
        "import time, advlab, advlab.results; t = time.perf_counter(); "
        f"r = advlab.load({str(folder)!r}); r.examples(images=True); "
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure(folder: Path, repeat: int) -> tuple[int, float]:
    files = sum(1 for _ in folder.rglob("*.parquet"))
    return files, statistics.median(timed_load(folder) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=Path)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compact", action="store_true")
    args = parser.parse_args()
    clone(args.seed, args.out, args.trials)
    files, seconds = measure(args.out, args.repeat)
    print(f"{args.trials} trials, {files} parquet files: advlab.load {seconds:.2f} s")
    if args.compact:
        from advlab.compact import compact_sweep

        started = time.perf_counter()
        compact_sweep(str(args.out))
        took = time.perf_counter() - started
        files_after, after = measure(args.out, args.repeat)
        print(
            f"compacted in {took:.2f} s: {files_after} parquet files "
            f"({files / files_after:.0f}x fewer): advlab.load {after:.2f} s "
            f"({seconds / after:.1f}x faster)"
        )


if __name__ == "__main__":
    main()
