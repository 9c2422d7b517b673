"""Memory and time of one training epoch on an npz read whole against the same file streamed
(memory-mapped, read per batch; with 0 and 2 DataLoader workers), side by side in one run.

Each case runs in a fresh process: load the data, train fc10 for one epoch over the training
set, evaluate the test error. Memory is the peak resident set above the process's own after its
imports (Linux: the peak is reset through /proc/self/clear_refs once the imports are done).
The data is sweeps/cifar_like.py's (32x32x3 uint8), written to a temporary folder.

    python benchmarks/streaming.py --train 20000 --test 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "in memory": (False, 0),
    "streamed, 0 workers": (True, 0),
    "streamed, 2 workers": (True, 2),
}


def one_case(path: str, streaming: bool, workers: int) -> dict:
    import torch

    from advlab.models import build_model
    from advlab.runtime import error_rate
    from advlab.sources import load_data
    from advlab.spec import TrainSpec
    from advlab.train import train_model

    torch.set_num_threads(1)
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the RSS now
    start = time.perf_counter()
    data = load_data("npz", path=path, streaming=streaming, workers=workers)
    loaded = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("fc10", data.input_shape, data.num_classes)
    settings = TrainSpec(epochs=1, batch_size=128, optimizer="adam", lr=0.001, eval_every=0)
    train_model(model, data.x_train, data.y_train, data.x_test, data.y_test, settings, 0.0, 0)
    error = error_rate(model, data.x_test, data.y_test)
    return {
        "load_s": loaded - start,
        "epoch_s": time.perf_counter() - loaded,
        "test_error": error,
        "peak_rss_mb": _rss_mb("VmHWM") - before,
    }


def _rss_mb(field: str) -> float:
    """A memory figure of this process from /proc (kB there), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.path, *CASES[args.case])))
        return
    found = importlib.util.spec_from_file_location(
        "cifar_like", Path(__file__).parent.parent / "sweeps" / "cifar_like.py"
    )
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "data.npz")
        module.write(Path(path), args.train, args.test)
        size = Path(path).stat().st_size / 2**20
        print(f"{args.train} + {args.test} images of 32x32x3, npz {size:.0f} MB; fc10, 1 epoch")
        rows = {}
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, "--path", path],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            rows[case] = json.loads(out.strip().splitlines()[-1])
    base = rows["in memory"]
    print(
        "| case | load s | epoch s | peak RSS over imports, MB | ratio to in memory | test error |"
    )
    print("|---|---|---|---|---|---|")
    for case, r in rows.items():
        ratio = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(
            f"| {case} | {r['load_s']:.2f} | {r['epoch_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{ratio:.2f} | {r['test_error']:.4f} |"
        )


if __name__ == "__main__":
    main()
