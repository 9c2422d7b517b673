"""One trial, the unit of work, in three steps: train (or load), evaluate, write the results.

Plain Python with no Ray import, so it runs and tests in a bare process; sweep.py wraps it.
"""

from __future__ import annotations

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
from advlab.data import Dataset, load_dataset, select_subset
from advlab.evaluate import (
    AttackedSet,
    Evaluation,
    evaluate_attacks,
    evaluate_properties,
    first_correct,
)
from advlab.masking import attack_plan
from advlab.models import build_model
from advlab.robust_validation import carve_validation, evaluated_epoch
from advlab.runtime import error_rate, pick_device
from advlab.spec import TrialSpec
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
    x_train: Tensor
    y_train: Tensor
    heldout_idx: Tensor
    history: list[EpochStats]
    trained_here: bool
    seconds: float
    n_validation: int = 0  # training-subset examples held out for robust validation
    evaluated_epoch: int | None = None  # whose weights the model holds (best or last)


def run_trial(
    spec: TrialSpec,
    ctx: TrialContext,
    report: Reporter | None = None,
    resume: dict[str, Any] | None = None,
) -> TrialResult:
    """Run one trial and write its results; returns its trials-table row and metrics.

    `resume` is a training checkpoint from an earlier attempt (see Reporter). A failure is
    recorded (status failed, with the reason) in the trials table and the W&B run before the
    exception propagates, so the sweep can carry on and report the gap.
    """
    trial_id = spec.trial_id()
    store = SweepStore(ctx.storage, ctx.sweep)
    tracker = open_tracker(spec, ctx, store, trial_id)
    row = trial_head(spec, ctx, trial_id)
    try:
        trained = train_or_load(spec, ctx, store, tracker, report, resume)
        start = time.perf_counter()
        attacked, evaluation = evaluate(spec, trained, store, trial_id)
        row |= summary_columns(spec, trained, attacked)
        row |= {
            "gradient_masking": evaluation.gradient_masking,
            "masking_reason": evaluation.masking_reason,
        }
        row["attack_seconds"] = time.perf_counter() - start
        write_results(store, tracker, spec, trial_id, trained, attacked, evaluation)
    except Exception as err:
        row |= {"status": "failed", "reason": f"{type(err).__name__}: {err}".splitlines()[0]}
        store.write_rows("trials", trial_id, [row])
        tracker.log_summary({"status": "failed", "reason": row["reason"]})
        tracker.finish(failed=True)
        err.add_note(traceback.format_exc(limit=3))
        raise
    store.write_rows("trials", trial_id, [row])  # last: marks the trial complete
    metrics = evaluation.metrics()
    tracker.log_summary(_numbers(row) | metrics)
    if evaluation.gradient_masking:
        tracker.flag_masking(evaluation.masking_reason or "")
    tracker.finish()
    return TrialResult(row, metrics)


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
        "spec": spec.model_dump_json(),
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
    data = load_dataset(spec.dataset.name, spec.dataset.root)
    split = select_subset(data, spec.subset, spec.dataset.split_seed)
    fit, held = carve_validation(
        len(split.train_idx), spec.train.validation.fraction, spec.dataset.split_seed
    )
    x_train = data.x_train[split.train_idx[fit]].to(device)
    y_train = data.y_train[split.train_idx[fit]].to(device)
    val_idx = split.train_idx[held]
    validation = (data.x_train[val_idx].to(device), data.y_train[val_idx].to(device))
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.activation).to(device)

    def on_epoch(stats: EpochStats, state: Callable[[], dict[str, Any]] | None) -> None:
        check_training(stats)
        tracker.log_epoch(asdict(stats))
        if report is not None:
            report(asdict(stats), state)

    key = spec.training_key()
    with store.lock(key):
        cached = store.load_model(key)
        if cached is not None and ctx.run_stamp and cached.get("run") != ctx.run_stamp:
            cached = None  # --fresh: trained before this run, so train again
        if cached is None:
            history = train_model(
                model, x_train, y_train, data.x_test.to(device), data.y_test.to(device),
                spec.train, spec.weight_decay, spec.seed, on_epoch, resume,
                validation if len(val_idx) else None,
            )  # fmt: skip
            history_rows = [asdict(h) for h in history]
            store.save_model(
                key, {"model": model.state_dict(), "history": history_rows, "run": ctx.run_stamp}
            )
        else:
            model.load_state_dict(cached["model"])
            history = [EpochStats(**row) for row in cached["history"]]
            for stats in history:
                on_epoch(stats, None)
    model.eval()
    seconds = time.perf_counter() - start
    return Trained(
        model, data, x_train, y_train, split.heldout_idx, history, cached is None, seconds,
        len(val_idx), evaluated_epoch([asdict(h) for h in history], spec.train),
    )  # fmt: skip


def check_training(stats: EpochStats) -> None:
    """A NaN or infinite loss ends the trial as failed, with the fix in the reason."""
    if not math.isfinite(stats.loss):
        raise FloatingPointError(
            f"training loss is {stats.loss} at epoch {stats.epoch}; lower train.lr or weight_decay"
        )


# --------------------------------------------------------------------------- step 2: evaluate


def evaluate(
    spec: TrialSpec, trained: Trained, store: SweepStore, trial_id: str
) -> tuple[AttackedSet, Evaluation]:
    """Attack the first correctly classified test examples, then measure the properties."""
    device = trained.x_train.device
    x_test, y_test = trained.data.x_test.to(device), trained.data.y_test.to(device)
    attacked = first_correct(trained.model, x_test, y_test, spec.attack_examples)
    evaluation = evaluate_attacks(spec, trained.model, attacked, trial_id)
    evaluation.properties = evaluate_properties(
        spec, trained.model, trained.data, trained.x_train, attacked, evaluation,
        store.units_dir(trial_id) if spec.properties.unit_analysis else None,
    )  # fmt: skip
    return attacked, evaluation


def summary_columns(spec: TrialSpec, trained: Trained, attacked: AttackedSet) -> dict[str, Any]:
    """The trials row's results: clean errors, the attacked set, training cost, device."""
    model, data, history = trained.model, trained.data, trained.history
    return {
        "trained_here": trained.trained_here,
        "n_train": len(trained.x_train),
        "train_error": error_rate(model, trained.x_train, trained.y_train),
        "test_error": error_rate(model, data.x_test, data.y_test),
        "heldout_error": error_rate(
            model, data.x_train[trained.heldout_idx], data.y_train[trained.heldout_idx]
        ),
        "n_attacked": len(attacked.y),
        "n_scanned": attacked.n_scanned,
        "n_clean_wrong": attacked.n_clean_wrong,
        "train_adv_grad_evals": history[-1].adv_grad_evals if history else 0,
        "n_validation": trained.n_validation,
        "evaluated_epoch": trained.evaluated_epoch,
        "val_robust_error": _value_at(history, trained.evaluated_epoch, "val_robust_error"),
        "train_seconds": trained.seconds,
        "device_used": str(trained.x_train.device),
    }


# --------------------------------------------------------------------------- step 3: write


def write_results(
    store: SweepStore,
    tracker: TrialRun,
    spec: TrialSpec,
    trial_id: str,
    trained: Trained,
    attacked: AttackedSet,
    evaluation: Evaluation,
) -> None:
    """Every table but trials (written last, by run_trial), then the W&B run's tables."""
    epochs = [{"trial_id": trial_id, **_nan_to_null(asdict(s))} for s in trained.history]
    store.write_rows("epochs", trial_id, epochs)
    store.write_rows(
        "properties", trial_id, [{"trial_id": trial_id, **r} for r in evaluation.properties]
    )
    store.write_rows("examples", trial_id, evaluation.examples)
    store.write_rows("attacks", trial_id, evaluation.attacks)
    store.write_rows("curves", trial_id, evaluation.curves)
    tracker.log_curves(evaluation.curves)
    tracker.log_attacks(evaluation.attacks)
    log_example_images(tracker, spec, attacked, evaluation.examples, trained.data.input_shape)


def log_example_images(
    tracker: TrialRun,
    spec: TrialSpec,
    attacked: AttackedSet,
    rows: list[dict[str, Any]],
    shape: tuple[int, int, int],
    count: int = 8,
) -> None:
    """The first successful examples of each minimisation attack, for the W&B run."""
    for attack in attack_plan(spec):
        if attack.defn.kind != "minimization":
            continue
        chosen = [r for r in rows if r["attack"] == attack.key and r["success"]][:count]
        if not chosen:
            continue
        clean = attacked.x[[r["example"] for r in chosen]].cpu().numpy()
        adversarial = np.stack([r["x_adv"] for r in chosen]).reshape(len(chosen), *shape)
        captions = [f"{r['label']}->{r['adv_pred']} rms {r['dist_rms']:.3f}" for r in chosen]
        tracker.log_examples(attack.key, clean, adversarial, captions)


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
