"""Transfer rates explained (issue 31): read a finished `sweeps/transfer_rates.yaml` and print,
per setting (training-set size, epochs, attacked split, attack), the mean over the six ordered
pairs of different nets (fc10, fc100-100-10, fc200-200-10 trained alike) of the target's error
on the source's adversarial examples, on the same examples clean, on same-rms Gaussian noise,
and on the perturbations amplified to rms 0.1 and 0.2; FC100 -> FC200 alone; and the source's
mean rms distortion and success rate.

    advlab sweep sweeps/transfer_rates.yaml
    python benchmarks/transfer_rates.py results/transfer-rates
"""

from __future__ import annotations

import argparse

import pandas as pd

from advlab.results import load

SETTING = ["subset", "train.epochs", "attack_split"]


def pairs(path: str) -> pd.DataFrame:
    """Transfer rows between different nets of the same setting, with both trials' settings."""
    res = load(path)
    trials = res.trials.set_index("trial_id")[["model", *SETTING, "test_error"]]
    rows = res.transfer.query("status == 'ok' and target_kind == 'trial'")
    rows = rows.join(trials, on="source_trial").join(trials.add_suffix("_target"), on="target")
    same = (rows[SETTING].to_numpy() == rows[[f"{k}_target" for k in SETTING]].to_numpy()).all(1)
    return rows[same & (rows["model"] != rows["model_target"])]


def summary(rows: pd.DataFrame, attacks: pd.DataFrame) -> pd.DataFrame:
    def rate(kind: str, level: float | None = None) -> pd.Series:
        part = rows[rows["kind"] == kind]
        if level is not None:
            part = part[part["amplified_to"] == level]
        return part.groupby([*SETTING, "attack"])["error_adv"].mean()

    adv = rows[rows["kind"] == "adversarial"]
    fc = adv[(adv["model"] == "fc100-100-10") & (adv["model_target"] == "fc200-200-10")]
    table = pd.DataFrame(
        {
            "source test error": adv.groupby([*SETTING, "attack"])["test_error"].mean(),
            "transfer (adversarial)": rate("adversarial"),
            "same examples clean": adv.groupby([*SETTING, "attack"])["error_clean"].mean(),
            "same-rms noise": rate("noise"),
            "amplified 0.1": rate("amplified", 0.1),
            "amplified 0.2": rate("amplified", 0.2),
            "FC100 -> FC200": fc.groupby([*SETTING, "attack"])["error_adv"].mean(),
        }
    )
    own = attacks.groupby([*SETTING, "attack"])[["mean_dist_rms", "success_rate"]].mean()
    return table.join(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    args = parser.parse_args()
    rows = pairs(args.sweep)
    attacks = load(args.sweep).attacks
    table = summary(rows, attacks).reset_index()
    print(markdown(table))
    for key in [*SETTING, "attack"]:  # each factor alone, averaged over the others
        print(markdown(table.groupby(key)[table.columns[4:]].mean().reset_index()))


def markdown(frame: pd.DataFrame) -> str:
    """A markdown table (pandas' to_markdown needs tabulate, which advlab does not declare)."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
             for row in frame.itertuples(index=False)]  # fmt: skip
    lines = [list(map(str, frame.columns)), ["---"] * len(frame.columns), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


if __name__ == "__main__":
    main()
