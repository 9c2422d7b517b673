"""`advlab validate | sweep | trial | transfer | compact | report | ls`.

Exit codes: 0 ok, 1 trials failed (each recorded with its reason), 2 bad input (one line naming
the key and the fix; nothing was run or written), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import yaml

from advlab import text
from advlab.data import Dataset
from advlab.spec import SpecError
from advlab.streaming import StreamedImages
from advlab.sweepfile import SweepSpec, is_relative_path, load_sweep, submitted_job
from advlab.yamlfile import YAMLRefused, load_text

MAX_MESSAGE = 400  # an error line stays a line, whatever value it quotes


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes as advlab's: one line, exit 2 (not a usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see `{self.prog} --help`")


def fail(message: str) -> NoReturn:
    print(f"advlab: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def one_line(message: str) -> str:
    line = text.one_line(message)
    return line if len(line) <= MAX_MESSAGE else f"{line[: MAX_MESSAGE - 3]}..."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="advlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sets = {"action": "append", "metavar": "KEY=VALUE", "help": "override a sweep key (dotted)"}
    modes = ["auto", "online", "offline", "disabled"]
    address = {"help": "Ray cluster address ('auto' joins a running one)"}

    validate = commands.add_parser("validate", help="check a sweep file without running anything")
    validate.add_argument("file")
    validate.add_argument("--set", **sets)
    validate.add_argument("--storage", help="results root; overrides the file")

    sweep = commands.add_parser("sweep", help="run a sweep file's trials with Ray Tune")
    sweep.add_argument("file")
    sweep.add_argument("--set", **sets)
    sweep.add_argument("--storage", help="results root (path or s3://...); overrides the file")
    sweep.add_argument("--address", **address)
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: as fit)")
    sweep.add_argument("--wandb", choices=modes)
    sweep.add_argument("--fresh", action="store_true", help="rerun and retrain every trial")
    sweep.add_argument("--verbose", "-v", action="count", default=0, help="Ray's own output too")

    trial = commands.add_parser("trial", help="run one grid point in this process, without Ray")
    trial.add_argument("file")
    trial.add_argument("--set", **sets)
    trial.add_argument("--index", type=int, default=0, help="grid point, in grid order")
    trial.add_argument("--storage", help="results root; overrides the file")
    trial.add_argument("--wandb", choices=modes)

    transfer = commands.add_parser(
        "transfer", help="the transfer stage of a finished sweep (its transfer.pairs)"
    )
    transfer.add_argument("sweep_dir", metavar="SWEEP_DIR", help="<storage>/<sweep>")
    transfer.add_argument("--address", **address)
    transfer.add_argument("--verbose", "-v", action="count", default=0)

    compact = commands.add_parser(
        "compact", help="merge a sweep's per-trial parquet files into one file per table"
    )
    compact.add_argument("sweep_dir", metavar="SWEEP_DIR", help="<storage>/<sweep>")

    ls = commands.add_parser("ls", help="the sweeps under a storage root, with trial counts")
    ls.add_argument("storage", nargs="?", default="results", help="results root (default results)")

    _report_arguments(commands.add_parser("report", help="one HTML page from sweep folders"))
    return parser


def _report_arguments(report: argparse.ArgumentParser) -> None:
    """`advlab report`'s arguments: the sweeps, the page, and what it shows (filters, top-k,
    charts against grid axes; advlab.report.settings)."""
    report.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="<storage>/<sweep>")
    report.add_argument("-o", "--output", default="report.html")
    report.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="AXIS=VALUE",
        help="only configurations with this grid value (repeat: each axis must "
        "match, one axis twice: either value)",
    )
    report.add_argument("--top", type=int, help="only the best K configurations by --rank-by")
    report.add_argument(
        "--rank-by",
        metavar="METRIC",
        help="test_error (default), train_error, "
        "..., or ATTACK:COLUMN[@BUDGET] such as lbfgs:mean_dist_rms",
    )
    report.add_argument("--descending", action="store_true", help="rank highest first")
    report.add_argument(
        "--chart",
        action="append",
        default=[],
        metavar="AXIS",
        help="chart the metrics against this grid axis (repeatable)",
    )
    report.add_argument(
        "--chart-metric",
        action="append",
        default=[],
        metavar="METRIC",
        help="a metric for those charts, as for --rank-by (repeatable)",
    )
    report.add_argument("--rows", type=int, help="table rows at most (default 50)")


def main(argv: list[str] | None = None) -> int:
    from advlab.data import DataError
    from advlab.filesystems import BadStorage
    from advlab.storage_errors import failure_reason, storage_problem
    from advlab.store import SweepBusy

    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "validate": validate, "sweep": sweep, "trial": run_one, "transfer": transfer,
        "ls": list_sweeps, "report": make_report, "compact": compact,
    }  # fmt: skip
    try:
        return commands[args.command](args)
    except (SpecError, DataError, SweepBusy, BadStorage, FileNotFoundError,
            NotADirectoryError) as err:  # fmt: skip
        message = str(err)
        file = getattr(args, "file", None)
        if file and not message.startswith(file):  # checks past parsing name the file too
            message = f"{file}: {message}"
        print(f"advlab: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a sweep's own handling (validate, trial, ...)
        print("advlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as err:  # storage failed mid-run: what is wrong with it, not a traceback
        if storage_problem(err) is None:
            raise
        print(f"advlab: error: {one_line(failure_reason(err))}", file=sys.stderr)
        return 1


def _spec(args: argparse.Namespace) -> SweepSpec:
    return load_sweep(args.file, overrides=_overrides(args))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set KEY=VALUE pairs (values read as YAML) and --storage, as dotted sweep keys."""
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item}: expected KEY=VALUE, e.g. --set train.epochs=5")
        try:
            overrides[key] = load_text(value)
        except YAMLRefused as err:
            raise SpecError(f"--set {key}: {err}") from None
        except yaml.YAMLError:
            raise SpecError(f"--set {key}: the value is not valid YAML; quote it") from None
    if getattr(args, "storage", None):
        overrides["storage"] = _command_line_storage(args.storage)
    return overrides


def _command_line_storage(storage: str) -> str:
    """--storage is a command-line path: relative to where the command runs (made absolute
    here, so the sweep file's folder does not apply); under `ray job submit` that is Ray's
    temporary copy of the working dir, so a relative one is refused there."""
    if not is_relative_path(storage):
        return storage
    if submitted_job():
        raise SpecError(
            f"--storage {storage}: relative, and under `ray job submit` the working directory "
            "is Ray's temporary copy (removed with the job); give an absolute path every node "
            "sees or a URI (s3://BUCKET/advlab)"
        )
    return os.path.abspath(os.path.expanduser(storage))


def validate(args: argparse.Namespace) -> int:
    from advlab.preflight import preflight
    from advlab.sweep import open_store

    spec = _spec(args)
    datasets = preflight(spec, open_store(spec), None)
    axes = ", ".join(f"{k} ({len(v)})" for k, v in spec.settings.grid.items()) or "none"
    cases = f"{len(spec.settings.cases)} cases x " if spec.settings.cases else ""
    search = spec.settings.search
    if search.algorithm == "grid":
        count = text.count(len(spec.trials), "trial")
    else:
        space = ", ".join(search.space)
        samples = search.num_samples * len(spec.trials)
        count = f"{search.algorithm} search of {text.count(samples, 'sample')} over {space}"
    print(f"{spec.name}: valid, {count}; {cases}grid axes: {axes}")
    for data in datasets.values():
        print(f"  {data_line(data)}")
    return 0


def data_line(data: Dataset) -> str:
    """A data set as validate states it: where its images came from and how they were read."""
    c, h, w = data.input_shape
    read = f"built in, {c}x{h}x{w}"
    if data.layout:
        read = f"images {data.layout}, read as (N, C, H, W) = {c}x{h}x{w}"
    if isinstance(data.x_train, StreamedImages):
        read += f", streamed per batch with {text.count(data.x_train.workers, 'worker')}"
    counts = [
        text.count(len(data.y_train), "training image"),
        text.count(len(data.y_test), "test image"),
        text.count(data.num_classes, "class", "classes"),
    ]
    return f"data {data.name}: {read}; {', '.join(counts)}"


def sweep(args: argparse.Namespace) -> int:
    from advlab.sweep import run_sweep, summary_lines

    spec = _spec(args)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SpecError("--max-concurrent: must be at least 1")
    outcome = run_sweep(
        spec, address=args.address, max_concurrent=args.max_concurrent, wandb_mode=args.wandb,
        fresh=args.fresh, verbose=args.verbose,
    )  # fmt: skip
    for line in summary_lines(outcome):
        print(line)
    if outcome.interrupted:
        return 130  # the shell's code for Ctrl-C
    return 0 if outcome.all_ok else 1


def run_one(args: argparse.Namespace) -> int:
    import torch

    from advlab.plugins import UserExit
    from advlab.preflight import preflight_trial
    from advlab.store import SweepStore, resolve_storage
    from advlab.sweep import trial_context
    from advlab.track import resolve_mode
    from advlab.trial import run_trial

    spec = _spec(args)
    if not 0 <= args.index < len(spec.trials):
        raise SpecError(f"--index: {args.index} is outside the grid; use 0..{len(spec.trials) - 1}")
    torch.set_num_threads(max(1, math.floor(spec.settings.resources.cpu)))  # as under Ray
    mode = resolve_mode(args.wandb or spec.settings.wandb.mode)
    ctx = trial_context(spec, args.index, resolve_storage(spec.settings.storage), mode)
    preflight_trial(spec, args.index, SweepStore(ctx.storage, spec.name))
    try:
        result = run_trial(spec.trials[args.index], ctx, report=_print_progress)
    except UserExit as err:  # its failed row holds the reason; a traceback would add nothing
        print(f"advlab: error: the trial failed: {one_line(str(err))}", file=sys.stderr)
        return 1
    for key, value in (result.row | result.metrics).items():
        print(f"{key}: {value}")
    return 0


def _print_progress(metrics: dict[str, Any], _state: Any) -> None:
    """`advlab trial`'s progress: each epoch's stats, and each attack run as it starts."""
    if "attack_run" in metrics:
        run, runs, name = metrics["attack_run"], metrics["attack_runs"], metrics["attack"]
        print(f"  attack run {run}/{runs}: {name}", flush=True)
    else:
        print(f"  epoch: {metrics}", flush=True)


def transfer(args: argparse.Namespace) -> int:
    from advlab.store import SweepStore
    from advlab.sweep import log_results, transfer_lines
    from advlab.sweep_settings import TransferSpec
    from advlab.transfer import run_transfer, stale_reason
    from advlab.tuning import init_ray

    if SweepStore.from_dir(args.sweep_dir).read("trials").empty:  # before Ray starts
        raise FileNotFoundError(
            f"{args.sweep_dir}: no trials to transfer between; run the sweep first"
        )
    store = SweepStore.from_dir(args.sweep_dir)
    settings = TransferSpec.model_validate((store.read_manifest() or {}).get("transfer", {}))
    # A stage cut off (or made stale) resumes with its missing shards; a whole, current one
    # is what the user asks to make again (a model replaced on disk, say): every shard reruns.
    fresh = stale_reason(store, settings) is None
    init_ray(args.address, args.verbose)
    outcome = run_transfer(args.sweep_dir, settings, fresh=fresh)
    log_results(SweepStore.from_dir(args.sweep_dir))
    for line in transfer_lines(outcome):
        print(line)
    return 0 if not outcome.failed_targets else 1


def compact(args: argparse.Namespace) -> int:
    from advlab.compact import compact_sweep, summary_line
    from advlab.store import SweepStore

    store = SweepStore.from_dir(args.sweep_dir, read_only=True)
    if store.read_manifest() is None and store.read("trials").empty:
        raise FileNotFoundError(
            f"{args.sweep_dir}: no advlab results here; pass a <storage>/<sweep> folder"
        )
    print(summary_line(compact_sweep(args.sweep_dir)))
    return 0


def list_sweeps(args: argparse.Namespace) -> int:
    from advlab.results import sweeps

    found = sweeps(args.storage)
    if not found:
        print(f"advlab: no sweeps under {args.storage}")
        return 0
    columns = {
        "versions": 8, "trials": 6, "ok": 4, "failed": 6, "stopped": 7, "missing": 7, "older": 5,
    }  # fmt: skip
    print(f"{'sweep':<32}" + "".join(f" {name:>{width}}" for name, width in columns.items()))
    for row in found:
        cells = "".join(f" {row[name]:>{width}}" for name, width in columns.items())
        print(f"{row['sweep']:<32}{cells}")
    for row in found:  # what could not be read, left where it is
        for note in row["notes"]:
            print(f"advlab: {row['sweep']}: {note}", file=sys.stderr)
    return 0


def make_report(args: argparse.Namespace) -> int:
    check_output(args.output)
    from advlab.report import ReportSettingsError, build_report
    from advlab.report.settings import from_command_line

    try:
        settings = from_command_line(
            args.where, args.top, args.rank_by, args.descending, args.chart, args.chart_metric,
            args.rows,
        )  # fmt: skip
        notes: list[str] = []
        path = build_report(args.sweep_dirs, args.output, notes, settings)
    except ReportSettingsError as err:
        raise SpecError(str(err)) from None
    for note in notes:
        print(f"advlab: left out of the report: {note}", file=sys.stderr)
    print(f"advlab: report written to {path}")
    return 0


def check_output(output: str) -> None:
    """The report's file must be writable before minutes go into building it."""
    if os.path.isdir(output):
        raise SpecError(f"-o: {output} is a folder; give a file name such as report.html")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise SpecError(f"-o: no folder {folder}; create it or write the report elsewhere")
    if not os.access(folder, os.W_OK) or (
        os.path.exists(output) and not os.access(output, os.W_OK)
    ):
        raise SpecError(f"-o: cannot write {output}; choose a path you can write to")


if __name__ == "__main__":
    sys.exit(main())
