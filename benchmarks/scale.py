"""Sweeps of 16, 64, 256 and 1,024 tiny trials: what a sweep, its store and its report cost.

Each size is one real sweep through Ray Tune on the embedded digits: fc10 and fc32-10 over
seeds, 3 epochs, FGSM and L-BFGS on 20 examples, the default transfer stage with its controls,
W&B offline. Recorded per size: sweep wall time, the trial-work fraction (seconds the trials
recorded for training, attacks and measures, over wall x cores), files and bytes in the sweep
folder, parquet files, transfer rows and time, `advlab.load` time (a fresh process), report
build time and size, and the report's render time in headless Chromium (navigation until every
chart is drawn).

    nice -n 10 .venv/bin/python benchmarks/scale.py --trials 16 64 256 [--pairs sample]

`--pairs` is passed as `--set transfer.pairs=VALUE` (for advlab versions that have it). A size
whose sweep folder already holds a finished run (its `scale.json`) is not swept again: its
sweep figures are read back and load, report and render measured anew, so a changed report can
be measured on the same sweeps.

    nice -n 10 .venv/bin/python benchmarks/scale.py --synthetic --trials 256 1024 \
        --code /path/to/other/advlab/checkout

`--synthetic` writes schema-valid results instead of sweeping (tests/synthetic_results.py: a
wide grid, two seeds per configuration, 3 examples per attack run, 4 sampled transfer targets
per source) and measures only load, report and render; `--code` builds each report with
another advlab checkout as well (the same results, side by side, with the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECORD = "scale.json"  # the sweep's own figures, beside its results


def sweep_file(n: int, storage: Path) -> dict[str, Any]:
    return {
        "name": f"scale-{n}",
        "dataset": {"name": "digits"},
        "grid": {"model": ["fc10", "fc32-10"], "seed": list(range(n // 2))},
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.05, 0.1],
        "attack_examples": 20,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 20}],
        "resources": {"cpu": 1},
        "storage": str(storage),
        "wandb": {"mode": "offline", "project": "advlab-scale"},
    }


def advlab(*args: str, code: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(code), "WANDB_MODE": "offline"}
    # run from `code`: `python -m` puts the working directory ahead of PYTHONPATH
    return subprocess.run(
        [sys.executable, "-m", "advlab.cli", *args],
        env=env, capture_output=True, text=True, cwd=code,
    )  # fmt: skip


def run_sweep(n: int, storage: Path, pairs: str | None) -> dict[str, Any]:
    """Sweep n trials from the command line; its wall time, exit code and transfer time."""
    path = storage / f"scale-{n}.yaml"
    path.write_text(yaml.safe_dump(sweep_file(n, storage), sort_keys=False))
    extra = ["--set", f"transfer.pairs={pairs}"] if pairs else []
    start = time.perf_counter()
    done = advlab("sweep", str(path), *extra)
    wall = time.perf_counter() - start
    return {
        "trials": n,
        "exit": done.returncode,
        "wall_s": wall,
        "cores": os.cpu_count(),
        "transfer_s": _transfer_seconds(done.stdout + done.stderr),
        "transfer_record": (storage / f"scale-{n}" / "transfer.json").exists(),
        "tail": (done.stdout + done.stderr)[-600:],
    }


def _transfer_seconds(output: str) -> float | None:
    """From the sweep's own line: `advlab: transfer: A source trials x B targets, R rows in S s`."""
    for line in output.splitlines():
        if "transfer:" in line and " rows in " in line:
            return float(line.rsplit(" rows in ", 1)[1].split(" s")[0])
    return None


def folder_figures(folder: Path) -> dict[str, Any]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "parquet": sum(p.suffix == ".parquet" for p in files),
    }


def trial_work(folder: Path) -> tuple[float, int]:
    """Seconds the trials recorded (training, attack runs, measure runs); transfer rows."""
    import advlab

    res = advlab.load(str(folder))
    seconds = float(res.trials["train_seconds"].fillna(0).sum())
    seconds += float(res.attacks["seconds"].fillna(0).sum())
    seconds += float(res.measures["seconds"].fillna(0).sum()) if len(res.measures) else 0.0
    return seconds, len(res.transfer)


def load_seconds(folder: Path) -> float:
    """advlab.load in a fresh process (imports not counted)."""
    code = (
        "import time, advlab; start = time.perf_counter(); "
        f"advlab.load({str(folder)!r}); print(time.perf_counter() - start)"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def report_figures(folder: Path, out: Path, code: Path = ROOT) -> dict[str, Any]:
    start = time.perf_counter()
    done = advlab("report", str(folder), "-o", str(out), code=code)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"report_exit": done.returncode, "report_error": done.stderr[-400:]}
    return {
        "report_exit": 0,
        "report_s": seconds,
        "report_mb": out.stat().st_size / 1e6,
        "render_s": render_seconds(out),
    }


def render_seconds(page: Path) -> float:
    """Navigation until window.advlab.ready has resolved (every chart drawn), in Chromium."""
    sys.path.insert(0, str(ROOT / "tests"))
    from browser import open_page

    start = time.perf_counter()
    with open_page(page) as browser:
        browser.wait_for("document.body.dataset.charts", timeout=600)
        return time.perf_counter() - start


def measure(n: int, storage: Path, pairs: str | None) -> dict[str, Any]:
    folder = storage / f"scale-{n}"
    record = folder / RECORD
    if record.exists():
        swept = json.loads(record.read_text())
    else:
        swept = run_sweep(n, storage, pairs)
        swept |= folder_figures(folder)
        record.write_text(json.dumps(swept, indent=1))
    work, rows = trial_work(folder)
    row = swept | {
        "work_fraction": work / (swept["wall_s"] * swept["cores"]),
        "transfer_rows": rows,
    }
    row |= {"load_s": load_seconds(folder)}
    return row | report_figures(folder, storage / f"scale-{n}.html")


COLUMNS = (
    ("trials", "trials", "{}"), ("exit", "exit", "{}"), ("wall_s", "sweep wall (s)", "{:.0f}"),
    ("work_fraction", "trial-work fraction", "{:.2f}"), ("files", "files", "{:,}"),
    ("bytes", "MB", "{:.1f}"), ("parquet", "parquet files", "{:,}"),
    ("transfer_rows", "transfer rows", "{:,}"), ("transfer_s", "transfer (s)", "{:.1f}"),
    ("load_s", "advlab.load (s)", "{:.2f}"), ("report_s", "report build (s)", "{:.1f}"),
    ("report_mb", "report (MB)", "{:.2f}"), ("render_s", "render (s)", "{:.1f}"),
)  # fmt: skip


def table_row(row: dict[str, Any]) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        value = row.get(key)
        value = value / 1e6 if key == "bytes" and value is not None else value
        cells.append("—" if value is None else fmt.format(value))
    return "| " + " | ".join(cells) + " |"


def synthetic(n: int, storage: Path, other: Path | None) -> list[dict[str, Any]]:
    """n trials of written results (n / 2 configurations of two seeds), reported by this
    checkout and by `other`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic_results import write_synthetic

    folder = storage / f"synthetic-{n}"
    if not folder.exists():
        decays = [1.0e-4 * (k + 1) for k in range(n // 4)]
        write_synthetic(folder, ["fc10", "fc32-10"], decays, 2)
    folder = folder / "synthetic"
    row = {"trials": n, "exit": 0} | folder_figures(folder) | {"load_s": load_seconds(folder)}
    rows = [row | {"code": "this"} | report_figures(folder, storage / f"synthetic-{n}.html")]
    if other is not None:
        out = storage / f"synthetic-{n}-other.html"
        rows.append(row | {"code": str(other)} | report_figures(folder, out, other))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--storage", default="/tmp/advlab-scale")
    parser.add_argument("--pairs", default=None, help="transfer.pairs (all, within, sample)")
    parser.add_argument("--synthetic", action="store_true", help="written results, no sweep")
    parser.add_argument("--code", type=Path, help="also report with this advlab checkout")
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for n in args.trials:
        if args.synthetic:
            rows = synthetic(n, storage, args.code.resolve() if args.code else None)
            for row in rows:
                print(table_row(row) + f" {row['code']}", flush=True)
            if len(rows) == 2 and "render_s" in rows[0] and "render_s" in rows[1]:
                ratios = [rows[1][k] / rows[0][k] for k in ("report_mb", "report_s", "render_s")]
                print("  other / this: size {:.2f}x, build {:.2f}x, render {:.2f}x".format(*ratios))
            continue
        row = measure(n, storage, args.pairs)
        print(table_row(row), flush=True)
        if row["exit"] != 0 or row.get("report_exit"):
            print(f"  size {n}: {row.get('tail', '')!r} {row.get('report_error', '')}", flush=True)


if __name__ == "__main__":
    main()
