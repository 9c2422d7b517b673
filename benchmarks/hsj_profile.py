"""advlab's half of benchmarks/hopskipjump_art.py alone: where HopSkipJump's time goes.

Same models and examples; one torch thread; prints per model the wall and CPU seconds of the
attack and the CPU seconds inside the model's label oracle (`argmax_labels` where the model has
one, else `forward`), the rest being HopSkipJump's own work (random probes, binary and step
searches). CPU seconds move less than wall time on a shared machine. `--save`/`--compare`
store and check the adversarials and query counts bit for bit, e.g. against another checkout:

    PYTHONPATH=/path/to/main python benchmarks/hsj_profile.py --save /tmp/ref
    python benchmarks/hsj_profile.py --compare /tmp/ref
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hopskipjump_art import digits, fitted

from advlab.attacks import hopskipjump


def timed_oracle(module: torch.nn.Module, spent: list[float]) -> None:
    """Count the CPU seconds of the module's label oracle in `spent` (on this instance)."""
    name = "argmax_labels" if hasattr(module, "argmax_labels") else "forward"
    inner = getattr(module, name)

    def counted(x: torch.Tensor) -> torch.Tensor:
        start = time.process_time()
        out = inner(x)
        spent[0] += time.process_time() - start
        return out

    setattr(module, name, counted)  # an instance attribute: nn.Module's __call__ finds it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logistic,rbf_svm,knn")
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--queries", type=int, default=24_450)  # ART's budget there
    parser.add_argument("--save", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, x_train, y_train = digits()
    for name in args.models.split(","):
        model = fitted(name, x_train, y_train)
        keep = model.predict(data.x_test) == data.y_test
        x, y = data.x_test[keep][: args.examples], data.y_test[keep][: args.examples]
        spent = [0.0]
        timed_oracle(model.module, spent)
        wall, cpu = time.perf_counter(), time.process_time()
        result = hopskipjump(model.module, x, y, max_queries=args.queries,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        line = f"model={name} wall_s={wall:.3f} cpu_s={cpu:.3f} oracle_cpu_s={spent[0]:.3f}"
        out = {"x_adv": result.x_adv, "queries": result.grad_evals}
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save(out, args.save / f"{name}.pt")
        if args.compare:
            ref = torch.load(args.compare / f"{name}.pt")
            same = all(torch.equal(ref[k], out[k]) for k in out)
            line += f" identical_to_saved={same}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
