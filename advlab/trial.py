"""One trial, the unit of work: data -> model -> train -> attacks -> measures -> parquet + W&B.

Plain Python with no Ray import, so it runs and tests in a bare process; sweep.py wraps it.
"""

from __future__ import annotations

import json
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
from advlab.attacks import (
    AttackResult,
    carlini_wagner,
    deepfool,
    fgsm,
    gaussian_noise,
    lbfgs_attack,
    pgd,
)
from advlab.data import Dataset, load_dataset, select_subset
from advlab.measure import distortions, success_at_budgets
from advlab.models import build_model
from advlab.properties import density_rows, lipschitz_rows, unit_analysis
from advlab.spec import MINIMISATION_ATTACKS, AttackSpec, TrialSpec
from advlab.store import SweepStore
from advlab.track import TrialRun
from advlab.train import EpochStats, error_rate, predict, train_model

# report(metrics, state): state is None for the final report, and after each epoch a function
# that builds a resumable training checkpoint (called only by reporters that keep checkpoints).
Reporter = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


@dataclass(frozen=True)
class TrialContext:
    """Where a trial's results go; nothing here changes its numbers."""

    sweep: str
    storage: str  # absolute path or URI
    trial_index: int = 0
    grid_values: dict[str, Any] = field(default_factory=dict)
    wandb_mode: str = "disabled"  # already resolved: online, offline or disabled
    wandb_project: str = "advlab"
    wandb_entity: str | None = None
    worker_node: str = ""  # where it ran (a Ray node id under a sweep), for the record


@dataclass
class AttackedSet:
    """The first N correctly classified test examples and how many were scanned to find them."""

    x: Tensor
    y: Tensor
    dataset_index: Tensor
    scanned: int
    wrong: int


def run_trial(
    spec: TrialSpec,
    ctx: TrialContext,
    report: Reporter | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one trial and write its results; returns its trials-table row.

    `resume` is a training checkpoint from an earlier attempt (see Reporter). A failure is
    recorded (status failed, with the reason) in the trials table and the W&B run before the
    exception propagates, so the sweep can carry on and report the gap.
    """
    trial_id = spec.trial_id()
    store = SweepStore(ctx.storage, ctx.sweep)
    tracker = TrialRun(
        mode=ctx.wandb_mode,
        project=ctx.wandb_project,
        entity=ctx.wandb_entity,
        group=ctx.sweep,
        run_id=f"{ctx.sweep}-{trial_id}",
        name=trial_id,
        config={"trial_id": trial_id, **ctx.grid_values, **spec.model_dump(mode="json")},
        directory=store.local_path() or "/tmp/advlab-wandb",
    )
    row = base_row(spec, ctx, trial_id)
    try:
        summary = _run(spec, trial_id, store, tracker, report, resume)
    except Exception as err:
        row |= {"status": "failed", "reason": f"{type(err).__name__}: {err}".splitlines()[0]}
        store.write_rows("trials", trial_id, [row])
        tracker.log_summary({"status": "failed", "reason": row["reason"]})
        tracker.finish(failed=True)
        err.add_note(traceback.format_exc(limit=3))
        raise
    row |= summary
    store.write_rows("trials", trial_id, [row])  # last: marks the trial complete
    tracker.log_summary({k: v for k, v in summary.items() if _is_number(v)})
    tracker.finish()
    return row


def _run(
    spec: TrialSpec,
    trial_id: str,
    store: SweepStore,
    tracker: TrialRun,
    report: Reporter | None,
    resume: dict[str, Any] | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    device = pick_device(spec.device)
    data = load_dataset(spec.dataset.name, spec.dataset.root)
    split = select_subset(data, spec.subset, spec.dataset.split_seed)
    x_train = data.x_train[split.train_idx].to(device)
    y_train = data.y_train[split.train_idx].to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)

    model = build_model(spec.model, data.input_shape, data.num_classes, spec.activation).to(device)

    def on_epoch(stats: EpochStats, state: Callable[[], dict[str, Any]] | None) -> None:
        metrics = asdict(stats)
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"training loss is {stats.loss} at epoch {stats.epoch}; lower train.lr or "
                "weight_decay"
            )
        tracker.log_epoch(metrics)
        if report is not None:
            report(metrics, state)

    # Trials that differ only in evaluation settings share one trained model: the first to get
    # the lock trains and saves it, the others load it.
    key = spec.training_key()
    with store.lock(key):
        cached = store.load_model(key)
        if cached is None:
            history = train_model(
                model,
                x_train,
                y_train,
                x_test,
                y_test,
                spec.train,
                spec.weight_decay,
                spec.seed,
                on_epoch,
                resume,
            )
            store.save_model(
                key, {"model": model.state_dict(), "history": [asdict(h) for h in history]}
            )
        else:
            model.load_state_dict(cached["model"])
            model.eval()
            history = [EpochStats(**row) for row in cached["history"]]
            for stats in history:
                on_epoch(stats, None)
    store.write_rows("epochs", trial_id, [{"trial_id": trial_id, **asdict(s)} for s in history])
    trained = time.perf_counter()

    summary: dict[str, Any] = {
        "status": "ok",
        "reason": "",
        "training_key": key,
        "train_adv_grad_evals": history[-1].adv_grad_evals if history else 0,
        "trained_here": cached is None,  # False: loaded from models/, trained by a twin trial
        "n_train": len(x_train),
        "train_error": error_rate(model, x_train, y_train),
        "test_error": error_rate(model, x_test, y_test),
        "heldout_error": heldout_error(model, data, split.heldout_idx),
    }
    attacked = first_correct(model, x_test, y_test, spec.attack_examples)
    summary["n_attacked"] = len(attacked.y)
    example_rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    for attack in spec.attacks:
        examples, curves, attack_summary = run_attack(spec, attack, model, attacked, trial_id)
        example_rows += examples
        curve_rows += curves
        summary |= attack_summary
    property_rows = measure_properties(spec, model, data, x_train, attacked, example_rows, store)
    summary |= {
        f"{r['analysis']}/{r['metric']}": r["value"]
        for r in property_rows
        if r["layer"] == "network" or r["analysis"] == "unit_analysis"
    }
    store.write_rows("properties", trial_id, [{"trial_id": trial_id, **r} for r in property_rows])
    store.write_rows("examples", trial_id, example_rows)
    store.write_rows("curves", trial_id, curve_rows)
    tracker.log_curves(curve_rows)
    tracker.log_attack_table(summary)
    log_example_images(tracker, spec, attacked, example_rows, data.input_shape)
    summary |= {
        "train_seconds": trained - start,
        "attack_seconds": time.perf_counter() - trained,
        "device": str(device),
    }
    return summary


def measure_properties(
    spec: TrialSpec,
    model: nn.Module,
    data: Dataset,
    x_train: Tensor,
    attacked: AttackedSet,
    example_rows: list[dict[str, Any]],
    store: SweepStore,
) -> list[dict[str, Any]]:
    """Lipschitz bounds, unit analysis and adversarial-example density, as switched on."""
    settings = spec.properties
    rows: list[dict[str, Any]] = []
    if settings.lipschitz:
        rows += lipschitz_rows(model, data.input_shape)
    if settings.unit_analysis:
        folder = store.local_path("units", spec.trial_id())
        rows += unit_analysis(
            model,
            data.x_test.to(x_train.device),
            data.y_test.to(x_train.device),
            units=settings.units,
            top_k=settings.top_k,
            seed=spec.seed,
            out_dir=folder,
        )
    if settings.density:
        adversarial: dict[str, list[np.ndarray]] = {}
        for r in example_rows:
            name = r["attack"] if math.isnan(r["budget"]) else f"{r['attack']}@{r['budget']:g}"
            adversarial.setdefault(name, []).append(r["x_adv"])
        shape = (-1, *data.input_shape)
        tensors = {k: torch.from_numpy(np.stack(v)).view(shape) for k, v in adversarial.items()}
        rows += density_rows(
            x_train.cpu(), attacked.x.cpu(), tensors, k=settings.density_k, seed=spec.seed
        )
    return rows


def base_row(spec: TrialSpec, ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    """Ids, the flattened config (lists as JSON) and versions: the columns every row has."""
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "trial_index": ctx.trial_index,
        "sweep": ctx.sweep,
        "worker_node": ctx.worker_node,
    }
    row |= flatten(spec.model_dump(mode="json"))
    row |= {
        "advlab_version": advlab.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    return row


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list):
            flat[name] = json.dumps(value, sort_keys=True)
        else:
            flat[name] = value
    return flat


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no GPU is visible; use device: auto or cpu")
    return torch.device(requested)


def heldout_error(model: nn.Module, data: Dataset, heldout_idx: Tensor) -> float:
    """Error on the training examples this trial did not train on (P2 for a P1 model)."""
    return error_rate(model, data.x_train[heldout_idx], data.y_train[heldout_idx])


def first_correct(model: nn.Module, x: Tensor, y: Tensor, n: int) -> AttackedSet:
    """The first n test examples, in test-set order, that the model classifies correctly."""
    correct = predict(model, x) == y
    index = torch.nonzero(correct).flatten()[:n]
    scanned = int(index[-1]) + 1 if len(index) == n else len(y)
    return AttackedSet(
        x=x[index],
        y=y[index],
        dataset_index=index.cpu(),
        scanned=scanned,
        wrong=scanned - int(correct[:scanned].sum()),
    )


def run_attack(
    spec: TrialSpec, attack: AttackSpec, model: nn.Module, attacked: AttackedSet, trial_id: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Examples rows, curve rows and summary columns for one attack at all its budgets."""
    budgets = spec.budgets(attack)
    key = attack.key
    examples: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    if attack.name in MINIMISATION_ATTACKS:
        result = attack_once(attack, model, attacked, spec.seed)
        dist = distortions(attacked.x, result.x_adv)
        examples += example_rows(trial_id, key, math.nan, attacked, result, dist)
        hits = success_at_budgets(result.success, dist[attack.budget_norm], budgets)
        for eps, hit in zip(budgets, hits, strict=True):
            curves.append(curve_row(trial_id, key, attack.budget_norm, eps, hit, attacked))
        ok = result.success
        summary[f"{key}/success_rate"] = float(ok.float().mean())
        for norm, values in dist.items():
            summary[f"{key}/mean_dist_{norm}"] = float(values[ok].mean()) if ok.any() else math.nan
        summary[f"{key}/grad_evals"] = float(result.grad_evals.float().mean())
    else:
        for eps in budgets:
            result = attack_once(attack, model, attacked, spec.seed, eps)
            dist = distortions(attacked.x, result.x_adv)
            examples += example_rows(trial_id, key, eps, attacked, result, dist)
            curves.append(
                curve_row(trial_id, key, attack.budget_norm, eps, result.success, attacked)
            )
    for row in curves:
        summary[f"{key}/success@{row['budget']:g}"] = row["success_rate"]
        summary[f"{key}/robust_error@{row['budget']:g}"] = row["robust_error"]
    return examples, curves, summary


def attack_once(
    attack: AttackSpec, model: nn.Module, attacked: AttackedSet, seed: int, eps: float = math.nan
) -> AttackResult:
    """Run one attack (at one budget, for fixed-budget attacks), seeded by the trial."""
    x, y, target = attacked.x, attacked.y, attack.target_mode
    generator = torch.Generator().manual_seed(seed)
    search = {} if attack.search_steps is None else {"search_steps": attack.search_steps}
    steps = {} if attack.steps is None else {"steps": attack.steps}
    if attack.name == "lbfgs":
        return lbfgs_attack(
            model,
            x,
            y,
            target,
            generator=generator,
            loss=attack.loss,
            max_iter=attack.max_iter,
            candidates=attack.candidates,
            **search,
        )
    if attack.name == "deepfool":
        return deepfool(
            model, x, y, target, generator=generator, candidates=attack.candidates, **steps
        )
    if attack.name == "cw":
        return carlini_wagner(
            model,
            x,
            y,
            target,
            generator=generator,
            candidates=attack.candidates,
            **steps,
            **search,
        )
    if attack.name == "fgsm":
        return fgsm(model, x, y, eps, target=target, generator=generator)
    if attack.name == "pgd":
        return pgd(
            model,
            x,
            y,
            eps,
            norm=attack.norm or "linf",
            restarts=attack.restarts,
            target=target,
            generator=generator,
            **steps,
        )
    return gaussian_noise(model, x, y, eps, generator=generator)


def curve_row(
    trial_id: str, attack: str, norm: str, eps: float, hit: Tensor, attacked: AttackedSet
) -> dict[str, Any]:
    n = len(hit)
    successes = int(hit.sum())
    return {
        "trial_id": trial_id,
        "attack": attack,
        "norm": norm,
        "budget": eps,
        "n": n,
        "success_rate": successes / n if n else math.nan,
        "robust_error": (attacked.wrong + successes) / attacked.scanned,
    }


def example_rows(
    trial_id: str,
    attack: str,
    budget: float,
    attacked: AttackedSet,
    result: AttackResult,
    dist: dict[str, Tensor],
) -> list[dict[str, Any]]:
    columns = {
        "dataset_index": attacked.dataset_index,
        "label": attacked.y,
        "target": result.target,
        "adv_pred": result.adv_pred,
        "success": result.success,
        "dist_rms": dist["rms"],
        "dist_l2": dist["l2"],
        "dist_linf": dist["linf"],
        "grad_evals": result.grad_evals,
    }
    lists = {name: values.cpu().tolist() for name, values in columns.items()}
    images = result.x_adv.detach().flatten(1).float().cpu().numpy()
    return [
        {
            "trial_id": trial_id,
            "attack": attack,
            "budget": budget,
            "example": i,
            "clean_pred": lists["label"][i],  # attacked examples are all classified correctly
            **{name: values[i] for name, values in lists.items()},
            "x_adv": images[i],
        }
        for i in range(len(attacked.y))
    ]


def log_example_images(
    tracker: TrialRun,
    spec: TrialSpec,
    attacked: AttackedSet,
    rows: list[dict[str, Any]],
    shape: tuple[int, int, int],
    count: int = 8,
) -> None:
    """The first successful examples of each minimisation attack, for the W&B run."""
    for attack in spec.attacks:
        if attack.name not in MINIMISATION_ATTACKS:
            continue
        chosen = [r for r in rows if r["attack"] == attack.key and r["success"]][:count]
        if not chosen:
            continue
        clean = attacked.x[[r["example"] for r in chosen]].cpu().numpy()
        adversarial = np.stack([r["x_adv"] for r in chosen]).reshape(len(chosen), *shape)
        captions = [f"{r['label']}->{r['adv_pred']} rms {r['dist_rms']:.3f}" for r in chosen]
        tracker.log_examples(attack.key, clean, adversarial, captions)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
