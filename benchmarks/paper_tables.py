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

from advlab import results
from advlab.tables import NOISE_SOURCE


def trial_label(row: pd.Series) -> str:
    """The paper's way of naming a model: fc100-100-10(1e-05, 1e-05, 1e-06); a control by its
    settings: knn(n_neighbors=1, max_train=10000)."""
    args = row.get("model_args")
    if isinstance(args, str):
        args = json.loads(args) if args else {}
    if args:
        settings = ", ".join(f"{k}={v}" for k, v in args.items())
    else:
        settings = ", ".join(f"{v:g}" for v in row["weight_decay"])  # a list of lambdas
    subset = "" if row["subset"] == "all" else f" {row['subset']}"
    return f"{row['model']}({settings}){subset}"


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def table1(res: results.Results, attack: str) -> str:
    trials = res.trials.merge(
        res.attacks.loc[
            res.attacks["attack"] == attack, ["trial_id", "mean_dist_rms", "success_rate"]
        ],
        on="trial_id",
    )
    lines = [
        "| model | train err | test err | held-out err | av. min. distortion (rms) | success "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, row in trials.iterrows():
        lines.append(
            f"| {trial_label(row)} | {pct(row['train_error'])} | {pct(row['test_error'])} | "
            f"{pct(row['heldout_error'])} | {row['mean_dist_rms']:.3f} | "
            f"{pct(row['success_rate'])} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def transfer_table(res: results.Results, attack: str) -> str:
    trials = res.trials.set_index("trial_id")
    rows = res.transfer[res.transfer["status"] == "ok"]
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
        amplified = of_source[of_source["kind"] == "amplified"]
        for target_rms, group in amplified.groupby("amplified_to", sort=True):
            emit(f"  amplified to rms {target_rms:g}", group)
    noise = rows[rows["source_trial"] == NOISE_SOURCE]
    for stddev, group in noise.groupby("budget"):
        emit(f"Gaussian noise, stddev {stddev:g}", group)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--attack", default="lbfgs")
    args = parser.parse_args()
    res = results.load(args.sweep_dir)
    print(f"## {res.name}: Table 1\n\n{table1(res, args.attack)}\n")
    if len(res.transfer):
        print(f"## {res.name}: transfer ({args.attack})\n\n{transfer_table(res, args.attack)}")


if __name__ == "__main__":
    main()
