"""Minimum-norm attacks: advlab against Foolbox 3 and adv-lib on MNIST-size inputs.

Same trained models (Fashion-MNIST 28x28, the MNIST-size data on this machine: three fully
connected nets and a small CNN), same examples (the first N test images each model classifies
correctly), same thread count for everyone. For each model it prints:

1. a markdown table (success rate, mean L2 over the examples every attack fooled and over each
   attack's own successes, wall and cpu time, gradient evaluations per example);
2. the issue's targets: L-BFGS (3 nearest targets, from x and started from ALMA-50's points;
   all targets) wall time / Foolbox DDN's and mean L2 against the best peer at 100% success;
   advlab DDN, FMN and ALMA against adv-lib's (mean L2 and wall time at the same steps); advlab
   C&W's success at 9 x 100 steps;
3. with --budgets, AttackBench-style quality at equal budgets of 100, 300 and 1,000 gradient
   evaluations per example (`benchmarks/attack_budgets.py`).

Every attack that takes under 5 s is timed as the best of --repeats runs, taken round robin over
the model's attacks, so a busy spell on a shared machine hits them all alike.

    pip install -e '.[bench]'       # foolbox, adv-lib (see pyproject), torchattacks
    python benchmarks/attacks.py --examples 200 --threads 1 [--models fc10,cnn] [--budgets]

Models are trained once with advlab.train.train_model (seeded) and cached under --cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from advlab.attacks import (
    alma,
    carlini_wagner,
    ddn,
    deepfool,
    fmn,
    lbfgs_attack,
    lbfgs_scipy_reference,
)
from advlab.attacks.registry import run_attack
from advlab.data import load_dataset
from advlab.models import build_model
from advlab.runtime import error_rate
from advlab.spec import TrainSpec
from advlab.train import train_model

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
# The advlab L-BFGS rows the targets are checked on; the scipy reference reruns the first.
HEADLINE = "advlab L-BFGS margin, all targets"
NEAREST = "advlab L-BFGS margin, 3 nearest targets"
STARTED = "advlab L-BFGS margin, 3 nearest from ALMA-50"  # searches begin at ALMA's points
DDN = "Foolbox DDN (100 steps)"
OURS_VS_ADVLIB = {  # advlab row -> adv-lib row at the same budget (ALMA's: --alma-steps)
    "advlab DDN (100 steps)": "adv-lib DDN (100 steps)",
    "advlab FMN-L2 (100 steps)": "adv-lib FMN-L2 (100 steps)",
    "advlab ALMA-L2": "adv-lib ALMA-L2",
}
CW_SMALL = "advlab C&W (9x100)"


@dataclass
class Row:
    """One attack's outcome on one model's examples."""

    name: str
    x_adv: Tensor
    seconds: float  # wall clock
    cpu: float  # this process's CPU time: less sensitive to other load on a shared machine
    grad_evals: float = math.nan
    note: str = ""


# --------------------------------------------------------------------------- models and data


def trained_model(
    dataset: str, name: str, epochs: int, train_examples: int, cache: Path, root: str | None
) -> tuple[nn.Module, Tensor, Tensor, float]:
    """A seeded, trained model (cached on disk), the test set and its test error."""
    data = load_dataset(dataset, root)
    settings = TrainSpec(epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3)
    key = json.dumps([dataset, name, epochs, train_examples, settings.model_dump()], sort_keys=True)
    stem = name.replace(":", "_")
    path = cache / f"{dataset}_{stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    torch.manual_seed(0)
    arch, _, activation = name.partition(":")  # "fc200-200-10:relu": hidden units' activation
    model = build_model(arch, data.input_shape, data.num_classes, activation or "sigmoid")
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        x_train, y_train = data.x_train[:train_examples], data.y_train[:train_examples]
        start = time.perf_counter()
        train_model(model, x_train, y_train, data.x_test, data.y_test, settings, 1e-5, seed=0)
        print(f"  trained {dataset}/{name} in {time.perf_counter() - start:.0f}s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    return model, data.x_test, data.y_test, error_rate(model, data.x_test, data.y_test)


def first_correct(model: nn.Module, x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first n test examples the model classifies correctly."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    idx = correct.nonzero().squeeze(1)[:n]
    return x[idx], y[idx]


# --------------------------------------------------------------------------- attacks


# Attacks faster than this are rerun and timed by their best run (timeit's rule: the minimum is
# the run least disturbed by the rest of the machine); slower ones run once. Reruns go round
# robin over a model's attacks, so a busy spell on the machine hits them all alike.
REPEAT_BELOW_S = 5.0
REPEATS = 3

Run = Callable[[], tuple[Tensor, float]]  # -> (adversarial images, grad evals per example)


@dataclass
class Job:
    """One attack to time: its table name, how to run it, a note for the table."""

    name: str
    run: Run
    note: str = ""


def _timed(run: Run) -> tuple[Tensor, float, float, float]:
    """(adversarial images, grad evals, wall seconds, cpu seconds) of one run."""
    start, cpu = time.perf_counter(), time.process_time()
    x_adv, evals = run()
    return x_adv, evals, time.perf_counter() - start, time.process_time() - cpu


def run_jobs(jobs: list[Job]) -> list[Row]:
    """Run every job, then rerun the fast ones round robin; best wall and cpu time of each."""
    rows = []
    for job in jobs:
        x_adv, evals, wall, cpu = _timed(job.run)
        rows.append(Row(job.name, x_adv.detach().cpu(), wall, cpu, evals, job.note))
    fast = [(job, row) for job, row in zip(jobs, rows, strict=True) if row.seconds < REPEAT_BELOW_S]
    for _ in range(REPEATS - 1):
        for job, row in fast:
            _, _, wall, cpu = _timed(job.run)
            row.seconds, row.cpu = min(row.seconds, wall), min(row.cpu, cpu)
    return rows


def _advlab(attack: Callable[[], object]) -> Run:
    def go() -> tuple[Tensor, float]:
        result = attack()
        return result.x_adv, float(result.grad_evals.float().mean())  # type: ignore[attr-defined]

    return go


# As a sweep file writes it: {name: lbfgs, target: all, loss: margin, start: alma, ...}. ALMA
# runs 50 steps at 10x its default step size (a short run must travel as far as a long one);
# from its points 8 iterations per solve suffice (the default 10: the same L2 to 0.2%, 4-10%
# more evaluations; docs/attacks.md).
FROM_ALMA = {"target": "all", "loss": "margin", "candidates": 3, "max_iter": 8, "start": "alma",
             "start_settings": {"steps": 50, "lr_init": 1.0}}  # fmt: skip
FROM_DDN = {**FROM_ALMA, "start": "ddn", "start_settings": {"steps": 50}}


def advlab_jobs(model: nn.Module, x: Tensor, y: Tensor, alma_steps: int) -> list[Job]:
    m, untargeted = model, {"target": "untargeted", "candidates": None}
    jobs = [
        Job(HEADLINE, _advlab(lambda: lbfgs_attack(m, x, y, "all", loss="margin"))),
        Job(NEAREST, _advlab(lambda: lbfgs_attack(m, x, y, "all", loss="margin", candidates=3))),
        Job(STARTED, _advlab(lambda: run_attack("lbfgs", m, x, y, **FROM_ALMA))),
        Job(
            "advlab L-BFGS margin, 3 nearest from DDN-50",
            _advlab(lambda: run_attack("lbfgs", m, x, y, **FROM_DDN)),
        ),
        Job(
            "advlab L-BFGS margin, untargeted from ALMA-50",
            _advlab(lambda: run_attack("lbfgs", m, x, y, **{**FROM_ALMA, **untargeted})),
        ),
        Job("advlab DDN (100 steps)", _advlab(lambda: ddn(m, x, y))),
        Job("advlab FMN-L2 (100 steps)", _advlab(lambda: fmn(m, x, y))),
        Job("advlab DeepFool", _advlab(lambda: deepfool(m, x, y))),
        Job(CW_SMALL, _advlab(lambda: carlini_wagner(m, x, y, steps=100))),
    ]
    if alma_steps > 0:
        name = f"advlab ALMA-L2 ({alma_steps} steps)"
        jobs.append(Job(name, _advlab(lambda: alma(m, x, y, steps=alma_steps))))
    return jobs


def foolbox_jobs(model: nn.Module, x: Tensor, y: Tensor) -> list[Job]:
    try:
        import foolbox as fb
    except ImportError as err:
        print(f"  foolbox unavailable ({err}); pip install -e '.[bench]'", file=sys.stderr)
        return []
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    attacks = {
        DDN: fb.attacks.DDNAttack(steps=100),
        "Foolbox FMN-L2 (100 steps)": fb.attacks.L2FMNAttack(steps=100),
        "Foolbox DeepFool-L2": fb.attacks.L2DeepFoolAttack(steps=50, overshoot=0.02),
        "Foolbox C&W-L2 (9x100)": fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=9, steps=100
        ),
    }
    jobs = []
    for name, attack in attacks.items():

        def go(attack: object = attack) -> tuple[Tensor, float]:
            _, clipped, _ = attack(fmodel, x, y, epsilons=None)  # type: ignore[operator]
            return clipped, math.nan

        jobs.append(Job(name, go))
    return jobs


def advlib_jobs(model: nn.Module, x: Tensor, y: Tensor, alma_steps: int) -> list[Job]:
    """adv-lib's ALMA, DDN and FMN (DDN unquantised: levels=None, like every other row)."""
    try:
        from adv_lib.attacks import alma
        from adv_lib.attacks import ddn as advlib_ddn
        from adv_lib.attacks import fmn as advlib_fmn
    except ImportError as err:
        print(f"  adv-lib unavailable ({err}); see pyproject's bench extra", file=sys.stderr)
        return []

    def job(name: str, attack: Callable[[], Tensor], steps: int) -> Job:
        return Job(name, lambda: (attack(), float(steps)))

    m, n = model, alma_steps
    return [
        job(f"adv-lib ALMA-L2 ({n} steps)", lambda: alma(m, x, y, num_steps=n), n),
        job("adv-lib DDN (100 steps)", lambda: advlib_ddn(m, x, y, steps=100, levels=None), 100),
        job("adv-lib FMN-L2 (100 steps)", lambda: advlib_fmn(m, x, y, norm=2, steps=100), 100),
    ]


def torchattacks_jobs(model: nn.Module, x: Tensor, y: Tensor) -> list[Job]:
    try:
        import torchattacks
    except ImportError as err:
        print(f"  torchattacks unavailable ({err}); pip install -e '.[bench]'", file=sys.stderr)
        return []
    attacks = {
        "torchattacks CW (c=1, 100 steps)": torchattacks.CW(model, c=1, steps=100, lr=0.01),
    }
    jobs = []
    for name, attack in attacks.items():

        def go(attack: object = attack) -> tuple[Tensor, float]:
            return attack(x, y), math.nan  # type: ignore[operator]

        jobs.append(Job(name, go, "no search over c"))
    return jobs


def scipy_row(model: nn.Module, x: Tensor, y: Tensor, n: int) -> tuple[Row, Row]:
    """The scipy reference and advlab on the same n examples, same mode (margin, all targets)."""
    ref, ours = run_jobs(
        [
            Job(
                "scipy L-BFGS-B per example, all targets",
                lambda: _result(lbfgs_scipy_reference(model, x[:n], y[:n], "all", loss="margin")),
            ),
            Job(
                HEADLINE + f" (first {n})",
                lambda: _result(lbfgs_attack(model, x[:n], y[:n], "all", loss="margin")),
            ),
        ]
    )
    return ref, ours


def _result(result: object) -> tuple[Tensor, float]:
    return result.x_adv, float(result.grad_evals.float().mean())  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- scoring


def score(model: nn.Module, x: Tensor, y: Tensor, rows: list[Row]) -> list[dict[str, object]]:
    """Success (recomputed here, so every library is judged the same way) and distances."""
    scored = []
    with torch.no_grad():
        for row in rows:
            adv = row.x_adv.to(x.dtype).clamp(0, 1)
            fooled = model(adv).argmax(1) != y
            l2 = (adv - x).flatten(1).norm(dim=1)
            scored.append({"row": row, "fooled": fooled, "l2": l2})
    # Common: fooled by every attack that fools at least half (one that fools almost nothing
    # would empty it); pairwise comparisons below use the examples both attacks fooled.
    strong = [s["fooled"] for s in scored if s["fooled"].float().mean() >= 0.5]  # type: ignore[union-attr]
    common = torch.stack(strong).all(dim=0) if strong else torch.zeros_like(y, dtype=torch.bool)
    for s in scored:
        fooled, l2 = s["fooled"], s["l2"]
        s["success"] = float(fooled.float().mean())  # type: ignore[union-attr]
        s["l2_common"] = float(l2[common].mean()) if common.any() else math.nan  # type: ignore[index]
        s["l2_own"] = float(l2[fooled].mean()) if fooled.any() else math.nan  # type: ignore[index]
        s["n_common"] = int(common.sum())
    return scored


def table(title: str, scored: list[dict[str, object]], n: int) -> str:
    n_common = scored[0]["n_common"] if scored else 0
    lines = [
        f"### {title}",
        "",
        f"| attack | success | mean L2 (common, n={n_common}) | mean L2 (own successes) "
        f"| wall s | cpu s | ms / example | grad evals / example | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in scored:
        row: Row = s["row"]  # type: ignore[assignment]
        evals = "" if math.isnan(row.grad_evals) else f"{row.grad_evals:.0f}"
        per = 1000 * row.seconds / max(1, len(row.x_adv))
        lines.append(
            f"| {row.name} | {s['success']:.1%} | {s['l2_common']:.4f} | {s['l2_own']:.4f} "
            f"| {row.seconds:.2f} | {row.cpu:.2f} | {per:.1f} | {evals} | {row.note} |"
        )
    return "\n".join(lines)


def targets(scored: list[dict[str, object]], ref: Row | None, ours_small: Row | None) -> str:
    """The issue's ratios for one model (see the module doc)."""
    by_name = {s["row"].name: s for s in scored}  # type: ignore[union-attr]
    lines = _lbfgs_targets(scored, by_name) + _advlib_targets(by_name)
    if CW_SMALL in by_name:
        ok = by_name[CW_SMALL]["success"] == 1.0
        lines.append(
            f"- {CW_SMALL}: success {by_name[CW_SMALL]['success']:.1%} "
            f"(target 100%: {'met' if ok else 'MISSED'})"
        )
    if ref is not None and ours_small is not None:
        n_ref = len(ref.x_adv)
        head: Row = by_name[HEADLINE]["row"]  # type: ignore[assignment]
        speedup = (ref.cpu / n_ref) / (head.cpu / len(head.x_adv))
        lines.append(
            f"- scipy reference: {1000 * ref.cpu / n_ref:.0f} cpu ms/example -> advlab batched "
            f"{speedup:.1f}x faster per example (cpu); {ref.cpu / ours_small.cpu:.1f}x on the "
            f"same {n_ref} examples"
        )
    return "\n".join(lines)


def _lbfgs_targets(scored: list[dict], by_name: dict[str, dict]) -> list[str]:
    """L-BFGS mean L2 vs the best peer at 100% success; wall time vs Foolbox DDN's."""
    peers = [s for s in scored if not s["row"].name.startswith("advlab") and s["success"] == 1.0]
    best = min(peers, key=lambda s: s["l2_own"]) if peers else None
    lines = []
    for name, limit in ((NEAREST, 2.0), (STARTED, 2.0), (HEADLINE, 4.0)):
        if name not in by_name:
            continue
        mine = by_name[name]
        if best is not None:
            ratio = mine["l2_own"] / best["l2_own"]
            ok = ratio <= 1 and mine["success"] == 1.0
            lines.append(
                f"- L2: {name} {mine['l2_own']:.4f} vs best peer at 100% success "
                f"{best['row'].name} {best['l2_own']:.4f} -> ratio {ratio:.4f} "
                f"(target <= 1: {'met' if ok else 'MISSED'}; success {mine['success']:.1%})"
            )
        if DDN in by_name:
            ddn_row, row = by_name[DDN]["row"], mine["row"]
            wall, cpu = row.seconds / ddn_row.seconds, row.cpu / ddn_row.cpu
            lines.append(
                f"- time: {name} / {DDN} = {wall:.2f}x wall, {cpu:.2f}x cpu "
                f"(target <= {limit:g}x: {'met' if wall <= limit else 'MISSED'})"
            )
    return lines


def _advlib_targets(by_name: dict[str, dict]) -> list[str]:
    """advlab DDN / FMN / ALMA against adv-lib's at the same steps: mean L2 within 1%, no slower."""
    lines = []
    for ours_prefix, theirs_prefix in OURS_VS_ADVLIB.items():
        ours = next((name for name in by_name if name.startswith(ours_prefix)), None)
        theirs = next((name for name in by_name if name.startswith(theirs_prefix)), None)
        if ours is None or theirs is None:
            continue
        a, b = by_name[ours], by_name[theirs]
        both = a["fooled"] & b["fooled"]
        ratio = float(a["l2"][both].mean() / b["l2"][both].mean()) if both.any() else math.nan
        wall = a["row"].seconds / b["row"].seconds
        # Where the peer fools nothing there is no L2 to compare; more success counts as met.
        l2_ok = ratio <= 1.01 or (math.isnan(ratio) and a["success"] > b["success"])
        ok = l2_ok and wall <= 1.0
        lines.append(
            f"- {ours} vs {theirs}: success {a['success']:.1%} vs {b['success']:.1%}; mean L2 "
            f"ratio {ratio:.4f} on the {int(both.sum())} examples both fooled, own "
            f"{a['l2_own']:.4f} vs {b['l2_own']:.4f}; wall "
            f"{wall:.2f}x (target L2 <= 1.01x, wall <= 1x: {'met' if ok else 'MISSED'})"
        )
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per model")
    parser.add_argument("--models", default="fc10,fc100-100-10,fc200-200-10:relu,cnn")
    parser.add_argument("--datasets", default="fashion_mnist", help="also: digits (8x8)")
    parser.add_argument("--fashion-root", default=FASHION_ROOT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for everyone")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="best of N runs (fast ones)")
    parser.add_argument("--epochs", type=int, default=0, help="0: 20 on digits, 3 otherwise")
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--scipy-examples", type=int, default=5, help="0: skip the scipy row")
    parser.add_argument("--alma-steps", type=int, default=1000, help="ALMA's steps (both)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--torchattacks", action="store_true", help="add torchattacks' CW")
    parser.add_argument("--budgets", action="store_true", help="AttackBench-style table too")
    parser.add_argument("--budget-examples", type=int, default=100)
    parser.add_argument("--budget-only", action="store_true", help="skip the timing table")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/advlab/bench")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    return parser.parse_args(argv)


def compare(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, title: str) -> str:
    """The timing and L2 table for one model, with its targets."""
    jobs = advlab_jobs(model, x, y, 0 if args.no_peers else args.alma_steps)  # ALMA: vs adv-lib
    if not args.no_peers:
        jobs += foolbox_jobs(model, x, y) + advlib_jobs(model, x, y, args.alma_steps)
        jobs += torchattacks_jobs(model, x, y) if args.torchattacks else []
    rows = run_jobs(jobs)
    ref = ours_small = None
    if args.scipy_examples > 0:
        ref, ours_small = scipy_row(model, x, y, min(args.scipy_examples, len(x)))
    scored = score(model, x, y, rows)
    return table(title, scored, len(x)) + "\n\n" + targets(scored, ref, ours_small)


def main(argv: list[str] | None = None) -> int:
    global REPEATS
    args = parse_args(argv)
    REPEATS = max(1, args.repeats)
    torch.set_num_threads(args.threads)
    report = [
        f"torch {torch.__version__}, {args.threads} thread(s), {args.examples} examples per model"
    ]
    for dataset in args.datasets.split(","):
        root = None if dataset == "digits" else args.fashion_root
        epochs = args.epochs or (20 if dataset == "digits" else 3)
        for name in args.models.split(","):
            model, x_test, y_test, err = trained_model(
                dataset, name, epochs, args.train_examples, args.cache, root
            )
            title = f"{dataset} {name} (test error {err:.1%})"
            blocks = []
            if not args.budget_only:
                x, y = first_correct(model, x_test, y_test, args.examples)
                print(f"{dataset}/{name}: test error {err:.3f}, {len(x)} examples", flush=True)
                blocks.append(compare(model, x, y, args, title))
            if args.budgets or args.budget_only:
                from attack_budgets import budget_table  # beside this file

                xb, yb = first_correct(model, x_test, y_test, args.budget_examples)
                blocks.append(budget_table(model, xb, yb, title, args.alma_steps > 0))
            for block in blocks:
                print(block + "\n", flush=True)
                report.append(block)
                if args.out is not None:  # as it goes: a long run keeps what it finished
                    args.out.write_text("\n\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
