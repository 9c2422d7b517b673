"""Wall time of the transfer stage for sweeps of 4, 8 and 16 trials.

Each sweep trains N small models on the embedded digits (different seeds and widths), with
transfer turned off; then `run_transfer` is timed alone on the finished sweep: every trial's
L-BFGS and FGSM examples (plus noise and amplified rows) fed to every trial and to the default
scikit-learn controls, as Ray tasks on this machine's cores.

    .venv/bin/python benchmarks/transfer.py --trials 4 8 16
"""

from __future__ import annotations

import argparse
import tempfile
import time

from advlab.sweep import run_sweep
from advlab.sweepfile import parse_sweep
from advlab.transfer import run_transfer
from advlab.tuning import init_ray


def sweep_of(n: int, storage: str) -> dict:
    widths = ["fc10", "fc32-10", "fc64-10", "fc32-32-10"]
    return {
        "name": f"transfer-{n}",
        "dataset": {"name": "digits"},
        "grid": {"model": widths, "seed": list(range(n // len(widths)))},
        "train": {"epochs": 10, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.1, 0.2],
        "attack_examples": 100,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 50}],
        "transfer": {"enabled": False},
        "measures": [],
        "storage": storage,
        "wandb": {"mode": "disabled"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    init_ray(None)
    print("| trials | sources x targets | rows | transfer wall time (s) | s per target |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as storage:
        for n in args.trials:
            spec = parse_sweep(sweep_of(n, storage))
            outcome = run_sweep(spec, wandb_mode="disabled")
            assert outcome.all_ok, outcome.failed
            start = time.perf_counter()
            result = run_transfer(outcome.store.uri, wandb_mode="disabled")
            seconds = time.perf_counter() - start
            targets = result.rows["target"].nunique()
            print(
                f"| {n} | {len(result.sources)} x {targets} | {len(result.rows)} | "
                f"{seconds:.1f} | {seconds / targets:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
