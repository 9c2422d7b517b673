"""L-BFGS against the exact minimum on a linear model, target for target.

A softmax regression (fc10) is trained full batch on a data set; for its first N correctly
classified test images the exact box-constrained L2 minimum is computed (advlab.bounds.exact:
closed form untargeted, HiGHS toward a given class) and set beside L-BFGS's distortion for the
same goal: the paper's random target (the same targets for both), and `all` (every wrong class,
the closest kept) against the untargeted minimum. Prints the median and mean ratio and the share
of examples within 1% of the minimum, per setting.

    python benchmarks/lbfgs_exact.py --dataset digits --examples 50
    python benchmarks/lbfgs_exact.py --dataset fashion_mnist \
        --root /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advlab.attacks.lbfgs import lbfgs_attack
from advlab.bounds.exact import linear_minimum
from advlab.data import load_dataset


def trained_fc10(x: torch.Tensor, y: torch.Tensor, classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), classes))
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def ratios(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, goal: str, **kw: object
) -> np.ndarray:
    """L-BFGS's L2 distortion over the exact minimum for the same goal, per fooled example."""
    gen = torch.Generator().manual_seed(0)
    found = lbfgs_attack(model, x, y, goal, generator=gen, **kw)
    dist = (found.x_adv - x).flatten(1).norm(dim=1).double().numpy()
    target = None if goal == "all" else found.target
    exact = np.array([r.lower for r in linear_minimum(model, x, y, norm="l2", target=target)])
    ok = found.success.numpy() & (exact > 0)
    return dist[ok] / exact[ok]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--examples", type=int, default=50)
    args = parser.parse_args()
    data = load_dataset(args.dataset, root=args.root)
    model = trained_fc10(data.x_train, data.y_train, data.num_classes)
    with torch.no_grad():
        right = model(data.x_test).argmax(1) == data.y_test
    x, y = data.x_test[right][: args.examples], data.y_test[right][: args.examples]
    print("| goal | L-BFGS settings | fooled | median / minimum | mean | within 1% |")
    print("|---|---|---|---|---|---|")
    for goal, kw in (
        ("random", {}),
        ("random", {"loss": "margin"}),
        ("all", {"loss": "margin"}),
    ):
        r = ratios(model, x, y, goal, **kw)
        settings = ", ".join(f"{k} {v}" for k, v in kw.items()) or "defaults"
        print(f"| {goal} | {settings} | {len(r)}/{len(x)} | {np.median(r):.4f} | "
              f"{r.mean():.4f} | {(r <= 1.01).mean():.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
