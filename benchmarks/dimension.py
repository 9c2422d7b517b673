"""Print the dimension sweep's results as markdown (for BENCHMARKS.md): clean error and the
measured values per resolution (means over seeds), the fitted exponents of d with their
intervals over seeds, and the Gaussian-noise prediction beside the attacks' distortion.

    .venv/bin/python benchmarks/dimension.py results/dimension
"""

from __future__ import annotations

import argparse

import pandas as pd

import advlab


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}g}"


def per_resolution(res: advlab.Results) -> str:
    points = res.dimension()
    points = points.assign(what=points["quantity"] + points["attack"].fillna("").map(
        lambda a: f" ({a})" if a else ""))  # fmt: skip
    table = points.pivot_table(
        index=["group", "input_dim"], columns="what", values="value", aggfunc="mean"
    )
    lines = ["| group | d | " + " | ".join(table.columns) + " |"]
    lines.append("|---" * (len(table.columns) + 2) + "|")
    for (group, d), row in table.iterrows():
        lines.append(f"| {group} | {d} | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def clean_errors(res: advlab.Results) -> str:
    axes = [a for a in res.axes if a not in ("seed", "dataset.resolution")]
    found = res.trials.groupby([*axes, "input_dim"], sort=False)["test_error"].agg(
        ["mean", "count"]
    )
    lines = ["| " + " | ".join(axes) + " | d | test error (mean over seeds) | seeds |"]
    lines.append("|---" * (len(axes) + 3) + "|")
    for key, row in found.iterrows():
        keys = key if isinstance(key, tuple) else (key,)
        lines.append(
            "| " + " | ".join(str(k) for k in keys) + f" | {100 * row['mean']:.1f}% | "
            f"{int(row['count'])} |"
        )
    return "\n".join(lines)


def fitted(res: advlab.Results) -> str:
    lines = [
        "| group | attack | quantity | exponent k | 95% interval over seeds | seeds | predicted |"
        " interval holds it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in res.dimension_exponents().to_dict("records"):
        holds = {True: "yes", False: "no", None: "-"}[row["consistent"]]
        attack = row["attack"] if isinstance(row["attack"], str) else "-"  # null: gradients
        lines.append(
            f"| {row['group']} | {attack} | {row['quantity']} | "
            f"{row['exponent']:.3f} | [{row['lo']:.3f}, {row['hi']:.3f}] | {row['n_seeds']} | "
            f"{row['predicted']:g} | {holds} |"
        )
    return "\n".join(lines)


def noise(res: advlab.Results) -> str:
    table = res.gaussian_noise.merge(res.trials[["trial_id", "input_dim"]], on="trial_id")
    axes = [a for a in res.axes if a not in ("seed", "dataset.resolution")]
    keys = [*axes, "input_dim"]
    noisy = table[table["source"] == "noise"]
    lines = [
        "| " + " | ".join(keys) + " | sigma | error rate in noise | predicted L2 "
        "(-sigma Phi^-1(mu)) | median per-example prediction |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for key, part in noisy.groupby([*keys, "sigma"], sort=True):
        lines.append(
            "| " + " | ".join(str(k) for k in key) + f" | {_fmt(part['error_rate'].mean())} | "
            f"{_fmt(part['predicted_l2'].mean())} (n={part['predicted_l2'].notna().sum()}) | "
            f"{_fmt(part['median_l2'].mean())} |"
        )
    attacked = table[table["source"] == "attack"]
    lines += ["", "| " + " | ".join(keys) + " | attack | median L2 | mean L2 | success |",
              "|---" * (len(keys) + 4) + "|"]  # fmt: skip
    for key, part in attacked.groupby([*keys, "attack"], sort=True):
        lines.append(
            "| " + " | ".join(str(k) for k in key) + f" | {_fmt(part['median_l2'].mean())} | "
            f"{_fmt(part['mean_l2'].mean())} | {_fmt(part['error_rate'].mean())} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    args = parser.parse_args()
    res = advlab.load(args.sweep_dir)
    for title, text in (
        ("clean error", clean_errors(res)),
        ("per resolution (means over seeds)", per_resolution(res)),
        ("exponents", fitted(res)),
        ("Gaussian noise", noise(res)),
    ):
        print(f"### {title}\n\n{text}\n")


if __name__ == "__main__":
    main()
