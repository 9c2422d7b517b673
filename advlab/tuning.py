"""Ray Tune, as its users know it: the trainable, the search space, searchers and schedulers.

Grid sweeps hand Tune the grid advlab expanded and validated, one resolved config per point.
Random and Optuna searches hand it the sweep's `search.space` as Tune domains on top of each
grid point; every sampled config becomes a TrialSpec inside the trainable (validated there, and
its bounds already validated before Ray started). Schedulers (ASHA, median stopping) act on the
metrics each trial reports every epoch. Only this module and transfer.py import Ray.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from advlab.spec import SpecError, TrialSpec
from advlab.storage_errors import failure_reason
from advlab.store import CHECKPOINT, SEARCH_DB, SweepStore
from advlab.sweep_settings import SearchSpec
from advlab.sweepfile import SweepSpec, add_plugin_dirs, axis_text, set_dotted
from advlab.tables import Status
from advlab.text import one_line
from advlab.trial import TrialContext, TrialStopped


@contextlib.contextmanager
def quiet(verbose: int) -> Iterator[None]:
    """Keep Ray's banners and log lines (token-auth notice, restore hints) out of advlab's
    output unless --verbose: advlab prints its own progress and summary."""
    if verbose:
        yield
        return
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def init_ray(address: str | None, verbose: int = 0) -> None:
    """Join `address`, or start a private local Ray (never a stale cluster from RAY_ADDRESS)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpoints every few epochs are the point; Tune warns about their snapshot cost.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A search's metrics (robust error, distortion) come with a trial's final report only; the
    # per-epoch reports carry what schedulers need.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if ray.is_initialized():
        return
    try:
        with quiet(verbose):
            ray.init(
                address=address or "local",
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,  # trials report through parquet, W&B and progress lines
            )
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address is None:
            raise
        why = one_line(err, 160)
        raise SpecError(
            f"--address: no Ray cluster answers at {address} ({why}); start one with "
            "`ray start --head` or drop --address to run locally"
        ) from None


# --------------------------------------------------------------------------- one trial


def resolve(config: dict[str, Any]) -> tuple[TrialSpec, TrialContext]:
    """The TrialSpec and context of a Tune config: a grid point plus its sampled values."""
    trial = config["trial"]
    sample = config.get("sample") or {}
    raw = trial["spec"]
    ctx = TrialContext(**trial["ctx"])
    if sample:
        raw = _with_sample(raw, sample)
        parts = [ctx.label] if ctx.label and trial.get("grid_labelled") else []
        label = " ".join([*parts, *(axis_text(k, v) for k, v in sample.items())])
        ctx = replace(ctx, label=label, grid_values=ctx.grid_values | sample)
    return TrialSpec.from_stored(raw), ctx


def _with_sample(raw: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    import copy

    raw = copy.deepcopy(raw)
    for key, value in sample.items():
        set_dotted(raw, key, value)
    return raw


def trainable(config: dict[str, Any]) -> None:
    """What each Ray worker runs: rebuild the specs, pin torch's threads, run the trial.

    Training checkpoints go through Tune every `checkpoint_every` epochs. A trial resumes from
    Tune's checkpoint when Tune retries it (a lost worker or node), else from the newest one
    an earlier run of the sweep left on storage (a killed driver, Ctrl-C), so it continues. A
    trial that fails on its own has recorded its failure; it ends normally so Tune does not
    retry it.
    """
    import ray
    import torch
    from ray import tune

    from advlab.trial import run_trial

    trial = config["trial"]
    torch.set_num_threads(trial["threads"])  # else 2 trials each use every core and thrash
    add_plugin_dirs([os.path.abspath(d) for d in trial["plugin_dirs"]])
    spec, ctx = resolve(config)
    ctx = replace(ctx, worker_node=ray.get_runtime_context().get_node_id())
    report = _reporter(trial["checkpoint_every"], trial.get("attack_progress", False))
    resume = _resume_state(spec, ctx)
    try:
        result = run_trial(spec, ctx, report=report, resume=resume)
    except TrialStopped:  # stopped early by the scheduler: the driver records it
        return
    except Exception as err:  # the reason goes to the driver too: the row may not be written
        tune.report({"failed": 1, "trial_id": spec.trial_id(), "reason": failure_reason(err)})
        return
    row = result.row
    numbers = {
        k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tune.report(numbers | result.metrics | {"failed": 0, "trial_id": spec.trial_id()})


def _reporter(every: int, attack_progress: bool) -> Any:
    """Tune's report of each epoch (with a checkpoint every `every`), and of each attack run's
    start where `attack_progress` (no scheduler or searcher reads results as epochs then)."""
    import torch
    from ray import tune

    def report(metrics: dict[str, Any], state: Any) -> None:
        if "attack_run" in metrics and not attack_progress:
            return
        try:
            if state is None or not every or metrics["epoch"] % every:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state(), os.path.join(folder, CHECKPOINT))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        except SystemExit:  # how tune.report ends a trial its scheduler stopped
            raise TrialStopped from None

    return report


def _resume_state(spec: TrialSpec, ctx: TrialContext) -> dict[str, Any] | None:
    import torch
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, CHECKPOINT)
            return torch.load(path, map_location="cpu", weights_only=True)
    if ctx.run_stamp:  # --fresh: start over
        return None
    return SweepStore(ctx.storage, ctx.sweep).latest_checkpoint(spec.trial_id())


# --------------------------------------------------------------------------- the search


def domains(search: SearchSpec, choices: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The sweep's search space as Ray Tune domains; `choices` replaces a choice's values
    with their resolved form (a relative path made absolute, as for a grid's)."""
    from ray import tune

    out = {}
    for key, dist in search.space.items():
        kind, values = next(iter(dist.items()))
        if kind == "choice":
            out[key] = tune.choice((choices or {}).get(key, values))
        elif kind == "int":
            out[key] = tune.randint(int(values[0]), int(values[1]) + 1)  # inclusive high
        else:
            out[key] = getattr(tune, kind)(float(values[0]), float(values[1]))
    return out


def search_algorithm(
    spec: SweepSpec,
    store: SweepStore,
    pending: list[dict[str, Any]],
    done: int = 0,
    max_concurrent: int | None = None,
) -> Any:
    """Optuna's sampler (single or multi-objective), or Tune's random/grid generator; samples
    an interrupted run left unfinished are evaluated first (they continue from checkpoints).
    The generator carries the trials-at-once limit itself: Tune ignores its own
    `max_concurrent_trials` for a generator passed as the search (only a warning says so)."""
    from ray.tune.search import BasicVariantGenerator

    search = spec.settings.search
    if search.algorithm != "optuna":
        # A continued search draws on from a seed moved past the samples it has, not the same
        # first draws again.
        seed = search.seed + done
        limit = max_concurrent or spec.settings.max_concurrent or 0
        return BasicVariantGenerator(
            points_to_evaluate=pending or None, random_state=seed, max_concurrent=limit
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-study info lines

    storage = None
    if not store.is_remote:  # the study survives a rerun: later samples learn from earlier ones
        os.makedirs(store.path(), exist_ok=True)
        storage = open_study_storage(spec, store)
    metric = search.metrics[0] if len(search.metrics) == 1 else search.metrics
    mode = search.modes[0] if len(search.modes) == 1 else search.modes
    return OptunaSearch(
        metric=metric, mode=mode, seed=search.seed + done, points_to_evaluate=pending or None,
        study_name=f"{spec.name}", storage=storage,
    )  # fmt: skip


def open_study_storage(spec: SweepSpec, store: SweepStore) -> Any:
    """The sweep's Optuna study database; one that does not open (garbage, truncated) is
    moved aside to damaged/ and the study rebuilt from the sweep's finished samples, so a
    damaged file costs what the study learnt, never the search; a study missing from it (the
    file emptied or deleted) is rebuilt the same way."""
    import optuna

    try:
        storage = optuna.storages.RDBStorage(store.search_db())
        # reads the tables: a damaged file fails here at the latest
        studies = {study.study_name for study in storage.get_all_studies()}
    except Exception as err:  # sqlalchemy's and optuna's errors alike: the file is unusable
        line = store.quarantine(store.path(SEARCH_DB), err, "the study is rebuilt")
        storage = optuna.storages.RDBStorage(store.search_db())
        count = rebuild_study(spec, store, storage)
        print(f"advlab: {line} from {count} finished samples", file=sys.stderr, flush=True)
        return storage
    # A file emptied by a full disk (SQLite opens it as a new database) or deleted: the study
    # is gone though the sweep has samples; rebuilt, so the search goes on from them.
    if spec.name not in studies and (store.read("trials")["status"] == Status.OK).any():
        count = rebuild_study(spec, store, storage)
        print(
            f"advlab: {SEARCH_DB} holds no study {spec.name!r}; rebuilt it from {count} "
            "finished samples",
            file=sys.stderr,
            flush=True,
        )
    return storage


def rebuild_study(spec: SweepSpec, store: SweepStore, storage: Any) -> int:
    """A new study holding the sweep's ok samples (their values from sweep.json, their
    metrics from the tables) as finished trials, named as OptunaSearch names them."""
    import optuna

    from advlab import manifest
    from advlab.trial import stored_metrics

    search = spec.settings.search
    directions = ["minimize" if m == "min" else "maximize" for m in search.modes]
    study = optuna.create_study(
        storage=storage, study_name=spec.name, directions=directions, load_if_exists=True
    )
    distributions = {f"sample/{k}": _distribution(d) for k, d in search.space.items()}
    recorded = store.read_manifest() or {}
    trials = store.read("trials").set_index("trial_id")
    count = 0
    for trial_id in manifest.current_ids(recorded):
        if trial_id not in trials.index or trials.loc[trial_id, "status"] != Status.OK:
            continue
        values = recorded["trials"][trial_id]["values"]
        found = stored_metrics(store, trial_id) | trials.loc[trial_id].to_dict()
        try:
            study.add_trial(
                optuna.trial.create_trial(
                    params={f"sample/{k}": values[k] for k in search.space},
                    distributions=distributions,
                    values=[float(found[m]) for m in search.metrics],
                )
            )
            count += 1
        except (KeyError, ValueError, TypeError):  # a sample outside today's space
            continue
    return count


def _distribution(dist: dict[str, list[Any]]) -> Any:
    """One `search.space` entry as the Optuna distribution OptunaSearch makes of its domain."""
    import optuna

    kind, values = next(iter(dist.items()))
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution(values)
    if kind == "int":
        return optuna.distributions.IntDistribution(int(values[0]), int(values[1]))
    low, high = float(values[0]), float(values[1])
    return optuna.distributions.FloatDistribution(low, high, log=kind == "loguniform")


def scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    settings = spec.settings.scheduler
    if settings.name == "none":
        return FIFOScheduler()
    # Tune counts reports: one per epoch (a cached model's history replays them), then the
    # trial's final one, so iterations are epochs and max_t lets the last epoch finish.
    common = {"time_attr": "training_iteration", "metric": settings.metric, "mode": settings.mode}
    if settings.name == "median":
        return MedianStoppingRule(**common, grace_period=settings.grace_period)
    max_t = max(t.train.epochs for t in spec.trials) + 1
    return ASHAScheduler(
        **common, grace_period=settings.grace_period, max_t=max(max_t, settings.grace_period + 1),
        reduction_factor=settings.reduction_factor,
    )  # fmt: skip


@dataclass
class TuneRun:
    """What one Tuner.fit left: per Tune trial its config and last reported metrics."""

    trials: list[tuple[dict[str, Any], dict[str, Any], Any]]  # (config, last metrics, history)
    errors: list[str]
    interrupted: bool
    experiment: str


def run_tuner(
    spec: SweepSpec,
    store: SweepStore,
    configs: list[dict[str, Any]],
    *,
    num_samples: int,
    pending: list[dict[str, Any]],
    done: int,
    max_concurrent: int | None,
    verbose: int,
    callbacks: list[Any],
) -> TuneRun:
    """One Tuner.fit over `configs` (grid points), sampling the search space `num_samples`
    times per point for random and Optuna searches."""
    search = search_algorithm(spec, store, pending, done, max_concurrent)
    tuner = make_tuner(
        spec, store, configs, num_samples, search, max_concurrent, verbose, callbacks,
    )  # fmt: skip
    # Ctrl-C raises here instead of Tune's own handler, which would finish the call, print its
    # Tuner.restore hint and leave the caller guessing whether the run completed.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with quiet(verbose):
            results = tuner.fit()
    except KeyboardInterrupt:
        return TuneRun(trials=[], errors=[], interrupted=True, experiment="")
    statuses = [t.status for t in results._experiment_analysis.trials]
    # A trial Ctrl-C caught before it started has no config yet.
    trials = [(r.config, r.metrics or {}, r.metrics_dataframe) for r in results if r.config]
    return TuneRun(
        trials=trials,
        errors=[str(e).splitlines()[0] for e in results.errors],
        interrupted=any(s not in ("TERMINATED", "ERROR") for s in statuses),
        experiment=results.experiment_path,
    )


def make_tuner(
    spec: SweepSpec,
    store: SweepStore,
    configs: list[dict[str, Any]],
    num_samples: int,
    search: Any,
    max_concurrent: int | None,
    verbose: int,
    callbacks: list[Any],
) -> Any:
    import datetime as dt

    from ray import tune

    grid = configs[0] if len(configs) == 1 else tune.grid_search(configs)
    space: dict[str, Any] = {"trial": grid}
    if spec.settings.search.algorithm != "grid":
        space["sample"] = domains(spec.settings.search, spec.choices)
    resources = spec.settings.resources
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    storage_path, storage_filesystem = store.tune_storage()
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu}),
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler(spec),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent or spec.settings.max_concurrent,
            trial_dirname_creator=lambda t: resolve(t.config)[0].trial_id(),  # ids are paths
            trial_name_creator=lambda t: resolve(t.config)[1].label,
            # A worker process (torch, data cache) serves many trials; not under a scheduler
            # that stops trials: a stopped trial's thread runs on to its next report, so Tune
            # cannot reset its worker for the next trial and fails that one instead.
            reuse_actors=spec.settings.scheduler.name == "none",
        ),
        run_config=tune.RunConfig(
            name=f"run-{stamp}",  # a fresh Tune experiment per invocation: never mix two runs
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # Retries are for lost workers and nodes; trial failures do not raise (see above).
            failure_config=tune.FailureConfig(max_failures=spec.settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=verbose,
            callbacks=callbacks,
        ),
    )


EVERY_S = 10.0  # at most one progress line inside trials per this many seconds


class Progress:
    """Progress lines: a trial's epochs as they finish (at most one line per `every` seconds,
    and each trial's last epoch), and one line per finished trial; the ETA comes from the work
    done, epochs out of the `epochs` the run plans (a finished or stopped trial counts whole),
    not from finished trials. Plain Python: `progress_callback` hands it to Tune."""

    def __init__(
        self, total: int, epochs: int, clock: Callable[[], float], every: float = EVERY_S
    ) -> None:
        self.total, self.epochs, self.clock, self.every = total, epochs, clock, every
        self.done = self.failed = 0
        self.start = clock()
        self.last = -math.inf
        self.worked: dict[str, int] = {}  # epochs done, per trial

    def epoch(self, trial: Any, result: dict[str, Any]) -> None:
        """A trial's epoch report: its line when due (or its last epoch)."""
        if "attack_run" in result:
            self.attack_run(trial, result)
            return
        if "epoch" not in result or "failed" in result:
            return
        spec, ctx = resolve(trial.config)
        epoch, planned = int(result["epoch"]), spec.train.epochs
        self.worked[trial.trial_id] = epoch
        moment = self.clock()
        if moment - self.last < self.every and epoch < planned:
            return
        self.last = moment
        error = result.get("test_error")
        shown = f", test error {100 * error:.1f}%" if _number(error) else ""
        after = "; attack runs next" if epoch >= planned and spec.attacks else ""
        print(
            f"advlab:   {ctx.label}: epoch {epoch}/{planned}{shown}{after}; {self.pace()}",
            flush=True,
        )

    def attack_run(self, trial: Any, result: dict[str, Any]) -> None:
        """An attack run starting inside a trial: which of how many, when due (or the first)."""
        moment = self.clock()
        if moment - self.last < self.every and result["attack_run"] > 1:
            return
        self.last = moment
        _, ctx = resolve(trial.config)
        print(
            f"advlab:   {ctx.label}: attack run {result['attack_run']}/{result['attack_runs']} "
            f"({result['attack']}); {self.pace()}",
            flush=True,
        )

    def finished(self, trial: Any, status: str) -> None:
        """A trial's end (ok, stopped or FAILED): its whole work counts as done."""
        spec, ctx = resolve(trial.config)
        self.worked[trial.trial_id] = spec.train.epochs
        self.done += 1
        self.failed += status == "FAILED"
        print(
            f"advlab: [{self.done}/{self.total}] {ctx.label} {status}; {self.failed} failed; "
            f"{self.pace()}",
            flush=True,
        )

    def pace(self) -> str:
        """Elapsed time, epochs done of those planned, and the ETA from that pace."""
        elapsed = self.clock() - self.start
        worked = sum(self.worked.values())
        if worked < max(1, self.epochs // 20):  # the first epochs carry the start-up: no ETA
            return f"{elapsed:.0f} s elapsed, {worked}/{self.epochs} epochs"
        eta = elapsed / worked * max(self.epochs - worked, 0)
        return f"{elapsed:.0f} s elapsed, {worked}/{self.epochs} epochs, ETA {eta:.0f} s"


def progress_callback(
    total: int, epochs: int, clock: Callable[[], float] | None = None, every: float = EVERY_S
) -> Any:
    """A Tune callback printing `Progress` lines for `total` trials of `epochs` epochs."""
    import time

    from ray import tune

    class PrintProgress(Progress, tune.Callback):
        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self.epoch(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            failed = result.get("failed")
            status = Status.STOPPED if failed is None else "FAILED" if failed else Status.OK
            self.finished(trial, status)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.finished(trial, "FAILED")

    return PrintProgress(total, epochs, clock or time.monotonic, every)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
