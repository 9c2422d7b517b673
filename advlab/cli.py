"""`advlab validate | sweep | trial | report`. Exit codes: 0 ok, 1 trials failed, 2 bad input."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import yaml

from advlab.spec import SpecError
from advlab.sweepfile import SweepSpec, load_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a sweep file without running anything")
    validate.add_argument("file")
    sets = {"action": "append", "metavar": "KEY=VALUE", "help": "override a sweep key (dotted)"}
    validate.add_argument("--set", **sets)

    sweep = commands.add_parser("sweep", help="run a sweep file's grid with Ray Tune")
    sweep.add_argument("file")
    sweep.add_argument("--set", **sets)
    sweep.add_argument("--storage", help="results root (path or s3://...); overrides the file")
    sweep.add_argument("--address", help="Ray cluster address ('auto' joins a running one)")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: as fit)")
    sweep.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    sweep.add_argument(
        "--fresh", action="store_true", help="rerun trials that already finished in this folder"
    )

    trial = commands.add_parser("trial", help="run one grid point in this process, without Ray")
    trial.add_argument("file")
    trial.add_argument("--set", **sets)
    trial.add_argument("--index", type=int, default=0, help="grid point, in grid order")
    trial.add_argument("--storage", help="results root; overrides the file")
    trial.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    transfer = commands.add_parser("transfer", help="all-pairs transfer over a finished sweep")
    transfer.add_argument("sweep_dir", metavar="SWEEP_DIR", help="<storage>/<sweep>")
    transfer.add_argument("--address", help="Ray cluster address ('auto' joins a running one)")

    ls = commands.add_parser("ls", help="the sweeps under a storage root, with trial counts")
    ls.add_argument("storage", nargs="?", default="results", help="results root (default results)")

    report = commands.add_parser("report", help="one HTML page from one or more sweep folders")
    report.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="<storage>/<sweep>")
    report.add_argument("-o", "--output", default="report.html")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return make_report(args.sweep_dirs, args.output)
    if args.command == "transfer":
        return transfer(args.sweep_dir, args.address)
    if args.command == "ls":
        return list_sweeps(args.storage)
    try:
        spec = load_sweep(args.file, overrides=_overrides(args))
        if args.command == "validate":
            return validate(spec)
        if args.command == "trial":
            return run_one(spec, args.index, args.wandb)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SpecError("--max-concurrent: must be at least 1")
        return sweep(spec, args.address, args.max_concurrent, args.wandb, args.fresh)
    except SpecError as err:
        message = str(err)
        if not message.startswith(args.file):  # checks past parsing name the file too
            message = f"{args.file}: {message}"
        print(f"advlab: error: {message}", file=sys.stderr)
        return 2


def transfer(sweep_dir: str, address: str | None) -> int:
    from advlab.store import SweepStore
    from advlab.sweep import log_results, transfer_lines
    from advlab.transfer import run_transfer
    from advlab.tuning import init_ray

    init_ray(address)
    try:
        outcome = run_transfer(sweep_dir)
    except FileNotFoundError as err:
        print(f"advlab: error: {err}", file=sys.stderr)
        return 2
    log_results(SweepStore.from_dir(sweep_dir))
    for line in transfer_lines(outcome):
        print(line)
    return 0


def list_sweeps(storage: str) -> int:
    from advlab.results import sweeps

    found = sweeps(storage)
    if not found:
        print(f"advlab: no sweeps under {storage}")
        return 0
    columns = {"versions": 8, "trials": 6, "ok": 4, "failed": 6, "missing": 7, "older": 5}
    print(f"{'sweep':<32}" + "".join(f" {name:>{width}}" for name, width in columns.items()))
    for row in found:
        cells = "".join(f" {row[name]:>{width}}" for name, width in columns.items())
        print(f"{row['sweep']:<32}{cells}")
    return 0


def make_report(sweep_dirs: list[str], output: str) -> int:
    from advlab.report import build_report

    try:
        path = build_report(sweep_dirs, output)
    except FileNotFoundError as err:
        print(f"advlab: error: {err}", file=sys.stderr)
        return 2
    print(f"advlab: report written to {path}")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set KEY=VALUE pairs (values read as YAML) and --storage, as dotted sweep keys."""
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item}: expected KEY=VALUE, e.g. --set train.epochs=5")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"--set {item}: the value is not valid YAML; quote it") from None
    if getattr(args, "storage", None):
        overrides["storage"] = args.storage
    return overrides


def validate(spec: SweepSpec) -> int:
    from advlab.preflight import preflight
    from advlab.store import SweepStore, resolve_storage

    preflight(spec, SweepStore(resolve_storage(spec.settings.storage), spec.name), None)
    axes = ", ".join(f"{k} ({len(v)})" for k, v in spec.settings.grid.items()) or "none"
    cases = f"{len(spec.settings.cases)} cases x " if spec.settings.cases else ""
    print(f"{spec.name}: valid, {len(spec.trials)} trials; {cases}grid axes: {axes}")
    return 0


def sweep(
    spec: SweepSpec,
    address: str | None,
    max_concurrent: int | None,
    wandb: str | None,
    fresh: bool,
) -> int:
    from advlab.sweep import run_sweep, summary_lines

    outcome = run_sweep(
        spec, address=address, max_concurrent=max_concurrent, wandb_mode=wandb, fresh=fresh
    )
    for line in summary_lines(outcome):
        print(line)
    if outcome.interrupted:
        return 130  # the shell's code for Ctrl-C
    return 0 if outcome.all_ok else 1


def run_one(spec: SweepSpec, index: int, wandb: str | None) -> int:
    import torch

    from advlab.store import resolve_storage
    from advlab.sweep import trial_context
    from advlab.track import resolve_mode
    from advlab.trial import run_trial

    if not 0 <= index < len(spec.trials):
        raise SpecError(f"--index: {index} is outside the grid; use 0..{len(spec.trials) - 1}")
    torch.set_num_threads(max(1, math.floor(spec.settings.resources.cpu)))  # as under Ray
    mode = resolve_mode(wandb or spec.settings.wandb.mode)
    ctx = trial_context(spec, index, resolve_storage(spec.settings.storage), mode)
    row = run_trial(spec.trials[index], ctx, report=lambda m, _: print(f"  epoch: {m}"))
    for key, value in row.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
