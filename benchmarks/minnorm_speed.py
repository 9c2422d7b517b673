"""advlab's DDN and FMN against adv-lib's, wall time side by side (the issue-20 speed check).

The same models and examples as benchmarks/attacks.py, one thread, every attack run `--repeats`
times round robin (so a busy spell on the machine hits all four alike) and timed by its best run.
Prints the wall-time ratios and each attack's mean L2 (adv-lib's FMN-L2 fools only some).

    python benchmarks/minnorm_speed.py --examples 200 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from attacks import FASHION_ROOT, first_correct, trained_model
from torch import Tensor

from advlab.attacks import ddn, fmn


def jobs(model: torch.nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], Tensor]]:
    from adv_lib.attacks import ddn as advlib_ddn
    from adv_lib.attacks import fmn as advlib_fmn

    return {
        "advlab DDN": lambda: ddn(model, x, y).x_adv,
        "adv-lib DDN": lambda: advlib_ddn(model, x, y, steps=100, levels=None),
        "advlab FMN-L2": lambda: fmn(model, x, y).x_adv,
        "adv-lib FMN-L2": lambda: advlib_fmn(model, x, y, norm=2, steps=100),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="fc10,fc100-100-10,fc200-200-10:relu,cnn")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/advlab/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | DDN advlab / adv-lib (wall) | FMN-L2 advlab / adv-lib (wall) | mean L2: "
          "advlab DDN, adv-lib DDN, advlab FMN (100%), adv-lib FMN (its success) |")  # fmt: skip
    print("|---|---|---|---|")
    for name in args.models.split(","):
        model, x_test, y_test, _ = trained_model(
            "fashion_mnist", name, 3, 20000, args.cache, FASHION_ROOT
        )
        x, y = first_correct(model, x_test, y_test, args.examples)
        runs = jobs(model, x, y)
        best, out = dict.fromkeys(runs, float("inf")), {}
        for _ in range(args.repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                out[key] = run()
                best[key] = min(best[key], time.perf_counter() - start)
        with torch.no_grad():
            fooled = {k: model(v).argmax(1) != y for k, v in out.items()}
        l2 = {k: (v - x).flatten(1).norm(dim=1)[fooled[k]].mean().item() for k, v in out.items()}
        rate = fooled["adv-lib FMN-L2"].float().mean().item()
        print(
            f"| {name} | {best['advlab DDN'] / best['adv-lib DDN']:.2f}x "
            f"| {best['advlab FMN-L2'] / best['adv-lib FMN-L2']:.2f}x "
            f"| {l2['advlab DDN']:.4f}, {l2['adv-lib DDN']:.4f}, {l2['advlab FMN-L2']:.4f}, "
            f"{l2['adv-lib FMN-L2']:.4f} ({100 * rate:.0f}%) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
