"""Print the adversarial-training study's tables as markdown from a finished sweep folder.

Three tables: one row per trial (clean error, PGD robust error at the training budgets, the
strong attacks, the evaluated epoch, the masking verdict); robust error against
eps (the strongest PGD at each budget, per trial); clean against robust error (one point per
trial at each budget given).

    python benchmarks/adversarial_training_study.py /tmp/advtrain-results/adversarial-training-study
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from advlab.results import Results, load

# Time per epoch: benchmarks/adversarial_training_speed.py (the sweep's trials share the machine).


def pct(value: object) -> str:
    if value is None or pd.isna(value):  # type: ignore[arg-type]
        return "-"
    return f"{100 * float(value):.1f}%"  # type: ignore[arg-type]


def method_of(row: pd.Series) -> str:
    """`pgd 0.2`, with what sets a case apart from its method's usual settings in the study."""
    method = row["train.adversarial.method"]
    if method == "none":
        return "none"
    extras = []
    if method == "fgsm" and row["train.adversarial.mix"] != 0.5:
        extras.append(f"mix {row['train.adversarial.mix']:g}")
    if row["train.adversarial.warmup_epochs"] == 0:
        extras.append("no warm-up")
    schedule = row.get("train.lr_schedule")  # absent (null) in sweeps from before the setting
    if isinstance(schedule, str) and schedule != "constant":
        extras.append(f"{schedule} lr")
    return f"{method} {row['train.adversarial.eps']:g}" + (
        f" ({', '.join(extras)})" if extras else ""
    )


def robust(curves: pd.DataFrame, trial: str, attacks: list[str], eps: float) -> float:
    """The highest robust error over `attacks` at one budget (the strongest attack's)."""
    rows = curves[
        (curves["trial_id"] == trial)
        & curves["attack"].isin(attacks)
        & ((curves["budget"] - eps).abs() < 1e-9)
    ]
    return float(rows["robust_error"].max()) if len(rows) else math.nan


def summary_table(res: Results) -> str:
    lines = [
        "| training | test err | PGD-20 @0.1 | PGD-20 @0.2 | strong PGD @0.1 | strong PGD @0.2 "
        "| FGSM @0.2 | DeepFool (Linf) @0.2 | epoch kept | masking |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = res.masking.set_index("trial_id")["flagged"].fillna(False).astype(bool)
    for _, row in res.trials.iterrows():
        tid = row["trial_id"]
        kept = f"{row['evaluated_epoch']} / {row['train.epochs']}"
        flag = "**possible**" if verdicts.get(tid, False) else "no"
        cells = [
            method_of(row),
            pct(row["test_error"]),
            *(pct(robust(res.curves, tid, ["pgd"], e)) for e in (0.1, 0.2)),
            *(pct(robust(res.curves, tid, ["strong_pgd"], e)) for e in (0.1, 0.2)),
            pct(robust(res.curves, tid, ["fgsm"], 0.2)),
            pct(robust(res.curves, tid, ["strong_deepfool"], 0.2)),
            kept,
            flag,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(res: Results, attacks: list[str]) -> str:
    budgets = sorted(res.curves.loc[res.curves["attack"] == attacks[0], "budget"].unique())
    lines = [
        "| training | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for _, row in res.trials.iterrows():
        cells = [pct(robust(res.curves, row["trial_id"], attacks, b)) for b in budgets]
        lines.append(f"| {method_of(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points_table(res: Results, budgets: list[float]) -> str:
    lines = [
        "| training | clean err | " + " | ".join(f"robust err @{b:g}" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    strongest = ["pgd", "strong_pgd"]
    for _, row in res.trials.sort_values("test_error").iterrows():
        cells = [pct(robust(res.curves, row["trial_id"], strongest, b)) for b in budgets]
        lines.append(f"| {method_of(row)} | {pct(row['test_error'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(res: Results, eps: float) -> str:
    """Each trial's robust error at eps (the stronger PGD) against standard training's."""
    strongest = ["pgd", "strong_pgd"]
    standard = res.trials[res.trials["train.adversarial.method"] == "none"]
    base = robust(res.curves, standard["trial_id"].iloc[0], strongest, eps) if len(standard) else 0
    lines = [f"| training | robust err @{eps:g} | standard / this |", "|---|---|---|"]
    for _, row in res.trials.iterrows():
        value = robust(res.curves, row["trial_id"], strongest, eps)
        ratio = f"{base / value:.2f}x" if value and base else "-"
        lines.append(f"| {method_of(row)} | {pct(value)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    args = parser.parse_args()
    res = load(args.sweep_dir)
    print(summary_table(res))
    print("\nRobust error against eps (the stronger of PGD-20 and strong PGD):\n")
    print(curve_table(res, ["pgd", "strong_pgd"]))
    print("\nClean against robust error (sorted by clean error):\n")
    print(points_table(res, [0.1, 0.2]))
    print("\nAgainst standard training at eps 0.2:\n")
    print(ratio_table(res, 0.2))
    flagged = res.masking[res.masking["flagged"].fillna(False).astype(bool)]
    trials = res.trials.set_index("trial_id")
    for _, verdict in flagged.iterrows():
        print(f"\n{method_of(trials.loc[verdict['trial_id']])}: {verdict['reason']}")


if __name__ == "__main__":
    main()
