"""Print the paper's tables as markdown from finished sweep folders (for BENCHMARKS.md).

Table 1: model, lambda, train and test error, mean minimum distortion (L-BFGS, rms).
Transfer (Tables 2 and 4): error of each column model on the examples made for each row model,
beside the Gaussian-noise rows, with the controls as extra columns.
Families (--families, issue 31): per trial (a net or a control) its errors, the attack's fooled
count and distortions, the exact minimum from a second sweep of the same trials (--exact), the
Gaussian-noise rates, and whether its blind spots are closer than noise.

    .venv/bin/python benchmarks/paper_tables.py results/cross-model --attack lbfgs
    .venv/bin/python benchmarks/paper_tables.py results/controls-table1 --attack hsj \
        --families --exact results/controls-table1-exact
"""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd

from advlab import families, results
from advlab.tables import NOISE_SOURCE


def trial_label(row: pd.Series) -> str:
    """The paper's way of naming a model: fc100-100-10(1e-05, 1e-05, 1e-06); a control by its
    settings: knn(n_neighbors=1, max_train=10000)."""
    args = row.get("model_args")
    if isinstance(args, str):
        args = json.loads(args) if args else {}
    if args:
        settings = ", ".join(f"{k}={v}" for k, v in args.items())
    elif row["model"] in families.names():  # a control without settings: no lambda to name
        settings = ""
    else:
        settings = ", ".join(f"{v:g}" for v in row["weight_decay"])  # a list of lambdas
    subset = "" if row["subset"] == "all" else f" {row['subset']}"
    return f"{row['model']}({settings}){subset}" if settings else f"{row['model']}{subset}"


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


def family_rows(
    trials: pd.DataFrame,
    examples: pd.DataFrame,
    attack: str,
    exact: pd.DataFrame | None = None,
    noise: str = "noise",
) -> list[dict]:
    """One row per trial from the examples tables (one row per attacked image and run):
    distortions are over the fooled images; `exact` holds the exact attack's examples of the
    same trials (another sweep: the same trial ids, so the same models and images). An image
    is "within noise" when the attack's example (the exact one where there is one) is no
    farther (rms) than the median rms of the smallest-stddev Gaussian noise on that trial."""
    rows = []
    for _, trial in trials.iterrows():
        tid = trial["trial_id"]
        mine = examples[examples["trial_id"] == tid]
        hits = mine[(mine["attack"] == attack) & mine["success"]].set_index("dataset_index")
        row = {
            "label": trial_label(trial), "train_error": trial["train_error"],
            "test_error": trial["test_error"], "n": int((mine["attack"] == attack).sum()),
            "fooled": len(hits), "rms_mean": hits["dist_rms"].mean(),
            "rms_median": hits["dist_rms"].median(), "l2_mean": hits["dist_l2"].mean(),
            "l2_median": hits["dist_l2"].median(), "exact_fooled": None, "ratio_median": None,
        }  # fmt: skip
        best = hits["dist_rms"]
        if exact is not None and (exact["trial_id"] == tid).any():
            of = exact[exact["trial_id"] == tid]
            proven = of[of["success"]].set_index("dataset_index")
            both = hits.index.intersection(proven.index)
            row |= {
                "exact_n": len(of), "exact_fooled": len(proven),
                "exact_l2_mean": proven["dist_l2"].mean(),
                "exact_l2_median": proven["dist_l2"].median(),
                "exact_rms_mean": proven["dist_rms"].mean(),
                "ratio_median": (hits.loc[both, "dist_l2"] / proven.loc[both, "dist_l2"]).median(),
                "same_images": set(of["dataset_index"]) == set(mine.loc[mine["attack"] == attack,
                                                                        "dataset_index"]),
            }  # fmt: skip
            best = proven["dist_rms"]
        noisy = mine[mine["attack"] == noise]
        rates = noisy.groupby("budget")["success"].mean().sort_index()
        row["noise"] = rates.to_dict()
        if len(rates):
            smallest = noisy[noisy["budget"] == rates.index[0]]
            row["noise_rms"] = smallest["dist_rms"].median()
            row["within"] = (best <= row["noise_rms"]).sum() / row["n"]
            row["noise_within"] = rates.iloc[0]
        rows.append(row)
    return rows


def families_table(res: results.Results, attack: str, exact: results.Results | None) -> str:
    """Table 1 across model families (see family_rows)."""
    examples = res.examples()
    exact_examples = None
    if exact is not None:
        found = exact.examples()
        exact_examples = found[found["attack"] == "exact"]
    rows = family_rows(res.trials, examples, attack, exact_examples)
    budgets = sorted({b for r in rows for b in r["noise"]})
    noise_head = " / ".join(f"{b:g}" for b in budgets)
    lines = [
        f"| model | train err | test err | {attack}: fooled | {attack}: rms mean (median) "
        f"| {attack}: L2 mean (median) | exact: L2 mean (median) | {attack} / exact, median "
        f"| noise {noise_head}: fooled | within noise rms: adversarial / noise "
        "| closer than noise? |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        if r["exact_fooled"] is None:
            exact_cell, ratio = "-", "-"
        else:
            exact_cell = f"{r['exact_l2_mean']:.3f} ({r['exact_l2_median']:.3f})"
            if r["exact_fooled"] < r["exact_n"]:
                exact_cell += f", {r['exact_fooled']} of {r['exact_n']}"
            if not r["same_images"]:
                exact_cell += ", other images"
            ratio = f"{r['ratio_median']:.2f}"
        noise = " / ".join(pct(r["noise"].get(b, math.nan)) for b in budgets)
        if "within" in r:
            within = f"{pct(r['within'])} / {pct(r['noise_within'])} (rms {r['noise_rms']:.3f})"
            closer = "yes" if r["within"] > r["noise_within"] else "no"
        else:
            within, closer = "-", "-"
        lines.append(
            f"| {r['label']} | {pct(r['train_error'])} | {pct(r['test_error'])} | "
            f"{r['fooled']} of {r['n']} | {r['rms_mean']:.3f} ({r['rms_median']:.3f}) | "
            f"{r['l2_mean']:.2f} ({r['l2_median']:.2f}) | {exact_cell} | {ratio} | {noise} | "
            f"{within} | {closer} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--attack", default="lbfgs")
    parser.add_argument("--families", action="store_true", help="Table 1 across families")
    parser.add_argument("--exact", help="a sweep of the same trials with the exact attack")
    args = parser.parse_args()
    res = results.load(args.sweep_dir)
    if args.families:
        exact = results.load(args.exact) if args.exact else None
        print(
            f"## {res.name}: Table 1 across families\n\n{families_table(res, args.attack, exact)}"
        )
        return
    print(f"## {res.name}: Table 1\n\n{table1(res, args.attack)}\n")
    if len(res.transfer):
        print(f"## {res.name}: transfer ({args.attack})\n\n{transfer_table(res, args.attack)}")


if __name__ == "__main__":
    main()
