"""One trial, the unit of work, in three steps: train (or load), evaluate, write the results.

Plain Python with no Ray import, so it runs and tests in a bare process; sweep.py wraps it.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from torch import Tensor

from advlab.data import Dataset, SubsetSplit, select_subset
from advlab.evaluate import AttackedSet, Evaluation, evaluate_attack, first_correct
from advlab.families import FitJob, TrialModel, model_for
from advlab.measures import registry as measure_registry
from advlab.measures.registry import MeasureContext
from advlab.measuring import execute
from advlab.plan import MeasureRun, attack_plan, measure_runs, run_part
from advlab.plugins import UserExit, describe
from advlab.robust_validation import carve_validation, evaluated_epoch
from advlab.runtime import pick_device
from advlab.sources import load_data_spec
from advlab.spec import EVALUATION_KEYS, TRAINING_KEYS, AttackSpec, TrialSpec
from advlab.storage_errors import failure_reason
from advlab.store import SweepStore
from advlab.tables import Status, config_columns
from advlab.track import TrialRun
from advlab.train import EpochStats

# report(metrics, state): after each epoch, its stats and a function that builds a resumable
# training checkpoint (called only by reporters that keep checkpoints); as each attack run
# starts, {"attack_run": i, "attack_runs": n, "attack": its name} and None.
# A reporter raises TrialStopped when a scheduler ends the trial early.
Reporter = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


class TrialStopped(BaseException):  # not an Exception: `except Exception` lets it through
    """A scheduler (ASHA, median stopping) ended the trial early, on purpose: no failure is
    recorded (the driver writes its `stopped` row) and the trial returns at once, so its
    worker is free for the next trial."""


@dataclass(frozen=True)
class TrialContext:
    """Where a trial's results go; nothing here changes its numbers."""

    sweep: str
    storage: str  # absolute path or URI
    trial_index: int = 0
    label: str = ""  # readable name from the grid values (the id stays the key)
    grid_values: dict[str, Any] = field(default_factory=dict)
    wandb_mode: str = "disabled"  # already resolved: online, offline or disabled
    wandb_project: str = "advlab"
    wandb_entity: str | None = None
    worker_node: str = ""  # where it ran (a Ray node id under a sweep), for the record
    # Non-empty: a cached model counts only if this run trained it (`--fresh` retrains).
    run_stamp: str = ""


@dataclass
class TrialResult:
    row: dict[str, Any]  # the trials-table row
    metrics: dict[str, float]  # flat per-attack scalars (Tune, W&B)


@dataclass
class Trained:
    """A trained model and the data it was trained and is evaluated on (on its device)."""

    model: TrialModel
    data: Dataset
    split: SubsetSplit
    x_train: Tensor
    y_train: Tensor
    history: list[EpochStats]
    trained_here: bool
    seconds: float
    resumed_from_epoch: int = 0
    n_validation: int = 0  # training-subset examples held out for robust validation
    evaluated_epoch: int | None = None  # whose weights the model holds (best or last)


def run_trial(
    spec: TrialSpec,
    ctx: TrialContext,
    report: Reporter | None = None,
    resume: dict[str, Any] | None = None,
) -> TrialResult:
    """Run one trial and write its results; returns its trials-table row and metrics.

    A trial that finished before (its trials row is ok) is not redone: only its attack and
    measure runs that have no current result run (a sweep that gained an attack or a measure),
    and its own files stay untouched. `resume` is a training checkpoint from an earlier attempt
    (see Reporter). A failure is recorded (status failed, with the reason) in the trials table
    and the W&B run before the exception propagates, so the sweep can carry on and report it.
    """
    trial_id = spec.trial_id()
    store = SweepStore(ctx.storage, ctx.sweep)
    finished = None if ctx.run_stamp else finished_row(store, trial_id)
    tracker = open_tracker(spec, ctx, store, trial_id, grows=finished is not None)
    row = finished or trial_head(spec, ctx, trial_id)
    try:
        trained = train_or_load(spec, ctx, store, tracker, report, resume)
        attacked = attacked_set(spec, trained)
        if finished is None:
            row |= summary_columns(trained, attacked)
            write_epochs(store, trial_id, trained)
            log_model(tracker, store, spec, trial_id)
        fresh = bool(ctx.run_stamp)
        attacks = pending_attacks(spec, store, trial_id, fresh)
        for i, attack in enumerate(attacks, 1):
            if report is not None:
                report({"attack_run": i, "attack_runs": len(attacks), "attack": attack.key}, None)
            run_and_write_attack(store, tracker, spec, attack, trained, attacked)
        for run in pending_measures(spec, store, trial_id, fresh):
            run_and_write_measure(store, tracker, spec, run, trained, attacked)
    except TrialStopped:  # the scheduler's decision, not a failure: nothing to record
        tracker.finish()
        raise
    except (Exception, SystemExit) as caught:  # user code (a training method...) may exit
        err = as_error(caught)
        record_failure(store, tracker, row if finished is None else None, err)
        err.add_note(traceback.format_exc(limit=3))
        if err is caught:
            raise
        raise err from None
    if finished is None:
        store.write_rows("trials", trial_id, [row])  # last: marks the trial complete
    metrics = stored_metrics(store, trial_id)
    tracker.log_summary(_numbers(row) | metrics)
    for measure, reason in flags(store.read_trial("measures", trial_id)).get(trial_id, {}).items():
        tracker.flag(measure, reason)
    tracker.finish()
    store.sync_wandb()
    return TrialResult(row, metrics)


def as_error(caught: BaseException) -> Exception:
    """An Exception as it is; SystemExit (user code that called sys.exit mid-trial) as a
    UserExit that fails the trial with its reason, instead of ending the worker or the
    `advlab trial` process with no word."""
    if isinstance(caught, Exception):
        return caught
    return UserExit(f"user code {describe(caught)}")


def record_failure(
    store: SweepStore, tracker: TrialRun, row: dict[str, Any] | None, err: Exception
) -> None:
    """A failed row with the reason (`row`: None keeps a finished trial's row as it was) and
    the W&B run closed as failed. When storage itself failed (a full disk, storage turned
    read-only) these writes may fail too: the original error is what the trial raises, with
    a note, so its reason still reaches the sweep's summary."""
    reason = failure_reason(err)
    try:
        if row is not None:
            store.write_rows(
                "trials", row["trial_id"], [row | {"status": Status.FAILED, "reason": reason}]
            )
        tracker.log_summary({"status": Status.FAILED, "reason": reason})
        tracker.finish(failed=True)
        store.sync_wandb()
    except Exception as also:  # the storage that failed the trial fails its record too
        err.add_note(f"its failure could not be recorded either: {failure_reason(also)}")


def finished_row(store: SweepStore, trial_id: str) -> dict[str, Any] | None:
    """The trial's row if it finished ok before, as a plain dict."""
    rows = store.read_trial("trials", trial_id)
    ok = rows[rows["status"] == Status.OK]
    return None if ok.empty else ok.iloc[0].to_dict()


def pending_attacks(
    spec: TrialSpec, store: SweepStore, trial_id: str, fresh: bool = False
) -> list[AttackSpec]:
    """The trial's attacks with no ok result for their current settings."""
    plan = attack_plan(spec)  # the sweep's attacks and those its measures add
    if fresh:
        return plan
    done = _done_ids(store, "attacks", trial_id, "attack_id")
    return [a for a in plan if spec.attack_id(a) not in done]


def pending_measures(
    spec: TrialSpec, store: SweepStore, trial_id: str, fresh: bool = False
) -> list[MeasureRun]:
    """The trial's measure runs with no ok result for their current id."""
    runs = measure_runs(spec)
    if fresh:
        return runs
    done = _done_ids(store, "measures", trial_id, "measure_id")
    return [r for r in runs if r.run_id not in done]


def _done_ids(store: SweepStore, table: str, trial_id: str, column: str) -> set[str]:
    rows = store.read_trial(table, trial_id)
    return set(rows.loc[rows["status"] == Status.OK, column])


def stored_metrics(store: SweepStore, trial_id: str) -> dict[str, float]:
    """Scalars for Tune and W&B over every attack and measure run the trial has results for
    (old and new), named by the attack runs' rows and by each measure."""
    evaluation = Evaluation(
        attacks=store.read_trial("attacks", trial_id).to_dict("records"),
        curves=store.read_trial("curves", trial_id).to_dict("records"),
    )
    metrics = evaluation.metrics()
    records = store.read_trial("measures", trial_id)
    for record in records[records["status"] == Status.OK].itertuples():
        defn = measure_defn(record.name)
        if defn is not None and defn.metrics is not None:
            attack = record.attack if isinstance(record.attack, str) else None
            rows = store.read_trial(record.table, trial_id, run_part(record.measure, attack))
            metrics |= defn.metrics(rows.to_dict("records"))
    return metrics


def flags(records: Any) -> dict[str, dict[str, str]]:
    """trial -> {measure: reason} for every flag raised by the measure runs (rows of the
    measures table) that ended ok."""
    raised = records[(records["status"] == Status.OK) & (records["flag"].fillna("") != "")]
    flagged: dict[str, dict[str, str]] = {}
    for row in raised.itertuples():
        flagged.setdefault(row.trial_id, {})[row.measure] = row.flag
    return flagged


def measure_defn(name: str) -> Any:
    try:
        return measure_registry.get(name)
    except measure_registry.MeasureError:
        return None  # a plug-in this process cannot import: its rows stay, unread here


def open_tracker(
    spec: TrialSpec, ctx: TrialContext, store: SweepStore, trial_id: str, grows: bool = False
) -> TrialRun:
    """The trial's W&B run; `grows`: a finished trial gaining runs keeps its earlier run."""
    return TrialRun(
        mode=ctx.wandb_mode,
        project=ctx.wandb_project,
        entity=ctx.wandb_entity,
        group=ctx.sweep,
        run_id=f"{ctx.sweep}-{trial_id}",
        name=ctx.label or trial_id,
        tags=[f"{k}={v}" for k, v in ctx.grid_values.items()],
        config={"trial_id": trial_id, **ctx.grid_values, **spec.model_dump(mode="json")},
        directory=store.wandb_dir(),
        keep_earlier=grows,
    )


def trial_head(spec: TrialSpec, ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    """Ids, the trial's settings and versions: what a failed trial's row carries too."""
    return {
        "trial_id": trial_id,
        "trial_index": ctx.trial_index,
        "label": ctx.label or trial_id,
        "sweep": ctx.sweep,
        "status": Status.OK,
        "reason": "",
        **config_columns(spec),
        "training_key": spec.training_key(),
        "worker_node": ctx.worker_node,
        "spec": spec.model_dump_json(exclude=set(EVALUATION_KEYS)),
        "advlab_version": version("advlab"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


# --------------------------------------------------------------------------- step 1: train


@dataclass
class FitData:
    """A trial's data, subset and held-out validation slice, on its device."""

    data: Dataset
    split: SubsetSplit
    x_train: Tensor
    y_train: Tensor
    validation: tuple[Tensor, Tensor] | None


def fit_data(spec: TrialSpec, device: torch.device) -> FitData:
    data = load_data_spec(spec.dataset)
    split = select_subset(data, spec.subset, spec.dataset.split_seed)
    fit, held = carve_validation(
        len(split.train_idx), spec.train.validation.fraction, spec.dataset.split_seed
    )
    val_idx = split.train_idx[held]
    validation = (data.x_train[val_idx].to(device), data.y_train[val_idx].to(device))
    x_train = data.x_train[split.train_idx[fit]]  # a streaming set's rows stay on file
    return FitData(
        data, split, x_train.to(device) if isinstance(x_train, Tensor) else x_train,
        data.y_train[split.train_idx[fit]].to(device), validation if len(val_idx) else None,
    )  # fmt: skip


def train_or_load(
    spec: TrialSpec,
    ctx: TrialContext,
    store: SweepStore,
    tracker: TrialRun,
    report: Reporter | None,
    resume: dict[str, Any] | None,
) -> Trained:
    """Train the trial's model, or load it when a twin trial (same training key) already did.

    The first trial to take the key's lock trains and saves; the others load. Every epoch, from
    training or from the cached history, goes to the tracker and the reporter alike.
    """
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    device = pick_device(spec.device)
    fd = fit_data(spec, device)
    model = model_for(spec, fd.data.input_shape, fd.data.num_classes).to(device)

    def on_epoch(stats: EpochStats, state: Callable[[], dict[str, Any]] | None) -> None:
        check_training(stats, fd.data.num_classes)
        tracker.log_epoch(asdict(stats))
        if report is not None:
            report(asdict(stats), state)

    key = spec.training_key()
    with store.lock(key):
        history = load_cached(store, spec, ctx, model, on_epoch)
        trained_here = history is None
        if history is None:
            x_test = fd.data.x_test  # a streaming set's test rows are read per chunk
            job = FitJob(
                fd.x_train, fd.y_train, x_test.to(device) if isinstance(x_test, Tensor) else x_test,
                fd.data.y_test.to(device),
                spec.train, spec.weight_decay, spec.seed, on_epoch, resume, fd.validation,
            )  # fmt: skip
            history = model.fit(job)
            saved = {"history": [asdict(h) for h in history], "run": ctx.run_stamp}
            store.save_model(key, model.state() | saved | {"init": init_digest(spec)})
    model.module.eval()
    resumed = len(resume["history"]) if resume is not None and trained_here else 0
    n_val = 0 if fd.validation is None else len(fd.validation[1])
    return Trained(
        model, fd.data, fd.split, fd.x_train, fd.y_train, history, trained_here,
        time.perf_counter() - start, resumed, n_val,
        evaluated_epoch([asdict(h) for h in history], spec.train),
    )  # fmt: skip


def load_cached(
    store: SweepStore,
    spec: TrialSpec,
    ctx: TrialContext,
    model: TrialModel,
    on_epoch: Callable[[EpochStats, None], None],
) -> list[EpochStats] | None:
    """The cached model's history, its weights loaded into `model`; None when it must be
    trained: none cached, trained before a --fresh run, from an older `init` file, or not
    loadable into this model (then it is never trusted)."""
    cached = store.load_model(spec.training_key())
    if cached is None or (ctx.run_stamp and cached.get("run") != ctx.run_stamp):
        return None  # none, or --fresh: trained before this run, so train again
    if cached.get("init") != init_digest(spec):
        return None  # the init weights file changed since: train again from it
    try:
        model.load_state(cached)
        history = [EpochStats(**row) for row in cached["history"]]
    except Exception:  # a file of another model or version: retrain over it
        return None
    for stats in history:
        on_epoch(stats, None)
    return history


def init_digest(spec: TrialSpec) -> str | None:
    """A digest of the `init` weights file, so a cached model trained from an older file is
    not reused (the training key holds the path, not the content)."""
    if spec.init is None:
        return None
    with open(spec.init, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


# An untrained net's loss is about log K (chance); a loss this many times higher has diverged
# even without a NaN (sgd at lr 1e6 settles near 5e6 instead of overflowing), and its logits
# are too large for its gradients to mean anything to an attack.
DIVERGED = 100.0


def check_training(stats: EpochStats, classes: int) -> None:
    """A NaN, infinite or diverged loss ends the trial as failed, with the fix in the reason."""
    if not math.isfinite(stats.loss):
        raise FloatingPointError(
            f"training loss is {stats.loss} at epoch {stats.epoch}; lower train.lr or weight_decay"
        )
    chance = math.log(max(classes, 2))
    if stats.epoch > 1 and stats.loss > DIVERGED * chance:
        raise FloatingPointError(
            f"training diverged: loss {stats.loss:.4g} at epoch {stats.epoch}, "
            f"{stats.loss / chance:.3g} times chance's {chance:.3g}; lower train.lr or weight_decay"
        )


# --------------------------------------------------------------------------- step 2: evaluate


def attacked_set(spec: TrialSpec, trained: Trained) -> AttackedSet:
    """The first `attack_examples` examples the model classifies correctly: of the test set,
    or (attack_split train, as the paper's Tables 1-2) of the trial's own training subset;
    dataset_index always indexes the whole split."""
    module = trained.model.module
    device = trained.y_train.device
    if spec.attack_split == "train":
        found = first_correct(module, trained.x_train, trained.y_train, spec.attack_examples)
        found.dataset_index = trained.split.train_idx[found.dataset_index]
        found.split = "train"
    else:
        x_test = trained.data.x_test
        x_test = x_test.to(device) if isinstance(x_test, Tensor) else x_test  # streamed: rows
        found = first_correct(module, x_test, trained.data.y_test.to(device), spec.attack_examples)
    found.x = found.x.to(device)  # streamed rows read: the attacked images are a small tensor
    return found


def summary_columns(trained: Trained, attacked: AttackedSet) -> dict[str, Any]:
    """The trials row's results: clean errors, the attacked set, training cost, device."""
    model, data, history = trained.model, trained.data, trained.history
    heldout = trained.split.heldout_idx
    return {
        "trained_here": trained.trained_here,
        "n_train": len(trained.x_train),
        "input_dim": math.prod(data.input_shape),
        "train_error": model.error_rate(trained.x_train, trained.y_train),
        "test_error": model.error_rate(data.x_test, data.y_test),
        "heldout_error": model.error_rate(data.x_train[heldout], data.y_train[heldout]),
        "n_test": len(data.y_test),
        "n_heldout": len(heldout),
        "n_attacked": len(attacked.y),
        "n_scanned": attacked.n_scanned,
        "n_clean_wrong": attacked.n_clean_wrong,
        "train_adv_grad_evals": history[-1].adv_grad_evals if history else 0,
        "resumed_from_epoch": trained.resumed_from_epoch,
        "n_validation": trained.n_validation,
        "evaluated_epoch": trained.evaluated_epoch,
        "val_robust_error": _value_at(history, trained.evaluated_epoch, "val_robust_error"),
        "train_seconds": trained.seconds,
        "device_used": str(trained.y_train.device),
    }


# --------------------------------------------------------------------------- step 3: write


def write_epochs(store: SweepStore, trial_id: str, trained: Trained) -> None:
    """The trial's own file of the epochs table: its training history."""
    epochs = [{"trial_id": trial_id, **_nan_to_null(asdict(s))} for s in trained.history]
    store.write_rows("epochs", trial_id, epochs)


def log_model(tracker: TrialRun, store: SweepStore, spec: TrialSpec, trial_id: str) -> None:
    """The trained weights as a W&B model artifact, pointing at its file in the model store."""
    key = spec.training_key()
    training = spec.model_dump(mode="json", include=set(TRAINING_KEYS))
    tracker.log_artifact(
        f"model-{key}", "model", [(f"{key}.pt", store.model_file(key))],
        {"training_key": key, "trial_id": trial_id, **training},
    )  # fmt: skip


def run_and_write_attack(
    store: SweepStore,
    tracker: TrialRun,
    spec: TrialSpec,
    attack: AttackSpec,
    trained: Trained,
    attacked: AttackedSet,
) -> None:
    """One attack run set, written as its own files (`<trial>.<attack>.parquet`): examples and
    curves first, the attacks rows last, so their presence marks it done."""
    trial_id = spec.trial_id()
    evaluation = evaluate_attack(spec, attack, trained.model.module, attacked, trial_id)
    part = attack.key
    store.write_rows("examples", trial_id, evaluation.examples, part)
    store.write_rows("curves", trial_id, evaluation.curves, part)
    store.write_rows("attacks", trial_id, evaluation.attacks, part)
    tracker.log_attack(attack.key, evaluation.attacks, evaluation.curves)
    if attack.defn.kind == "minimization":
        log_example_images(tracker, attack.key, attacked, evaluation.examples)


def run_and_write_measure(
    store: SweepStore,
    tracker: TrialRun,
    spec: TrialSpec,
    run: MeasureRun,
    trained: Trained,
    attacked: AttackedSet,
) -> None:
    """One measure run, written as its own files (`<trial>.<part>.parquet`): its table's rows
    first, its measures row last, so its presence marks the run done."""
    trial_id = spec.trial_id()

    def results(table: str) -> Any:  # the trial's attack results, as stored
        rows = store.read_trial(table, trial_id)
        return rows if run.attack is None else rows[rows["attack"] == run.attack.key]

    context = MeasureContext(
        spec=spec, model=trained.model, data=trained.data, x_train=trained.x_train,
        y_train=trained.y_train, attacked=attacked, attacks=attack_plan(spec), attack=run.attack,
        results=results, files=store.files_dir(trial_id, run.measure.key),
        shared=store.shared_dir(run.measure.key),
    )  # fmt: skip
    outcome = execute(run, context, trial_id)
    store.write_part(run.measure.defn.table, trial_id, run.part, outcome.data)
    store.write_rows("measures", trial_id, [outcome.record], run.part)
    name = run.measure.key if run.attack is None else f"{run.measure.key}/{run.attack.key}"
    tracker.log_measure(name, outcome.record, outcome.rows)


def log_example_images(
    tracker: TrialRun,
    attack: str,
    attacked: AttackedSet,
    rows: list[dict[str, Any]],
    count: int = 8,
) -> None:
    """The first successful examples of a minimisation attack, for the W&B run."""
    chosen = [r for r in rows if r["success"]][:count]
    if not chosen:
        return
    clean = attacked.x[[r["example"] for r in chosen]].cpu().numpy()
    adversarial = np.stack([r["x_adv"] for r in chosen]).reshape(clean.shape)
    captions = [f"{r['label']}->{r['adv_pred']} rms {r['dist_rms']:.3f}" for r in chosen]
    tracker.log_examples(attack, clean, adversarial, captions)


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _nan_to_null(row: dict[str, Any]) -> dict[str, Any]:
    """NaN marks "not measured this epoch" in EpochStats; the tables store it as null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _value_at(history: list[EpochStats], epoch: int | None, name: str) -> float | None:
    """One epoch's stat, null when absent or not measured."""
    if epoch is None or not 1 <= epoch <= len(history):
        return None
    value = getattr(history[epoch - 1], name)
    return None if math.isnan(value) else value
