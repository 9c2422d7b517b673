"""Print the paper's tables as markdown from finished sweep folders (for BENCHMARKS.md).

Table 1: model, lambda, train and test error, mean minimum distortion (L-BFGS, rms).
Transfer (Tables 2 and 4): error of each column model on the examples made for each row model,
beside the Gaussian-noise rows, with the controls as extra columns.

    .venv/bin/python benchmarks/paper_tables.py results/cross-model --attack lbfgs
"""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd

from advlab.store import SweepStore
from advlab.transfer import NOISE_SOURCE


def trial_label(row: pd.Series) -> str:
    decay = row["weight_decay"]
    if isinstance(decay, str):
        decay = ", ".join(f"{v:g}" for v in json.loads(decay))
    else:
        decay = f"{decay:g}"
    subset = "" if row["subset"] == "all" else f" {row['subset']}"
    return f"{row['model']}({decay}){subset}"


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def table1(store: SweepStore, attack: str) -> str:
    trials = store.read("trials")
    lines = [
        "| model | train err | test err | held-out err | av. min. distortion (rms) | success "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, row in trials.iterrows():
        lines.append(
            f"| {trial_label(row)} | {pct(row['train_error'])} | {pct(row['test_error'])} | "
            f"{pct(row['heldout_error'])} | {row[f'{attack}/mean_dist_rms']:.3f} | "
            f"{pct(row[f'{attack}/success_rate'])} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def transfer_table(store: SweepStore, attack: str, kind_suffix: str = "") -> str:
    trials = store.read("trials").set_index("trial_id")
    rows = store.read("transfer")
    label = {tid: trial_label(trials.loc[tid]) for tid in trials.index}
    trial_targets = [t for t in trials.index if t in set(rows["target"])]
    controls = sorted(set(rows.loc[rows["target_kind"] == "control", "target"]))
    columns = [label[t] for t in trial_targets] + controls
    header = "| examples \\ fed to | " + " | ".join(columns) + " | av. rms |"
    lines = [header, "|---" * (len(columns) + 2) + "|"]

    def emit(name: str, subset: pd.DataFrame) -> None:
        cells = {}
        for target, group in subset.groupby("target"):
            cells[label.get(target, target)] = pct(group["error_adv"].mean())
        rms = subset["rms"].mean()
        lines.append(
            f"| {name} | " + " | ".join(cells.get(c, "-") for c in columns) + f" | {rms:.3f} |"
        )

    mine = rows[rows["attack"] == attack]
    for source in trial_targets:
        of_source = mine[mine["source_trial"] == source]
        emit(f"made for {label[source]}", of_source[of_source["kind"] == "adversarial"])
        emit("  Gaussian noise, same rms", of_source[of_source["kind"] == "noise"])
        for kind in sorted(k for k in set(of_source["kind"]) if k.startswith("amplified")):
            emit(f"  amplified to rms {kind.split('@')[1]}", of_source[of_source["kind"] == kind])
    noise = rows[rows["source_trial"] == NOISE_SOURCE]
    for stddev, group in noise.groupby("budget"):
        emit(f"Gaussian noise, stddev {stddev:g}", group)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--attack", default="lbfgs")
    args = parser.parse_args()
    store = SweepStore.from_dir(args.sweep_dir)
    print(f"## {store.sweep}: Table 1\n\n{table1(store, args.attack)}\n")
    if store.trial_files("transfer"):
        print(f"## {store.sweep}: transfer ({args.attack})\n\n{transfer_table(store, args.attack)}")


if __name__ == "__main__":
    main()
