"""Print the certified-bracket tables as markdown from a finished sweep with the bounds measure.

Two tables: per model and norm, the mean bracket gap (best attack / best certified bound), each
bound method's mean ratio to the exact minimum where the solver closed it (CROWN / exact, IBP /
exact), the share of examples the solver closed, and seconds per example for each bound method
and for the attacks; per model, attack and norm, the attack's optimality (advlab.measures.bracket).

    python benchmarks/certified_bracket.py /tmp/cb/certified-bracket
"""

from __future__ import annotations

import argparse

import pandas as pd

from advlab.measures.bounds import EXACT
from advlab.measures.bracket import optimality, tightest
from advlab.results import Results, load


def _mean_ratio(bounds: pd.DataFrame, minimum: pd.Series, method: str) -> float:
    mine = bounds[bounds["method"] == method].set_index("example")["lower"]
    both = pd.concat([mine, minimum], axis=1, keys=["lower", "minimum"]).dropna()
    both = both[both["minimum"] > 0]
    return float((both["lower"] / both["minimum"]).mean()) if len(both) else float("nan")


def _attack_seconds(attacks: pd.DataFrame, trial: str) -> float:
    """Seconds per attacked example over every attack run of the trial."""
    mine = attacks[attacks["trial_id"] == trial]
    return float((mine["seconds"] / mine["n"].clip(lower=1)).sum())


def gap_table(res: Results) -> list[str]:
    bounds = res.bounds
    methods = [
        m for m in ("ibp", "crown-ibp", "crown", "alpha-crown") if m in set(bounds["method"])
    ]
    head = ["model", "norm", "examples", "best attack / bound"]
    head += [f"{m} / exact" for m in methods] + ["closed by solver"]
    head += [f"{m} s/example" for m in [*methods, EXACT]] + ["attacks s/example"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = res.labels
    for (trial, norm), group in bounds.groupby(["trial_id", "norm"], sort=False):
        limits = tightest(group)
        gap = (limits["upper"] / limits["lower"])[(limits["lower"] > 0) & limits["upper"].notna()]
        minimum = limits.set_index("example")["minimum"]
        exact = group[group["method"] == EXACT]
        closed = f"{exact['exact'].mean():.0%}" if len(exact) else "-"
        cells = [labels.get(trial, trial), norm, str(limits["example"].nunique()),
                 f"{gap.mean():.3f}" if len(gap) else "-"]  # fmt: skip
        cells += [f"{_mean_ratio(group, minimum, m):.3f}" for m in methods]
        cells += [closed]
        for m in [*methods, EXACT]:
            ran = group[(group["method"] == m) & ~group["status"].str.startswith("skipped")]
            mine = ran["seconds"]
            cells.append(f"{mine.mean():.3f}" if len(mine) else "-")
        cells.append(f"{_attack_seconds(res.attacks, trial):.3f}")
        lines.append("| " + " | ".join(c.replace("nan", "-") for c in cells) + " |")
    return lines


def optimality_table(res: Results) -> list[str]:
    found = optimality(res.bounds, res.examples(), res.attacks)
    head = ["model", "attack", "norm", "examples", "with exact minimum", "mean / reference",
            "median", "within 1% of bound"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in found.itertuples(index=False):
        lines.append(
            f"| {res.labels.get(row.trial_id, row.trial_id)} | {row.attack} | {row.norm} | "
            f"{row.n} | {row.exact_share:.0%} | {row.mean_ratio:.3f} | {row.median_ratio:.3f} | "
            f"{row.within_1pct:.0%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="<storage>/<sweep> of a sweep that ran the bounds measure")
    res = load(parser.parse_args().sweep)
    print("\n".join(gap_table(res)))
    print()
    print("\n".join(optimality_table(res)))


if __name__ == "__main__":
    main()
