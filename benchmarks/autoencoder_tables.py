"""Print sweeps/autoencoders.yaml's tables as markdown (for BENCHMARKS.md): per model its clean
error, mean minimum distortion per attack and Jacobian norms; then the likelihood table (bits/dim
of train, clean, out-of-distribution, adversarial and matched-noise inputs, kNN distance beside).

    .venv/bin/python benchmarks/autoencoder_tables.py results/autoencoders
"""

from __future__ import annotations

import argparse

import pandas as pd

from advlab import results


def model_table(res: results.Results) -> str:
    trials = res.trials.set_index("trial_id")
    attacks = res.attacks
    jac = res.table("jacobian")
    names = sorted(attacks["attack"].unique())
    head = ["model", "test error", *[f"{a} rms / L2" for a in names], "‖J_code‖_F", "‖J_logits‖_F"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for trial_id, row in trials.iterrows():
        cells = [row["model"], f"{100 * row['test_error']:.1f}%"]
        for name in names:
            mine = attacks[(attacks["trial_id"] == trial_id) & (attacks["attack"] == name)]
            (a,) = mine.itertuples()
            cells.append(
                f"{a.mean_dist_rms:.4f} / {a.mean_dist_l2:.3f} ({100 * a.success_rate:.0f}%)"
            )
        mine = jac[jac["trial_id"] == trial_id].set_index("of")["frobenius"]
        cells += [f"{mine.get('code', float('nan')):.2f}", f"{mine['logits']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def likelihood_table(res: results.Results) -> str:
    trials = res.trials.set_index("trial_id")["model"]
    lik = res.table("likelihood")
    head = [
        "model",
        "inputs",
        "attack",
        "n",
        "bits/dim (IWAE)",
        "ELBO bits/dim",
        "vs clean",
        "kNN L2",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in lik.itertuples():
        versus = "" if pd.isna(row.vs_clean) else f"{row.vs_clean:+.3f}"
        attack = "" if row.attack is None or pd.isna(row.attack) else row.attack
        if row.inputs == "ood":
            attack = f"({row.ood})"
        cells = [
            trials[row.trial_id], row.inputs, attack, str(row.examples), f"{row.bits_per_dim:.3f}",
            f"{row.elbo_bits_per_dim:.3f}", versus, f"{row.knn_distance:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir")
    res = results.load(parser.parse_args().sweep_dir)
    print(model_table(res), end="\n\n")
    print(likelihood_table(res))


if __name__ == "__main__":
    main()
