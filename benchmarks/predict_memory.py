"""Peak memory and time of `advlab.runtime.predict` on 4,096 CIFAR-shaped images: the old fixed
4,096-row batches against batches sized by the activations a row makes (`predict_rows`), side by
side in one run, on an FC net, advlab's small CNN and torchvision's resnet18 (untrained: memory
and time do not depend on the weights).

Each case runs in a fresh process with one torch thread; memory is the peak resident set above
the process's own after building the model and the images (Linux: the peak is reset through
/proc/self/clear_refs). The labels of both cases are compared.

    python benchmarks/predict_memory.py --images 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["fc100-100-10", "cnn", "torchvision:resnet18"]
CASES = {"4,096 rows": 4096, "sized by activations": None}


def one_case(model_name: str, batch: int | None, images: int) -> dict:
    import torch

    from advlab.models import build_model
    from advlab.runtime import predict, predict_rows

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10, activation="relu")
    x = torch.rand(images, 3, 32, 32)
    rows = batch or predict_rows(model, x)
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    labels = predict(model, x, batch_size=rows)
    seconds = time.perf_counter() - start
    peak = _rss_mb("VmHWM") - before
    return {"rows": rows, "s": seconds, "peak_mb": peak, "labels": labels.tolist()}


def _rss_mb(field: str) -> float:
    """A memory figure of this process from /proc (kB there), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def run(model: str, case: str, images: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--model", model, "--case", case, "--images", str(images)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.model, CASES[args.case], args.images)))
        return
    print(f"{args.images} images of 3x32x32, one torch thread, a fresh process per case")
    header = "model | case | rows per batch | predict s | peak MB over start | memory ratio"
    print(f"| {header} | time ratio | same labels |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        rows = {case: run(model, case, args.images) for case in CASES}
        base = rows["4,096 rows"]
        for case, r in rows.items():
            print(
                f"| {model} | {case} | {r['rows']} | {r['s']:.2f} | {r['peak_mb']:.0f} | "
                f"{r['peak_mb'] / base['peak_mb']:.2f} | {r['s'] / base['s']:.2f} | "
                f"{r['labels'] == base['labels']} |"
            )


if __name__ == "__main__":
    main()
