"""Ray overhead of a sweep: the share of the machine's core-seconds that goes into trial work.

A sweep of 16 trials (embedded digits, fc100-100-10, 100 epochs, FGSM at 3 budgets and L-BFGS on
32 examples, W&B and transfer off, 1 CPU per trial, 2 at a time) runs with `run_sweep` on a
private local Ray with all of this machine's cores. Trial work is what each trial times itself in
the trials table (train_seconds + attack_seconds: data, model, training, evaluation, attacks,
properties). The machine offers wall x cores core-seconds, from just before ray.init to
run_sweep's return, so

    fraction = sum(train_seconds + attack_seconds) / (wall x cores),   Ray overhead = 1 - fraction

That fraction counts Tune's per-epoch tune.report calls (each waits for a round trip through the
driver) and checkpoint writes as trial work, since they happen inside train_seconds. So the
`no-ray` variant runs the same 16 trials with run_trial in a pool of plain processes, as many at
once as the sweep runs trials; `vs no-ray` = 1 - no-ray wall / wall is everything Ray costs.

Every core-second of a sweep is also attributed (the second table, for each variant's median run;
the rows other than the indented ones sum to 100%), from the driver's clock (ray.init, Tuner.fit,
Tune's on_trial_start and on_trial_complete) and the worker's (a thin wrapper times
advlab.sweep.tune_trainable from entry to return, and the calls to tune.report). `process` adds
the interpreter start and imports.

Variants run in fresh processes, interleaved (all variants, then again for each repeat), so drift
in other load on the machine hits them alike; the load average is printed with each run, and the
`training steps` column (the epochs' own compute, the same work in every variant) shows how fast
the machine was. On a shared machine that speed varies between runs by more than the variants
differ, so compare fractions (to first order unchanged by a uniformly slower machine), not walls.
Variants change only sweep-file settings or emulate a one-line change to advlab.sweep:

    baseline        the sweep as advlab runs it (checkpoint every 5 epochs, a report every epoch)
    report@ckpt     tune.report only with a checkpoint (every 5 epochs) and at the end
    no-ckpt         checkpoint_every: 0 (a report every epoch, no resume after a lost node)
    ckpt-every-1    a Tune checkpoint every epoch
    wandb-offline   W&B offline runs, one per trial (the default for users without an API key)
    no-ray          no Ray at all: a process pool running run_trial (the reference)

    .venv/bin/python benchmarks/sweep.py --variants baseline report@ckpt no-ray --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# Imported here so the wrappers below, pickled by value from __main__, refer to it by reference:
# a Ray worker then imports it when the trainable is unpickled, at actor start, as in production.
import advlab.sweep as advlab_sweep
from advlab import tuning
from advlab.store import SweepStore

VARIANTS = ("baseline", "report@ckpt", "no-ckpt", "ckpt-every-1", "wandb-offline", "no-ray")
CONCURRENT = 2


def sweep_dict(variant: str, trials: int, epochs: int, storage: str) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "bench",
        "dataset": {"name": "digits"},
        "grid": {"seed": list(range(trials))},
        "model": "fc100-100-10",
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.05, 0.1, 0.2],
        "attack_examples": 32,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs"}],
        "resources": {"cpu": 1},
        "max_concurrent": CONCURRENT,
        "storage": storage,
        "wandb": {"mode": "disabled", "project": "advlab-bench"},
        "transfer": {"enabled": False},
    }
    if variant == "ckpt-every-1":
        raw["checkpoint_every"] = 1
    elif variant == "no-ckpt":
        raw["checkpoint_every"] = 0
    elif variant == "wandb-offline":
        raw["wandb"]["mode"] = "offline"
    return raw


def _timed(config: dict[str, Any], report_at_checkpoints: bool) -> None:
    """Runs in the Ray worker: tune_trainable timed (wall clock) from entry to return, and the
    time spent inside tune.report (which persists checkpoints and waits for the driver)."""
    from ray import tune

    enter = time.time()
    trial = config["trial"]
    original = tune.report
    spent = {"report": 0.0, "reports": 0}

    def report(metrics: dict[str, Any], *args: Any, checkpoint: Any = None, **kw: Any) -> None:
        # report@ckpt emulates the proposed one-liner: no per-epoch report without a checkpoint.
        if report_at_checkpoints and checkpoint is None and "epoch" in metrics:
            return
        start = time.perf_counter()
        original(metrics, *args, checkpoint=checkpoint, **kw)
        spent["report"] += time.perf_counter() - start
        spent["reports"] += 1

    tune.report = report
    try:
        tuning.trainable(config)
    finally:
        tune.report = original
        times = {"enter": enter, "exit": time.time(), **spent}
        timing_file(trial["ctx"]["storage"], trial["id"]).write_text(json.dumps(times))


def timing_file(storage: str, trial_id: str) -> Path:
    folder = Path(storage) / "timing"
    folder.mkdir(exist_ok=True)
    return folder / f"{trial_id}.json"


def timed_trainable(config: dict[str, Any]) -> None:
    _timed(config, report_at_checkpoints=False)


def timed_trainable_report_at_checkpoints(config: dict[str, Any]) -> None:
    _timed(config, report_at_checkpoints=True)


def run_variant(variant: str, trials: int, epochs: int, storage: str) -> dict[str, Any]:
    """In a fresh process: one sweep, with the driver's and the workers' clocks."""
    from ray import tune

    from advlab.sweepfile import parse_sweep

    spec = parse_sweep(sweep_dict(variant, trials, epochs, storage))
    marks: dict[str, float] = {}
    seen: dict[str, dict[str, float]] = {}
    progress = tuning.progress_callback

    def timed_progress(total: int) -> Any:
        printer = progress(total)

        class Timed(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any):
                seen.setdefault(trial.config["trial"]["id"], {})["start"] = time.time()

            def on_trial_result(self, iteration: int, trials: list, trial: Any, **info: Any):
                seen[trial.config["trial"]["id"]].setdefault("first_result", time.time())

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
                seen[trial.config["trial"]["id"]]["complete"] = time.time()
                printer.on_trial_complete(iteration, trials, trial, **info)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any):
                printer.on_trial_error(iteration, trials, trial, **info)

        return Timed()

    fit = tune.Tuner.fit

    def timed_fit(self: Any) -> Any:
        marks["fit"] = time.time()
        try:
            return fit(self)
        finally:
            marks["fit_end"] = time.time()

    tuning.progress_callback = timed_progress
    tune.Tuner.fit = timed_fit
    tuning.trainable = (
        timed_trainable_report_at_checkpoints if variant == "report@ckpt" else timed_trainable
    )
    load = os.getloadavg()[0]
    marks["t0"] = time.time()
    tuning.init_ray(None)
    marks["init"] = time.time()
    outcome = advlab_sweep.run_sweep(spec)
    marks["end"] = time.time()
    if not outcome.all_ok:
        raise SystemExit(f"{variant}: failed {outcome.failed}, missing {outcome.missing}")
    rows = outcome.store.read("trials")
    compute = outcome.store.read("epochs").groupby("trial_id")["seconds"].sum()
    attack_seconds = outcome.store.read("attacks").groupby("trial_id")["seconds"].sum()
    return {
        "variant": variant,
        "cores": _cores(),
        "load": [load, os.getloadavg()[0]],
        "marks": marks,
        "trials": [
            {
                "train": row.train_seconds,
                "attack": float(attack_seconds[row.trial_id]),
                "compute": float(compute[row.trial_id]),
                **seen[row.trial_id],
                **json.loads(timing_file(storage, row.trial_id).read_text()),
            }
            for row in rows.itertuples()
        ],
    }


def _plain_trial(job: tuple[dict[str, Any], int, str]) -> dict[str, Any]:
    """One trial in a pool process, as tune_trainable would run it, minus Ray."""
    import torch

    from advlab.sweepfile import parse_sweep
    from advlab.trial import run_trial

    raw, index, storage = job
    enter = time.time()
    torch.set_num_threads(1)
    spec = parse_sweep(raw)
    row = run_trial(
        spec.trials[index], advlab_sweep.trial_context(spec, index, storage, "disabled")
    )
    done = time.time()
    times = {"start": enter, "enter": enter, "exit": done, "complete": done, "first_result": done}
    work = {"train": row["train_seconds"], "attack": row["attack_seconds"]}
    return {"id": row["trial_id"], **work, **times}


def run_without_ray(trials: int, epochs: int, storage: str) -> dict[str, Any]:
    """The reference: the same trials in CONCURRENT plain processes (started cold, like Ray's)."""
    raw = sweep_dict("no-ray", trials, epochs, storage)
    load = os.getloadavg()[0]
    t0 = time.time()
    with ProcessPoolExecutor(CONCURRENT, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(_plain_trial, [(raw, i, storage) for i in range(trials)]))
    end = time.time()
    marks = {"t0": t0, "init": t0, "fit": t0, "fit_end": end, "end": end}
    compute = SweepStore(storage, "bench").read("epochs").groupby("trial_id")["seconds"].sum()
    rows = [r | {"report": 0.0, "reports": 0, "compute": float(compute[r["id"]])} for r in rows]
    return {
        "variant": "no-ray",
        "cores": CONCURRENT,
        "load": [load, os.getloadavg()[0]],
        "marks": marks,
        "trials": rows,
    }


def _cores() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def child(args: argparse.Namespace) -> None:
    if args.child == "no-ray":
        result = run_without_ray(args.trials, args.epochs, args.storage)
    else:
        result = run_variant(args.child, args.trials, args.epochs, args.storage)
    Path(args.storage, "result.json").write_text(json.dumps(result))


def run_child(args: argparse.Namespace, variant: str, folder: str) -> tuple[dict[str, Any], float]:
    storage = tempfile.mkdtemp(prefix=variant.replace("@", "-at-") + "-", dir=folder)
    command = [sys.executable, __file__, "--child", variant, "--storage", storage]
    command += ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    started = time.time()
    output = None if args.verbose else subprocess.DEVNULL
    if subprocess.run(command, stdout=output).returncode != 0:
        raise SystemExit(f"benchmark child failed: {' '.join(command)}")
    elapsed = time.time() - started
    return json.loads(Path(storage, "result.json").read_text()), elapsed


def summarise(result: dict[str, Any], process_wall: float) -> dict[str, Any]:
    """Headline numbers, and every core-second of the sweep attributed to one phase."""
    trials, cores, m = result["trials"], result["cores"], result["marks"]
    wall = m["end"] - m["t0"]
    work = sum(t["train"] + t["attack"] for t in trials)
    inside = sum(t["exit"] - t["enter"] for t in trials)
    spans = sum(t["complete"] - t["start"] for t in trials)
    startup = sum(s - m["fit"] for s in sorted(t["start"] for t in trials)[:cores])
    tail = sum(m["fit_end"] - e for e in sorted(t["complete"] for t in trials)[-cores:])
    fit = cores * (m["fit_end"] - m["fit"])
    attributed = {
        "trial work (train_seconds + attack_seconds)": work,
        "  of which training steps (sum of the epochs' seconds)": sum(t["compute"] for t in trials),
        "  of which inside tune.report": sum(t["report"] for t in trials),
        "advlab in the trainable, outside train/attack": inside - work,
        "Tune per trial (reset/start, results, complete)": spans - inside,
        "Tuner.fit to each slot's first trial (actor start, worker imports)": startup,
        "cores idle between trials": fit - spans - startup - tail,
        "cores idle at the end (last trials running alone)": tail,
        "ray.init": cores * (m["init"] - m["t0"]),
        "run_sweep before Tuner.fit (preflight, import ray.tune, Tuner)": cores
        * (m["fit"] - m["init"]),
        "after Tuner.fit (outcome, end of the experiment)": cores * (m["end"] - m["fit_end"]),
    }
    return {
        "variant": result["variant"],
        "load": result["load"],
        "cores": cores,
        "wall": wall,
        "process": process_wall,
        "fraction": work / (wall * cores),
        "fraction_process": work / (process_wall * cores),
        "ray_init": m["init"] - m["t0"],
        "first_start": min(t["enter"] for t in trials) - m["t0"],
        "first_result": min(t["first_result"] for t in trials) - m["t0"],
        "per_trial": (spans - work) / len(trials),
        "trial_work": work / len(trials),
        "compute": statistics.mean(t["compute"] for t in trials),
        "tune_report": statistics.mean(t["report"] for t in trials),
        "reports": statistics.mean(t["reports"] for t in trials),
        "attributed": attributed,
        "total": wall * cores,
    }


def tables(runs: list[dict[str, Any]]) -> str:
    reference = [r["wall"] for r in runs if r["variant"] == "no-ray"]
    no_ray = statistics.median(reference) if reference else None
    head = (
        "| run | load avg | sweep wall (s) | fraction | Ray overhead | vs no-ray | with process "
        "start (wall s) | ray.init (s) | first trial starts (s) | first epoch reported (s) | "
        "per-trial overhead (s) | trial work (s) | training steps (s) | in tune.report (s, calls) |"
    )
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in runs:
        versus = f"{1 - no_ray / r['wall']:.1%}" if no_ray else "-"
        lines.append(
            f"| {r['variant']} | {r['load'][0]:.1f}-{r['load'][1]:.1f} | {r['wall']:.1f} | "
            f"{r['fraction']:.1%} | {1 - r['fraction']:.1%} | {versus} | "
            f"{r['fraction_process']:.1%} ({r['process']:.1f}) | {r['ray_init']:.1f} | "
            f"{r['first_start']:.1f} | {r['first_result']:.1f} | {r['per_trial']:.2f} | "
            f"{r['trial_work']:.2f} | {r['compute']:.2f} | {r['tune_report']:.2f} "
            f"({r['reports']:.0f}) |"
        )
    medians = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["wall"])
        medians.append(mine[(len(mine) - 1) // 2])
    lines.append("\nCore-seconds (share of wall x cores), each variant's median run:\n")
    lines.append("| phase | " + " | ".join(r["variant"] for r in medians) + " |")
    lines.append("|---|" + "---|" * len(medians))
    for phase in medians[0]["attributed"]:
        cells = [
            f"{r['attributed'][phase]:.1f} ({r['attributed'][phase] / r['total']:.0%})"
            for r in medians
        ]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    totals = " | ".join(f"{r['total']:.1f}" for r in medians)
    lines.append(f"| total (wall x cores) | {totals} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=["baseline", "no-ray"], choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    parser.add_argument("--verbose", action="store_true", help="show the sweeps' progress")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    os.environ.pop("RAY_ADDRESS", None)
    runs = []
    with tempfile.TemporaryDirectory(prefix="advlab-bench-") as folder:
        for _ in range(args.repeats):
            for variant in args.variants:
                result, elapsed = run_child(args, variant, folder)
                runs.append(summarise(result, elapsed))
    command = " ".join([".venv/bin/python benchmarks/sweep.py", *sys.argv[1:]])
    print(
        f"{args.trials} trials, fc100-100-10 on digits, {args.epochs} epochs, FGSM x3 + L-BFGS on "
        f"32 examples, {runs[0]['cores']} cores, {CONCURRENT} trials at a time\n`{command}`\n"
    )
    print(tables(runs))


if __name__ == "__main__":
    main()
