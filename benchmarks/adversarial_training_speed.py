"""Seconds per training epoch of each adversarial-training method, in one process.

The study sweep's own per-epoch times come from trials that ran two at a time on a machine
shared with other work; this times one epoch of every method on the same data, model and thread
count, round robin (so drift in machine speed hits every method alike), best of the repeats.

    python benchmarks/adversarial_training_speed.py --dataset fashion_mnist \
        --root /usr/share/datasets/fashion-mnist --subset fraction:0.25
    PYTHONPATH=sweeps python benchmarks/adversarial_training_speed.py --dataset fashion_mnist \
        --root /usr/share/datasets/fashion-mnist --subset fraction:0.25 \
        --model convnets:wong --model-args '{"width": 32, "hidden": 200}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.spec import AdversarialTrainingSpec, TrainSpec
from advlab.train import train_model

# As in sweeps/adversarial_training_study.yaml, at the full budget (no warm-up).
METHODS: dict[str, dict] = {
    "none": {},
    "fgsm": {"method": "fgsm", "eps": 0.2},
    "fast": {"method": "fast", "eps": 0.2, "mix": 0.0},
    "pgd-10": {"method": "pgd", "eps": 0.2, "mix": 0.0, "pgd_steps": 10},
    "trades-10": {"method": "trades", "eps": 0.2, "pgd_steps": 10},
    "free (m=4)": {"method": "free", "eps": 0.2, "mix": 0.0, "replays": 4},
}


def epoch_seconds(
    name: str, model_name: str, model_args: dict, x: torch.Tensor, y: torch.Tensor
) -> float:
    torch.manual_seed(0)
    shape = (x.shape[1], x.shape[2], x.shape[3])
    model = build_model(model_name, shape, 10, "relu", model_args or None)
    settings = TrainSpec(
        epochs=1, batch_size=128, optimizer="adam", lr=1e-3, eval_every=0,
        adversarial=AdversarialTrainingSpec(**METHODS[name]),
    )  # fmt: skip
    start = time.perf_counter()
    train_model(model, x, y, x[:10], y[:10], settings, 0.0, seed=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--subset", default="all")
    parser.add_argument("--model", default="fc100-100-10")
    parser.add_argument("--model-args", type=json.loads, default={}, help='e.g. {"width": 32}')
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.root)
    split = select_subset(data, args.subset)
    x, y = data.x_train[split.train_idx], data.y_train[split.train_idx]
    best = {name: float("inf") for name in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:
            best[name] = min(best[name], epoch_seconds(name, args.model, args.model_args, x, y))
    model = f"{args.model} {json.dumps(args.model_args)}" if args.model_args else args.model
    print(f"{model}, {len(x)} training images, batch 128, {args.threads} thread(s)\n")
    print("| method | s / epoch | x standard |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / best['none']:.1f} |")


if __name__ == "__main__":
    main()
