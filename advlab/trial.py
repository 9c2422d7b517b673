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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import advlab
from advlab.data import Dataset, SubsetSplit, select_subset
from advlab.evaluate import (
    AttackedSet,
    Evaluation,
    attack_density,
    evaluate_attack,
    first_correct,
    trial_properties,
)
from advlab.masking import assess_masking, attack_plan
from advlab.models import model_for
from advlab.robust_validation import carve_validation, evaluated_epoch
from advlab.runtime import error_rate, pick_device
from advlab.sources import load_data_spec
from advlab.spec import ATTACK_KEYS, TRAINING_KEYS, AttackSpec, TrialSpec
from advlab.store import SweepStore
from advlab.tables import config_columns
from advlab.track import TrialRun
from advlab.train import EpochStats, train_model

# report(metrics, state): state is None for the final report, and after each epoch a function
# that builds a resumable training checkpoint (called only by reporters that keep checkpoints).
Reporter = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


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

    model: nn.Module
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

    A trial that finished before (its trials row is ok) is not redone: only its attacks that
    have no result yet run (a sweep that gained an attack), and its own files stay untouched.
    `resume` is a training checkpoint from an earlier attempt (see Reporter). A failure is
    recorded (status failed, with the reason) in the trials table and the W&B run before the
    exception propagates, so the sweep can carry on and report the gap.
    """
    trial_id = spec.trial_id()
    store = SweepStore(ctx.storage, ctx.sweep)
    finished = None if ctx.run_stamp else finished_row(store, trial_id)
    tracker = open_tracker(spec, ctx, store, trial_id)
    row = finished or trial_head(spec, ctx, trial_id)
    try:
        trained = train_or_load(spec, ctx, store, tracker, report, resume)
        attacked = attacked_set(spec, trained)
        if finished is None:
            row |= summary_columns(trained, attacked)
            write_trial_tables(store, spec, trial_id, trained, attacked)
            log_model(tracker, store, spec, trial_id)
        for attack in pending_attacks(spec, store, trial_id, fresh=bool(ctx.run_stamp)):
            run_and_write_attack(store, tracker, spec, attack, trained, attacked)
        if finished is None:
            row |= masking_columns(store, spec, trial_id, attacked)
    except Exception as err:
        if finished is None:  # a finished trial's row stays as it was
            row |= {"status": "failed", "reason": f"{type(err).__name__}: {err}".splitlines()[0]}
            store.write_rows("trials", trial_id, [row])
        tracker.log_summary({"status": "failed", "reason": str(err).splitlines()[0]})
        tracker.finish(failed=True)
        store.sync_wandb()
        err.add_note(traceback.format_exc(limit=3))
        raise
    if finished is None:
        store.write_rows("trials", trial_id, [row])  # last: marks the trial complete
    metrics = stored_metrics(store, trial_id)
    if row.get("gradient_masking") is not None:
        metrics["gradient_masking"] = float(row["gradient_masking"])
    tracker.log_summary(_numbers(row) | metrics)
    if row.get("gradient_masking"):
        tracker.flag_masking(row.get("masking_reason") or "")
    tracker.finish()
    store.sync_wandb()
    return TrialResult(row, metrics)


def finished_row(store: SweepStore, trial_id: str) -> dict[str, Any] | None:
    """The trial's row if it finished ok before, as a plain dict."""
    rows = store.read_trial("trials", trial_id)
    ok = rows[rows["status"] == "ok"]
    return None if ok.empty else ok.iloc[0].to_dict()


def pending_attacks(
    spec: TrialSpec, store: SweepStore, trial_id: str, fresh: bool = False
) -> list[AttackSpec]:
    """The trial's attacks with no ok result for their current settings."""
    plan = attack_plan(spec)  # the sweep's attacks and, for adversarial training, a strong set
    if fresh:
        return plan
    done = store.read_trial("attacks", trial_id)
    done_ids = set(done.loc[done["status"] == "ok", "attack_id"])
    return [a for a in plan if spec.attack_id(a) not in done_ids]


def masking_columns(
    store: SweepStore, spec: TrialSpec, trial_id: str, attacked: AttackedSet
) -> dict[str, Any]:
    """The gradient-masking check over every attack the trial has results for."""
    curves = store.read_trial("curves", trial_id).to_dict("records")
    examples = store.read_trial("examples", trial_id).drop(columns="x_adv").to_dict("records")
    flag, reason = assess_masking(attack_plan(spec), curves, examples, attacked.n_clean_wrong)
    return {"gradient_masking": flag, "masking_reason": reason}


def stored_metrics(store: SweepStore, trial_id: str) -> dict[str, float]:
    """Per-attack scalars over every attack the trial has results for (old and new)."""
    evaluation = Evaluation(
        attacks=store.read_trial("attacks", trial_id).to_dict("records"),
        curves=store.read_trial("curves", trial_id).to_dict("records"),
        properties=store.read_trial("properties", trial_id).to_dict("records"),
    )
    return evaluation.metrics()


def open_tracker(spec: TrialSpec, ctx: TrialContext, store: SweepStore, trial_id: str) -> TrialRun:
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
    )


def trial_head(spec: TrialSpec, ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    """Ids, the trial's settings and versions: what a failed trial's row carries too."""
    return {
        "trial_id": trial_id,
        "trial_index": ctx.trial_index,
        "label": ctx.label or trial_id,
        "sweep": ctx.sweep,
        "status": "ok",
        "reason": "",
        **config_columns(spec),
        "training_key": spec.training_key(),
        "worker_node": ctx.worker_node,
        "spec": spec.model_dump_json(exclude=set(ATTACK_KEYS)),
        "advlab_version": advlab.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


# --------------------------------------------------------------------------- step 1: train


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
    data = load_data_spec(spec.dataset)
    split = select_subset(data, spec.subset, spec.dataset.split_seed)
    fit, held = carve_validation(
        len(split.train_idx), spec.train.validation.fraction, spec.dataset.split_seed
    )
    x_train = data.x_train[split.train_idx[fit]].to(device)
    y_train = data.y_train[split.train_idx[fit]].to(device)
    val_idx = split.train_idx[held]
    validation = (data.x_train[val_idx].to(device), data.y_train[val_idx].to(device))
    model = model_for(spec, data.input_shape, data.num_classes).to(device)

    def on_epoch(stats: EpochStats, state: Callable[[], dict[str, Any]] | None) -> None:
        check_training(stats, data.num_classes)
        tracker.log_epoch(asdict(stats))
        if report is not None:
            report(asdict(stats), state)

    key, init = spec.training_key(), init_digest(spec)
    with store.lock(key):
        cached = store.load_model(key)
        if cached is not None and ctx.run_stamp and cached.get("run") != ctx.run_stamp:
            cached = None  # --fresh: trained before this run, so train again
        if cached is not None and cached.get("init") != init:
            cached = None  # the init weights file changed since: train again from it
        if cached is None:
            history = train_model(
                model, x_train, y_train, data.x_test.to(device), data.y_test.to(device),
                spec.train, spec.weight_decay, spec.seed, on_epoch, resume,
                validation if len(val_idx) else None,
            ) if spec.train.epochs else []  # fmt: skip
            saved = {"model": model.state_dict(), "history": [asdict(h) for h in history]}
            store.save_model(key, saved | {"run": ctx.run_stamp, "init": init})
        else:
            model.load_state_dict(cached["model"])
            history = [EpochStats(**row) for row in cached["history"]]
            for stats in history:
                on_epoch(stats, None)
    model.eval()
    seconds = time.perf_counter() - start
    resumed = len(resume["history"]) if resume is not None and cached is None else 0
    return Trained(
        model, data, split, x_train, y_train, history, cached is None, seconds, resumed,
        len(val_idx), evaluated_epoch([asdict(h) for h in history], spec.train),
    )  # fmt: skip


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
    if spec.attack_split == "train":
        found = first_correct(trained.model, trained.x_train, trained.y_train, spec.attack_examples)
        found.dataset_index = trained.split.train_idx[found.dataset_index]
        found.split = "train"
        return found
    device = trained.x_train.device
    x_test, y_test = trained.data.x_test.to(device), trained.data.y_test.to(device)
    return first_correct(trained.model, x_test, y_test, spec.attack_examples)


def summary_columns(trained: Trained, attacked: AttackedSet) -> dict[str, Any]:
    """The trials row's results: clean errors, the attacked set, training cost, device."""
    model, data, history = trained.model, trained.data, trained.history
    return {
        "trained_here": trained.trained_here,
        "n_train": len(trained.x_train),
        "train_error": error_rate(model, trained.x_train, trained.y_train),
        "test_error": error_rate(model, data.x_test, data.y_test),
        "heldout_error": error_rate(
            model, data.x_train[trained.split.heldout_idx], data.y_train[trained.split.heldout_idx]
        ),
        "n_attacked": len(attacked.y),
        "n_scanned": attacked.n_scanned,
        "n_clean_wrong": attacked.n_clean_wrong,
        "train_adv_grad_evals": history[-1].adv_grad_evals if history else 0,
        "resumed_from_epoch": trained.resumed_from_epoch,
        "n_validation": trained.n_validation,
        "evaluated_epoch": trained.evaluated_epoch,
        "val_robust_error": _value_at(history, trained.evaluated_epoch, "val_robust_error"),
        "train_seconds": trained.seconds,
        "device_used": str(trained.x_train.device),
    }


# --------------------------------------------------------------------------- step 3: write


def write_trial_tables(
    store: SweepStore, spec: TrialSpec, trial_id: str, trained: Trained, attacked: AttackedSet
) -> None:
    """The trial's own files: its training history and its properties."""
    epochs = [{"trial_id": trial_id, **_nan_to_null(asdict(s))} for s in trained.history]
    store.write_rows("epochs", trial_id, epochs)
    units = store.units_dir(trial_id) if spec.properties.unit_analysis else None
    properties = trial_properties(
        spec, trained.model, trained.data, trained.x_train, attacked, units
    )
    store.write_rows("properties", trial_id, [{"trial_id": trial_id, **r} for r in properties])


def log_model(tracker: TrialRun, store: SweepStore, spec: TrialSpec, trial_id: str) -> None:
    """The trained weights as a W&B model artifact, pointing at the sweep's models/ file."""
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
    """One attack run set, written as its own files (`<trial>.<attack>.parquet`): examples,
    curves and density first, the attacks rows last, so their presence marks it done."""
    trial_id = spec.trial_id()
    evaluation = evaluate_attack(spec, attack, trained.model, attacked, trial_id)
    density = attack_density(spec, trained.x_train, attacked, evaluation)
    part = attack.key
    store.write_rows("examples", trial_id, evaluation.examples, part)
    store.write_rows("curves", trial_id, evaluation.curves, part)
    store.write_rows("properties", trial_id, [{"trial_id": trial_id, **r} for r in density], part)
    store.write_rows("attacks", trial_id, evaluation.attacks, part)
    tracker.log_attack(attack.key, evaluation.attacks, evaluation.curves)
    if attack.defn.kind == "minimization":
        log_example_images(tracker, attack.key, attacked, evaluation.examples)


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
