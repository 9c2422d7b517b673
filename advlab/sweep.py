"""The Ray Tune driver: one Tune trial per grid point, each running advlab.trial.run_trial.

The grid is expanded and validated by spec.py before Ray starts, then handed to Tune as a single
grid_search over fully resolved trial configs, so Tune schedules exactly the trials we validated.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from advlab import manifest
from advlab.data import load_dataset, select_subset
from advlab.robust_validation import carve_validation
from advlab.spec import SpecError, SweepSpec, TrialSpec
from advlab.store import TABLES, SweepStore, resolve_storage
from advlab.track import reachable_mode, resolve_mode
from advlab.transfer import TransferOutcome
from advlab.trial import TrialContext


@dataclass
class SweepOutcome:
    store: SweepStore
    wandb_mode: str
    expected: int
    ok: list[str]
    failed: dict[str, str]  # trial id -> reason
    missing: list[str]  # trial ids that left no trials row at all
    transfer: TransferOutcome | None = None

    @property
    def all_ok(self) -> bool:
        return not self.failed and not self.missing


class Progress:
    """One line per finished trial: done of total, failures, and an ETA from the mean pace."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()

    def line(self, label: str, ok: bool) -> str:
        self.done += 1
        self.failed += 0 if ok else 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        status = "ok" if ok else "FAILED"
        return (
            f"advlab: [{self.done}/{self.total}] {label} {status}; {self.failed} failed; "
            f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s"
        )


def progress_callback(total: int) -> Any:
    from ray import tune

    class PrintProgress(tune.Callback):
        def __init__(self) -> None:
            self.progress = Progress(total)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            ok = not (trial.last_result or {}).get("failed", 0)
            print(self.progress.line(trial.config["trial"]["ctx"]["label"], ok=ok), flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(self.progress.line(trial.config["trial"]["ctx"]["label"], ok=False), flush=True)

    return PrintProgress()


def trial_configs(
    spec: SweepSpec, storage: str, wandb_mode: str, labels: dict[str, str], run_stamp: str = ""
) -> list[dict[str, Any]]:
    """The Tune config of every grid point: the trial spec, where it writes, and its threads."""
    return [
        {
            "id": trial.trial_id(),
            "spec": trial.model_dump(mode="json"),
            "ctx": asdict(trial_context(spec, index, storage, wandb_mode, labels, run_stamp)),
            "threads": max(1, math.floor(spec.settings.resources.cpu)),
            "checkpoint_every": spec.settings.checkpoint_every,
        }
        for index, trial in enumerate(spec.trials)
    ]


def trial_context(
    spec: SweepSpec,
    index: int,
    storage: str,
    wandb_mode: str,
    labels: dict[str, str] | None = None,
    run_stamp: str = "",
) -> TrialContext:
    trial_id = spec.ids[index]
    return TrialContext(
        sweep=spec.name,
        storage=storage,
        trial_index=index,
        label=(labels or spec.labels).get(trial_id, trial_id),
        grid_values=spec.grid_values(spec.trials[index]),
        wandb_mode=wandb_mode,
        wandb_project=spec.settings.wandb.project,
        wandb_entity=spec.settings.wandb.entity,
        run_stamp=run_stamp,
    )


def tune_trainable(config: dict[str, Any]) -> None:
    """What each Ray worker runs: rebuild the specs, pin torch's threads, run the trial.

    Training checkpoints go through Tune, so a trial whose worker dies resumes from its last
    epoch on another node. A trial that fails on its own (NaN loss, a bad attack) has already
    recorded its failure in the trials table; it ends normally so Tune does not retry it.
    """
    import tempfile

    import ray
    import torch
    from ray import tune

    from advlab.trial import run_trial

    trial = config["trial"]
    torch.set_num_threads(trial["threads"])  # else 2 trials each use every core and thrash
    spec = TrialSpec.model_validate(trial["spec"])
    node = ray.get_runtime_context().get_node_id()
    ctx = TrialContext(**trial["ctx"] | {"worker_node": node})
    every = trial["checkpoint_every"]

    def report(metrics: dict[str, Any], state: Any) -> None:
        if state is None or not every or metrics["epoch"] % every:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state(), os.path.join(folder, "training.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, "training.pt")
            resume = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = run_trial(spec, ctx, report=report, resume=resume)
    except Exception:
        tune.report({"failed": 1})
        return
    row = result.row
    final = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tune.report(final | result.metrics | {"failed": 0})


def preflight(spec: SweepSpec, store: SweepStore, address: str | None) -> None:
    """Every check that needs more than the sweep file, before anything is run or written."""
    check_writable(store)
    check_gpu(spec, address)
    check_data(spec)


def check_writable(store: SweepStore) -> None:
    if store.is_remote:
        return  # remote storage: the first write tells; credentials are the cloud's business
    local = store.path()
    existing = local
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(
            f"storage: cannot write under {existing} (for {local}); "
            "pass --storage with a folder you can write to"
        )


def check_gpu(spec: SweepSpec, address: str | None) -> None:
    """A GPU trial on a machine without one would wait for resources forever."""
    wants_cuda = spec.settings.resources.gpu > 0 or any(t.device == "cuda" for t in spec.trials)
    if not wants_cuda or address is not None:
        return  # a cluster's GPUs are checked once Ray is up
    import torch

    if not torch.cuda.is_available():
        raise SpecError(
            "resources.gpu: GPUs requested but this machine has none; set resources.gpu: 0 "
            "and device: auto, or pass --address of a cluster with GPU nodes"
        )


def init_ray(address: str | None) -> None:
    """Join `address`, or start a private local Ray (never a stale cluster from RAY_ADDRESS)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpoints every few epochs are the point; Tune warns about their snapshot cost.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        ray.init(
            address=address or "local",
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,  # trials report through parquet, W&B and Progress instead
        )


def check_cluster_gpus(spec: SweepSpec) -> None:
    import ray

    if spec.settings.resources.gpu > 0 and not ray.cluster_resources().get("GPU", 0):
        raise SpecError(
            "resources.gpu: the Ray cluster has no GPUs; set resources.gpu: 0 or add GPU nodes"
        )


def check_data(spec: SweepSpec) -> None:
    """Load each data set once and draw each subset: missing files or a subset larger than the
    data fail here, not an hour into the sweep."""
    seen = set()
    for trial in spec.trials:
        fraction = trial.train.validation.fraction
        key = (trial.dataset.name, trial.dataset.root, trial.subset, trial.dataset.split_seed)
        if (*key, fraction) in seen:
            continue
        seen.add((*key, fraction))
        try:
            data = load_dataset(trial.dataset.name, trial.dataset.root)
            split = select_subset(data, trial.subset, trial.dataset.split_seed)
            carve_validation(len(split.train_idx), fraction, trial.dataset.split_seed)
        except ValueError as err:  # a DataError, or a validation slice that leaves nothing
            raise SpecError(str(err)) from None


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    max_concurrent: int | None = None,
    wandb_mode: str | None = None,
    fresh: bool = False,
    verbose: int = 0,
) -> SweepOutcome:
    """Run every grid point as a Ray Tune trial; returns what landed in the store.

    Trials already finished ok in this sweep's folder are skipped (an interrupted sweep resumes
    where it stopped) unless `fresh`; failed and unfinished ones run again.
    """
    storage = resolve_storage(spec.settings.storage)
    store = SweepStore(storage, spec.name)
    preflight(spec, store, address)
    mode, note = reachable_mode(resolve_mode(wandb_mode or spec.settings.wandb.mode))
    if note:
        print(f"advlab: {note}", file=sys.stderr)
    recorded = manifest.record_version(store.read_manifest(), spec)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f") if fresh else ""
    configs = trial_configs(spec, storage, mode, manifest.labels(recorded), stamp)
    done = set() if fresh else finished_ok(store)
    todo = [c for c in configs if c["id"] not in done]
    store.write_manifest(recorded)
    if done & {c["id"] for c in configs}:
        skipped = len(configs) - len(todo)
        print(f"advlab: resuming: {skipped} trials already finished (--fresh reruns them)")
    errors = run_trials(spec, store, todo, address, max_concurrent, verbose) if todo else []
    outcome = collect_outcome(spec, store, mode, errors)
    # Transfer after new results, or when a finished sweep has never had its transfer stage.
    if (
        spec.settings.transfer.enabled
        and outcome.ok
        and (todo or not store.trial_files("transfer"))
    ):
        from advlab.transfer import run_transfer

        init_ray(address)
        outcome.transfer = run_transfer(store.uri, spec.settings.transfer, mode)
    return outcome


def run_trials(
    spec: SweepSpec,
    store: SweepStore,
    todo: list[dict[str, Any]],
    address: str | None,
    max_concurrent: int | None,
    verbose: int,
) -> list[str]:
    """One Tune trial per config in `todo`; returns the first line of each error Tune saw."""
    from ray import tune

    init_ray(address)
    check_cluster_gpus(spec)
    print(f"advlab: sweep '{spec.name}': {len(todo)} trials -> {store.uri}", flush=True)
    resources = spec.settings.resources
    trainable = tune.with_resources(tune_trainable, {"cpu": resources.cpu, "gpu": resources.gpu})
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or spec.settings.max_concurrent,
            trial_dirname_creator=lambda t: t.config["trial"]["id"],  # labels may not be paths
            trial_name_creator=lambda t: t.config["trial"]["ctx"]["label"],
            reuse_actors=True,  # a worker process (torch, data cache) serves many trials
        ),
        run_config=tune.RunConfig(
            name=f"run-{stamp}",  # a fresh Tune experiment per invocation: never mix two runs
            storage_path=store.ray_dir(),
            # Retries are for lost workers and nodes; trial failures do not raise (see above).
            failure_config=tune.FailureConfig(max_failures=spec.settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=verbose,
            callbacks=[progress_callback(len(todo))],
        ),
    )
    results = tuner.fit()
    return [str(e).splitlines()[0] for e in results.errors]


def finished_ok(store: SweepStore) -> set[str]:
    trials = store.read("trials")
    if trials.empty:
        return set()
    return set(trials.loc[trials["status"] == "ok", "trial_id"])


def collect_outcome(
    spec: SweepSpec, store: SweepStore, wandb_mode: str, errors: list[str]
) -> SweepOutcome:
    trials = store.read("trials")
    expected = spec.ids
    status = dict(zip(trials["trial_id"], trials["status"], strict=True)) if len(trials) else {}
    reasons = dict(zip(trials["trial_id"], trials["reason"], strict=True)) if len(trials) else {}
    ok = [t for t in expected if status.get(t) == "ok"]
    failed = {t: reasons[t] for t in expected if status.get(t) == "failed"}
    missing = [t for t in expected if t not in status]
    if missing and errors:
        print(
            f"advlab: {len(missing)} trial(s) left no row; Ray said: {errors[0]}", file=sys.stderr
        )
    return SweepOutcome(store, wandb_mode, len(expected), ok, failed, missing)


def transfer_lines(outcome: TransferOutcome) -> list[str]:
    lines = [
        f"advlab: transfer: {len(outcome.sources)} source trials x "
        f"{outcome.rows['target'].nunique()} targets, {len(outcome.rows)} rows in "
        f"{outcome.seconds:.1f} s"
    ]
    lines += [f"  not transferred {tid}: {why}" for tid, why in outcome.skipped.items()]
    return lines


def summary_lines(outcome: SweepOutcome) -> list[str]:
    store = outcome.store
    lines = [
        f"advlab: {len(outcome.ok)}/{outcome.expected} trials ok, {len(outcome.failed)} failed, "
        f"{len(outcome.missing)} missing",
    ]
    labels = manifest.labels(store.read_manifest())
    lines += [f"  failed {labels.get(t, t)}: {why}" for t, why in outcome.failed.items()]
    lines += masking_lines(store, labels, outcome.ok)
    if outcome.transfer is not None:
        lines += transfer_lines(outcome.transfer)
    lines.append(f"  parquet: {store.uri}/{{{','.join(TABLES)}}}/")
    if outcome.wandb_mode == "offline":
        runs = store.wandb_runs()
        lines.append(f"  W&B offline runs: {runs}  (upload later: wandb sync {runs})")
    elif outcome.wandb_mode == "online":
        lines.append(f"  W&B: online, group '{store.sweep}'")
    return lines


def masking_lines(store: SweepStore, labels: dict[str, str], ok: list[str]) -> list[str]:
    """One line per finished trial flagged for possible gradient masking."""
    trials = store.read("trials")
    if "gradient_masking" not in trials:
        return []
    flagged = trials[trials["trial_id"].isin(ok) & (trials["gradient_masking"] == True)]  # noqa: E712
    return [
        f"  possible gradient masking in {labels.get(t, t)}: {why}"
        for t, why in zip(flagged["trial_id"], flagged["masking_reason"], strict=True)
    ]
