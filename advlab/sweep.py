"""The Ray Tune driver: one Tune trial per grid point, each running advlab.trial.run_trial.

The grid is expanded and validated by spec.py before Ray starts, then handed to Tune as a single
grid_search over fully resolved trial configs, so Tune schedules exactly the trials we validated.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from advlab import manifest, tuning
from advlab.compact import compact_after_sweep
from advlab.filesystems import BadStorage
from advlab.plan import attack_plan, measure_runs
from advlab.preflight import check_cluster_gpus, preflight
from advlab.spec import SpecError, TrialSpec
from advlab.storage_errors import failure_reason
from advlab.store import SweepStore, resolve_storage
from advlab.sweepfile import SweepSpec
from advlab.tables import Status
from advlab.text import count, one_line
from advlab.track import reachable_mode, recorded_target, resolve_mode
from advlab.transfer import TransferOutcome
from advlab.trial import TrialContext, flags


@dataclass
class SweepOutcome:
    store: SweepStore
    wandb_mode: str
    expected: int
    ok: list[str]
    failed: dict[str, str]  # trial id -> reason
    missing: list[str]  # trial ids that left no trials row at all
    transfer: TransferOutcome | None = None
    missing_reasons: dict[str, str] = field(default_factory=dict)  # as their workers said
    attack_failures: dict[tuple[str, str], str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)  # ended early by the scheduler, on purpose
    interrupted: bool = False  # Ctrl-C: rerunning the same command continues
    transfer_error: str = ""  # the transfer stage failed as a whole
    transfer_stale: str = ""  # why the transfer table still does not match the trials

    @property
    def all_ok(self) -> bool:
        broken = self.failed or self.missing or self.attack_failures or self.transfer_error
        broken = broken or self.transfer_stale
        broken = broken or (self.transfer is not None and self.transfer.failed_targets)
        return not (broken or self.interrupted)


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
            # Attack runs reported as they start: only where no scheduler counts reports as
            # epochs (ASHA's max_t) and no searcher reads each report's metric (Optuna).
            "attack_progress": spec.settings.scheduler.name == "none"
            and spec.settings.search.algorithm != "optuna",
            "plugin_dirs": plugin_dirs(spec),
            "grid_labelled": bool(spec.axes),  # a sample's label starts with its grid point's
        }
        for index, trial in enumerate(spec.trials)
    ]


def plugin_dirs(spec: SweepSpec) -> list[str]:
    """The sweep file's folder as an absolute path and relative to the working directory: a
    worker of a `ray job submit --working-dir .` job finds it under its own copy of that."""
    out = list(spec.plugin_dirs)
    for folder in spec.plugin_dirs:
        relative = os.path.relpath(folder)
        if not relative.startswith(".."):
            out.append(relative)
    return out


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


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    max_concurrent: int | None = None,
    wandb_mode: str | None = None,
    fresh: bool = False,
    verbose: int = 0,
) -> SweepOutcome:
    """Run the sweep's trials with Ray Tune; returns what landed in the store.

    Trials already finished in this sweep's folder are skipped (an interrupted sweep resumes
    where it stopped, unfinished trials from their last checkpoint) unless `fresh`, which also
    retrains; failed ones run again. Bad input raises SpecError before anything is written;
    another sweep on the same folder raises SweepBusy.
    """
    store = open_store(spec)
    preflight(spec, store, address)
    mode, note = reachable_mode(resolve_mode(wandb_mode or spec.settings.wandb.mode))
    if note:
        print(f"advlab: {note}", file=sys.stderr)
    with store.sweep_lock():
        for line in store.check_files():
            print(f"advlab: {line}", file=sys.stderr)
        run = run_trials(spec, store, mode, address, max_concurrent, fresh, verbose)
        for line in store.damaged:
            print(f"advlab: skipped {line}", file=sys.stderr)
        outcome = collect_outcome(spec, store, mode, run)
        if not outcome.interrupted:  # after Ctrl-C rerunning continues; no transfer now
            if (compacted := compact_after_sweep(store)) is not None:
                print(compacted, file=sys.stderr)
            finish(spec, store, outcome, address, verbose, new_trials=run is not None)
    return outcome


def open_store(spec: SweepSpec) -> SweepStore:
    """The sweep's folder; storage that cannot be reached is bad input, said in one line."""
    storage = spec.settings.storage
    try:
        return SweepStore(resolve_storage(storage), spec.name)
    except BadStorage as err:  # a malformed endpoint: its own line names it and the fix
        raise SpecError(str(err)) from None
    except (OSError, ValueError) as err:  # pyarrow: unreachable bucket, malformed URI
        why = one_line(err, 160)
        raise SpecError(
            f"storage: cannot open {storage} ({why}); check the path or the bucket, its "
            "credentials and the network"
        ) from None


def run_trials(
    spec: SweepSpec,
    store: SweepStore,
    mode: str,
    address: str | None,
    max_concurrent: int | None,
    fresh: bool,
    verbose: int,
) -> tuning.TuneRun | None:
    """Record this version of the sweep, then hand Tune what is left to run (None: nothing)."""
    recorded = manifest.record_version(store.read_manifest(), spec)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f") if fresh else ""
    configs = trial_configs(spec, store.storage, mode, manifest.labels(recorded), stamp)
    store.write_manifest(recorded)
    plan = plan_run(spec, store, configs, fresh)
    if not plan.total:
        return None
    tuning.init_ray(address, verbose)
    check_cluster_gpus(spec)
    print(f"advlab: sweep '{spec.name}': {count(plan.total, 'trial')} -> {store.uri}", flush=True)
    run = tuning.run_tuner(
        spec, store, plan.configs, num_samples=plan.num_samples, pending=plan.pending,
        done=plan.done, max_concurrent=max_concurrent, verbose=verbose,
        callbacks=[tuning.progress_callback(plan.total, plan.epochs)],
    )  # fmt: skip
    record_run(spec, store, run)
    write_pareto(spec, store)
    return run


def finish(
    spec: SweepSpec,
    store: SweepStore,
    outcome: SweepOutcome,
    address: str | None,
    verbose: int,
    new_trials: bool,
) -> None:
    """The transfer stage, whenever the transfer table does not match the sweep's trials (new
    trials or attack runs, none made yet, a stage cut off before its record), and the results
    artifact. A transfer stage that fails as a whole is recorded in the outcome; the trials'
    results stand. A transfer left stale is said in the outcome, never reported ok."""
    transfer = spec.settings.transfer
    if transfer.enabled and outcome.ok:
        from advlab.transfer import run_transfer, stale_reason

        if stale_reason(store, transfer) is not None:
            tuning.init_ray(address, verbose)
            try:
                outcome.transfer = run_transfer(store.uri, transfer, outcome.wandb_mode)
            except Exception as err:  # a whole-stage failure (disk full, Ray lost)
                outcome.transfer_error = failure_reason(err)[:300]
        if not outcome.transfer_error:
            outcome.transfer_stale = stale_reason(store, transfer) or ""
    if new_trials or outcome.transfer is not None:
        log_results(store, outcome.wandb_mode)


def log_results(store: SweepStore, mode: str | None = None) -> None:
    """The sweep's parquet and sweep.json as a W&B artifact (after new trials or transfer)."""
    from advlab.track import log_results_run

    recorded = store.read_manifest() or {}
    trials = store.read("trials")
    status = trials["status"].value_counts().to_dict() if len(trials) else {}
    log_results_run(
        **recorded_target(recorded, mode), group=store.sweep, directory=store.wandb_dir(),
        files=store.result_files(),
        metadata={"sweep": store.sweep, "uri": store.uri, "trials": status,
                  "versions": len(recorded.get("versions", []))},
    )  # fmt: skip
    store.sync_wandb()


@dataclass
class Plan:
    """What this invocation hands Tune: grid configs, samples per config, samples to redo."""

    configs: list[dict[str, Any]]
    num_samples: int = 1
    pending: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # samples the search already has

    @property
    def total(self) -> int:
        return len(self.configs) * self.num_samples if self.configs else 0

    @property
    def epochs(self) -> int:
        """The training epochs this run plans: the work its progress and ETA count (a search
        that samples train.epochs counts its grid point's)."""
        per_point = [TrialSpec.from_stored(c["spec"]).train.epochs for c in self.configs]
        return sum(per_point) * self.num_samples


def plan_run(
    spec: SweepSpec, store: SweepStore, configs: list[dict[str, Any]], fresh: bool
) -> Plan:
    """Grid: the points not finished yet. Search: the samples still owed to the version (its
    num_samples per grid point, less the trials it already has), samples an interrupted run
    left unfinished first."""
    search = spec.settings.search
    if search.algorithm == "grid":
        done = set() if fresh else finished(store, spec)
        todo = [c for c in configs if c["id"] not in done]
        if done & {c["id"] for c in configs}:
            print(
                f"advlab: resuming: {count(len(configs) - len(todo), 'trial')} already finished, "
                f"{len(todo)} to run (--fresh reruns them all)"
            )
        return Plan(todo)
    recorded = store.read_manifest() or {}
    version = recorded["versions"][-1]
    have = 0 if fresh else len(_rows_of(store, version["trial_ids"]))
    owed = search.num_samples * len(configs) - have
    if owed <= 0:
        print(
            f"advlab: all {count(have, 'sample')} of this search already ran (--fresh samples anew)"
        )
        return Plan([])
    pending = [] if fresh else unfinished_samples(store)
    if have:
        print(
            f"advlab: resuming: {count(have, 'sample')} done, {owed} to run (--fresh samples anew)"
        )
    return Plan(configs, num_samples=-(-owed // len(configs)), pending=pending[:owed], done=have)


def _rows_of(store: SweepStore, trial_ids: list[str]) -> set[str]:
    trials = store.read("trials")
    return set(trials["trial_id"]) & set(trial_ids)


def unfinished_samples(store: SweepStore) -> list[dict[str, Any]]:
    """Sampled values of Tune trials an earlier run started but left with no trials row."""
    rows = set(store.read("trials")["trial_id"])
    pending = []
    for config in store.tune_configs():
        if not config.get("sample"):
            continue
        spec, _ = tuning.resolve(config)
        if spec.trial_id() not in rows and config["sample"] not in pending:
            pending.append({"sample": config["sample"]})
    return pending


def record_run(spec: SweepSpec, store: SweepStore, run: tuning.TuneRun) -> None:
    """After Tune: a row for every trial a scheduler stopped, and (for a search) the sampled
    trials in the manifest's newest version."""
    samples = []
    for config, last, history in run.trials:
        trial, ctx = tuning.resolve(config)
        samples.append((trial.trial_id(), trial.model, ctx.grid_values))
        if "failed" not in last and "epoch" in last and not run.interrupted:
            write_stopped(store, trial, ctx, last, history, spec.settings.scheduler.name)
    if spec.settings.search.algorithm != "grid":
        store.write_manifest(manifest.record_samples(store.read_manifest(), samples))


def write_stopped(
    store: SweepStore, trial: Any, ctx: Any, last: dict[str, Any], history: Any, by: str
) -> None:
    """A trial the scheduler ended early: its epochs as Tune saw them and a `stopped` row."""
    from advlab.trial import trial_head

    trial_id = trial.trial_id()
    columns = ["epoch", "loss", "train_error", "test_error", "seconds", "adv_grad_evals"]
    epochs = history[[c for c in columns if c in history]].dropna(subset=["epoch"])
    rows = [{"trial_id": trial_id, **r} for r in epochs.to_dict("records")]
    store.write_rows("epochs", trial_id, rows)
    metric = next((k for k in ("test_error", "loss") if k in last), None)
    value = f" ({metric} {last[metric]:.4g})" if metric else ""
    reason = f"stopped early by {by} after epoch {int(last['epoch'])}{value}"
    row = trial_head(trial, ctx, trial_id) | {"status": Status.STOPPED, "reason": reason}
    store.write_rows("trials", trial_id, [row])


def finished(store: SweepStore, spec: SweepSpec) -> set[str]:
    """Trials with an ok row and a current ok result for every attack and measure run."""
    trials = store.read("trials")
    ok = set(trials.loc[trials["status"] == Status.OK, "trial_id"])
    done = _ok_runs(store, "attacks", "attack_id") | _ok_runs(store, "measures", "measure_id")
    return {
        trial_id
        for trial_id, trial in zip(spec.ids, spec.trials, strict=True)
        if trial_id in ok
        and all((trial_id, trial.attack_id(a)) in done for a in attack_plan(trial))
        and all((trial_id, run.run_id) in done for run in measure_runs(trial))
    }


def _ok_runs(store: SweepStore, table: str, column: str) -> set[tuple[str, str]]:
    runs = store.read(table, ["trial_id", column, "status"])
    ok = runs[runs["status"] == Status.OK]
    return set(zip(ok["trial_id"], ok[column], strict=True))


def collect_outcome(
    spec: SweepSpec, store: SweepStore, wandb_mode: str, run: tuning.TuneRun | None
) -> SweepOutcome:
    trials = store.read("trials")
    expected = manifest.current_ids(store.read_manifest()) or spec.ids
    status = dict(zip(trials["trial_id"], trials["status"], strict=True))
    reasons = dict(zip(trials["trial_id"], trials["reason"], strict=True))
    ok = [t for t in expected if status.get(t) == Status.OK]
    failed = {t: reasons[t] for t in expected if status.get(t) == Status.FAILED}
    stopped = [t for t in expected if status.get(t) == Status.STOPPED]
    missing = [t for t in expected if t not in status]
    if missing and run is not None and run.errors and not run.interrupted:
        print(
            f"advlab: {len(missing)} trial(s) left no row; Ray said: {run.errors[0]}",
            file=sys.stderr,
        )
    outcome = SweepOutcome(store, wandb_mode, len(expected), ok, failed, missing, stopped=stopped)
    outcome.missing_reasons = missing_reasons(run, missing)
    outcome.attack_failures = failed_attacks(spec, store)
    outcome.interrupted = run is not None and run.interrupted
    return outcome


def missing_reasons(run: tuning.TuneRun | None, missing: list[str]) -> dict[str, str]:
    """Why trials left no row, as their workers reported it (a full disk or read-only
    storage fails the write of the failed row too, so only Tune carries the reason)."""
    reasons: dict[str, str] = {}
    for config, last, _ in run.trials if run is not None else []:
        trial_id, reason = tuning.resolve(config)[0].trial_id(), last.get("reason")
        if trial_id in missing and isinstance(reason, str) and reason:
            reasons[trial_id] = reason
    return reasons


def failed_attacks(spec: SweepSpec, store: SweepStore) -> dict[tuple[str, str], str]:
    """(trial id, attack) -> reason, for the attacks the sweep now lists whose run failed."""
    attacks = store.read("attacks")
    broken = attacks[attacks["status"] == Status.FAILED]
    wanted = {
        (t, trial.attack_id(a)): a.key
        for t, trial in zip(spec.ids, spec.trials, strict=True)
        for a in attack_plan(trial)
    }
    return {
        (row.trial_id, wanted[(row.trial_id, row.attack_id)]): row.reason
        for row in broken.itertuples()
        if (row.trial_id, row.attack_id) in wanted
    }


def transfer_lines(outcome: TransferOutcome) -> list[str]:
    targets = outcome.rows["target"].nunique() if len(outcome.rows) else 0
    lines = [
        f"advlab: transfer: {count(len(outcome.sources), 'source trial')} x "
        f"{count(targets, 'target')}, {count(len(outcome.rows), 'row')} in {outcome.seconds:.1f} s"
        f" ({outcome.ran} of {count(outcome.shards, 'shard')} run now)"
    ]
    lines += [f"  not transferred {tid}: {why}" for tid, why in outcome.skipped.items()]
    lines += [f"  target {t} failed: {why}" for t, why in outcome.failed_targets.items()]
    return lines


def summary_lines(outcome: SweepOutcome) -> list[str]:
    store = outcome.store
    if outcome.interrupted:
        return [
            f"advlab: interrupted: {len(outcome.ok)}/{count(outcome.expected, 'trial')} ok so "
            "far; run the same command again to resume (unfinished trials continue from their last "
            "checkpoint)"
        ]
    stopped = f", {len(outcome.stopped)} stopped early" if outcome.stopped else ""
    lines = [
        f"advlab: {len(outcome.ok)}/{count(outcome.expected, 'trial')} ok, "
        f"{len(outcome.failed)} failed, {len(outcome.missing)} missing{stopped}",
    ]
    labels = manifest.labels(store.read_manifest())
    lines += [f"  failed {labels.get(t, t)}: {why}" for t, why in outcome.failed.items()]
    lines += [f"  missing {labels.get(t, t)}: {why}" for t, why in outcome.missing_reasons.items()]
    lines += flag_lines(store, labels, outcome.ok)
    lines += [
        f"  attack {attack} failed on {labels.get(t, t)}: {why}"
        for (t, attack), why in outcome.attack_failures.items()
    ]
    if outcome.transfer is not None:
        lines += transfer_lines(outcome.transfer)
    if outcome.transfer_error:
        lines.append(
            f"  transfer stage failed: {outcome.transfer_error}; fix it and run "
            f"`advlab transfer {store.uri}`"
        )
    if outcome.transfer_stale:
        lines.append(
            f"  transfer is stale: {outcome.transfer_stale}; run `advlab transfer {store.uri}`"
        )
    written = [t for t in store.tables() if store.trial_files(t)]  # no folder that is not there
    lines.append(f"  parquet: {store.uri}/{{{','.join(written)}}}/")
    if outcome.wandb_mode == "offline":
        runs = store.wandb_runs()
        how = f"wandb sync {runs}"
        if store.is_remote:  # wandb sync reads local folders only
            how = f"aws s3 sync {store.uri}/wandb wandb, then wandb sync wandb/offline-run-*"
        lines.append(f"  W&B offline runs: {runs}  (upload later: {how})")
    elif outcome.wandb_mode == "online":
        lines.append(f"  W&B: online, group '{store.sweep}'")
    return lines


def pareto_front(points: dict[str, list[float]], modes: list[str]) -> set[str]:
    """The keys of the points no other point dominates (as good in every objective, better in
    one); objectives to maximise are compared negated."""
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    scored = {k: [s * v for s, v in zip(sign, vals, strict=True)] for k, vals in points.items()}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return {k for k, a in scored.items() if not any(dominates(b, a) for b in scored.values())}


def write_pareto(spec: SweepSpec, store: SweepStore) -> None:
    """A multi-objective search's Pareto front over its ok trials, as the pareto table: each
    trial's label and objective values, and whether it is on the front."""
    from advlab.trial import stored_metrics

    search = spec.settings.search
    if len(search.metrics) < 2:
        return
    trials = store.read("trials").set_index("trial_id")
    ids = [t for t in manifest.current_ids(store.read_manifest()) if t in trials.index]
    points = {}
    for trial_id in ids:
        if trials.loc[trial_id, "status"] != Status.OK:
            continue
        found = stored_metrics(store, trial_id) | trials.loc[trial_id].to_dict()
        points[trial_id] = [float(found[m]) for m in search.metrics]
    front = pareto_front(points, search.modes)
    labels = manifest.labels(store.read_manifest())
    rows = [
        {
            "trial_id": t,
            "label": labels.get(t, trials.loc[t, "label"]),
            "metric": m,
            "mode": mode,
            "value": v,
            "on_front": t in front,
        }
        for t, values in points.items()
        for m, mode, v in zip(search.metrics, search.modes, values, strict=True)
    ]
    store.write_rows("pareto", "all", rows)


def flag_lines(store: SweepStore, labels: dict[str, str], ok: list[str]) -> list[str]:
    """One line per flag a measure raised on a finished trial (possible gradient masking, a
    failed evaluation health check, ...), with its reason."""
    records = store.read("measures", ["trial_id", "measure", "status", "flag"])
    return [
        f"  {measure} flagged {labels.get(t, t)}: {why}"
        for t, raised in flags(records[records["trial_id"].isin(ok)]).items()
        for measure, why in raised.items()
    ]
