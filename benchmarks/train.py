"""Training throughput: advlab.train.train_model against a bare hand-written PyTorch loop.

Same model, data, batch size, optimizer and epochs; the bare loop does only forward, cross-entropy,
backward and step, so the ratio prices everything advlab adds (the explicit weight-decay penalty,
the seeded shuffle, running train error; test error only after the last epoch), and a second
column adds advlab's default test-error evaluation after every epoch. Runs alternate between the two
so drift in machine speed hits both alike; the best of the repeats is reported.

    .venv/bin/python benchmarks/train.py --dataset fashion_mnist \
        --root /usr/share/datasets/fashion-mnist --models fc10 fc100-100-10 fc200-200-10
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from advlab.data import load_dataset
from advlab.models import build_model
from advlab.spec import TrainSpec
from advlab.train import train_model


def bare_loop(model: nn.Module, x: Tensor, y: Tensor, settings: TrainSpec, seed: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        for idx in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def samples_per_second(run: Callable[[], object], n: int, epochs: int) -> float:
    start = time.perf_counter()
    run()
    return n * epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--models", nargs="+", default=["fc10", "fc100-100-10"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.root)
    x, y = data.x_train, data.y_train
    settings = TrainSpec(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam", lr=1e-3)
    print(
        f"{args.dataset}: {len(x)} training images, {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.threads} thread(s), best of {args.repeats}"
    )
    print(
        "| model | bare loop (samples/s) | advlab (samples/s) | ratio | advlab + test error "
        "every epoch | ratio |"
    )
    print("|---|---|---|---|---|---|")
    quiet = settings.model_copy(update={"eval_every": 0})
    for name in args.models:
        bare, ours, evaluated = [], [], []
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            model = build_model(name, data.input_shape, data.num_classes)
            run = functools.partial(bare_loop, model, x, y, settings, repeat)
            bare.append(samples_per_second(run, len(x), args.epochs))
            for chosen, times in ((quiet, ours), (settings, evaluated)):
                torch.manual_seed(repeat)
                model = build_model(name, data.input_shape, data.num_classes)
                run = functools.partial(
                    train_model, model, x, y, data.x_test, data.y_test, chosen, 1e-4, repeat
                )
                times.append(samples_per_second(run, len(x), args.epochs))
        b, o, e = max(bare), max(ours), max(evaluated)  # best: the least disturbed by load
        print(f"| {name} | {b:,.0f} | {o:,.0f} | {o / b:.2f} | {e:,.0f} | {e / b:.2f} |")


if __name__ == "__main__":
    main()
