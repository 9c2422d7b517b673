"""All-pairs transfer over a finished sweep: the paper's Tables 2 and 4, plus non-neural controls.

Every ok trial's adversarial examples (from the examples table) are fed to every ok trial's model
and to scikit-learn controls trained on the source's own training subset. Beside each set of
adversarial examples stand the paper's baselines: Gaussian noise with each example's own
per-pixel rms distortion, and the perturbation amplified to a chosen rms. Each target is one Ray
task that loads (or trains) its model once and evaluates every set, so the cost grows with the
number of models, not with pairs of model loads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from advlab.data import load_dataset, select_subset
from advlab.models import build_model
from advlab.spec import TransferSpec
from advlab.store import SweepStore

Predict = Callable[[np.ndarray], np.ndarray]  # (N, D) float32 in [0,1] -> (N,) labels


@dataclass
class EvalSet:
    """One row of the transfer matrix: inputs derived from one source trial's examples."""

    source_trial: str
    attack: str
    budget: float  # NaN for minimisation attacks
    kind: str  # adversarial, noise or amplified
    rms: float  # mean per-pixel rms of the perturbation actually applied
    x: np.ndarray  # (N, D) float32 in [0, 1]
    clean: np.ndarray  # (N, D) the same examples before any perturbation
    y: np.ndarray  # (N,) true labels


@dataclass
class TransferOutcome:
    rows: pd.DataFrame
    sources: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # trial id -> why it is not in
    seconds: float = 0.0


def amplify(
    clean: torch.Tensor, adversarial: torch.Tensor, rms: float | torch.Tensor, steps: int = 60
) -> torch.Tensor:
    """Rescale each perturbation so that, after clipping to [0,1], its per-pixel rms is `rms`
    (one number, or one per example).

    Clipping shrinks a perturbation, so the scale is found per example by bisection on the
    clipped result (the rms of clip(x + s*r) - x grows with s). An example whose clipped
    perturbation cannot reach `rms` (it saturates against the box) gets the largest it can.
    """
    delta = adversarial - clean
    size = delta.pow(2).mean(1).sqrt()
    rms = torch.as_tensor(rms, dtype=size.dtype).expand_as(size)
    hi = torch.where(size > 0, rms / size.clamp_min(1e-12), torch.zeros_like(size))
    lo = torch.zeros_like(hi)
    hi = hi * 4  # clipping only ever needs a larger scale than the unclipped one

    def clipped_rms(scale: torch.Tensor) -> torch.Tensor:
        moved = (clean + scale[:, None] * delta).clamp(0, 1)
        return (moved - clean).pow(2).mean(1).sqrt()

    for _ in range(steps):
        mid = (lo + hi) / 2
        short = clipped_rms(mid) < rms
        lo = torch.where(short, mid, lo)
        hi = torch.where(short, hi, mid)
    return (clean + hi[:, None] * delta).clamp(0, 1)


def gaussian_like(clean: torch.Tensor, rms: torch.Tensor, generator: torch.Generator):
    """Clean images plus Gaussian noise of each example's own stddev, clipped to [0,1]."""
    noise = torch.randn(clean.shape, generator=generator) * rms[:, None]
    return (clean + noise).clamp(0, 1)


def per_pixel_rms(x: np.ndarray, clean: np.ndarray) -> float:
    return float(np.sqrt(((x.astype(np.float64) - clean) ** 2).mean(1)).mean())


def build_eval_sets(
    trials: list[dict[str, Any]], examples: pd.DataFrame, settings: TransferSpec
) -> list[EvalSet]:
    """Adversarial, noise and amplified sets for every (source trial, attack, budget)."""
    generator = torch.Generator().manual_seed(settings.seed)
    sets = []
    for source in trials:
        rows = examples[examples["trial_id"] == source["trial_id"]]
        data = load_dataset(source["dataset.name"], _root(source))
        test = data.x_test.flatten(1).numpy()
        for (attack, budget), group in rows.groupby(["attack", "budget"], dropna=False, sort=True):
            group = group.sort_values("example")
            clean = test[group["dataset_index"].to_numpy()]  # fancy indexing: a copy
            x = np.stack(group["x_adv"].to_numpy()).astype(np.float32)  # a writable copy
            y = group["label"].to_numpy()
            common = {"source_trial": source["trial_id"], "attack": attack, "budget": budget}
            rms = per_pixel_rms(x, clean)
            sets.append(EvalSet(**common, kind="adversarial", rms=rms, x=x, clean=clean, y=y))
            clean_t, x_t = torch.tensor(clean), torch.tensor(x)
            if settings.noise:
                # Random directions scaled so each example's clipped noise has exactly the rms
                # of its own adversarial perturbation: the fair "same distortion" control.
                own = torch.tensor(group["dist_rms"].to_numpy(), dtype=torch.float32)
                direction = clean_t + torch.randn(clean_t.shape, generator=generator)
                noisy = amplify(clean_t, direction, own).numpy()
                rms = per_pixel_rms(noisy, clean)
                sets.append(EvalSet(**common, kind="noise", rms=rms, x=noisy, clean=clean, y=y))
            for target in settings.amplify_rms:
                moved = group["success"].to_numpy().copy()  # only real perturbations amplify
                if not moved.any():
                    continue
                big = amplify(clean_t[moved], x_t[moved], target).numpy()
                sets.append(
                    EvalSet(
                        **common,
                        kind=f"amplified@{target:g}",
                        rms=per_pixel_rms(big, clean[moved]),
                        x=big,
                        clean=clean[moved],
                        y=y[moved],
                    )
                )
    return sets


NOISE_SOURCE = "gaussian-noise"


def fixed_noise_sets(trials: list[dict[str, Any]], settings: TransferSpec) -> list[EvalSet]:
    """The paper's 'Gaussian noise, stddev s' rows: the first test images of the sweep's data
    set (as many as the trials attack) plus noise of a fixed stddev, clipped to [0,1]."""
    if not settings.noise_stddev or not trials:
        return []
    first = trials[0]
    data = load_dataset(first["dataset.name"], _root(first))
    count = max(int(t["attack_examples"]) for t in trials)
    clean = data.x_test[:count].flatten(1)
    y = data.y_test[:count].numpy()
    generator = torch.Generator().manual_seed(settings.seed)
    sets = []
    for stddev in settings.noise_stddev:
        noisy = gaussian_like(clean, torch.full((len(clean),), stddev), generator).numpy()
        sets.append(
            EvalSet(
                source_trial=NOISE_SOURCE,
                attack="gaussian",
                budget=stddev,
                kind="noise",
                rms=per_pixel_rms(noisy, clean.numpy()),
                x=noisy,
                clean=clean.numpy(),
                y=y,
            )
        )
    return sets


def evaluate(target: str, target_kind: str, predict: Predict, sets: list[EvalSet]) -> list[dict]:
    """Error of one target on every set, and on the same examples before perturbation."""
    rows = []
    for s in sets:
        rows.append(
            {
                "source_trial": s.source_trial,
                "attack": s.attack,
                "budget": s.budget,
                "kind": s.kind,
                "rms": s.rms,
                "target": target,
                "target_kind": target_kind,
                "n": len(s.y),
                "error_adv": float((predict(s.x) != s.y).mean()) if len(s.y) else math.nan,
                "error_clean": float((predict(s.clean) != s.y).mean()) if len(s.y) else math.nan,
            }
        )
    return rows


def trial_predictor(store: SweepStore, trial: dict[str, Any]) -> Predict:
    """The trained model of a trial, loaded once from the sweep's models/ folder."""
    data = load_dataset(trial["dataset.name"], _root(trial))
    model = build_model(trial["model"], data.input_shape, data.num_classes, trial["activation"])
    saved = store.load_model(trial["training_key"])
    if saved is None:
        raise FileNotFoundError(f"no saved model for trial {trial['trial_id']}")
    model.load_state_dict(saved["model"])
    model.eval()
    shape = data.input_shape

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(x).float().view(len(x), *shape)
        return model(inputs).argmax(1).numpy()

    return predict


def make_control(name: str, seed: int) -> Any:
    """A scikit-learn classifier by name; imported lazily (only transfer needs sklearn)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC, LinearSVC

    factories = {
        "logistic": lambda: LogisticRegression(max_iter=200),
        "linear_svm": lambda: LinearSVC(C=0.1, random_state=seed),
        "rbf_svm": lambda: SVC(kernel="rbf", gamma="scale", random_state=seed),
        "random_forest": lambda: RandomForestClassifier(n_estimators=100, random_state=seed),
        "knn": lambda: KNeighborsClassifier(n_neighbors=5),
        "constant": lambda: DummyClassifier(strategy="most_frequent"),
    }
    return factories[name]()


def control_predictor(name: str, training: dict[str, Any], settings: TransferSpec) -> Predict:
    """A control trained on one training subset (the same images its sources trained on)."""
    data = load_dataset(training["dataset.name"], _root(training))
    split = select_subset(data, training["subset"], training["dataset.split_seed"])
    x = data.x_train[split.train_idx].flatten(1).numpy()
    y = data.y_train[split.train_idx].numpy()
    if name == "rbf_svm" and len(x) > settings.control_max_train:  # kernel SVMs scale as n^2
        keep = np.random.default_rng(settings.seed).permutation(len(x))
        x, y = x[keep[: settings.control_max_train]], y[keep[: settings.control_max_train]]
    model = make_control(name, settings.seed).fit(x, y)
    return model.predict


TRAINING_SET = ["dataset.name", "dataset.root", "subset", "dataset.split_seed"]


def _root(config: dict[str, Any]) -> str | None:
    """dataset.root as a path or None (parquet and pandas hand back a missing one as NaN)."""
    root = config.get("dataset.root")
    return root if isinstance(root, str) else None


def run_transfer(
    sweep_dir: str, settings: TransferSpec | None = None, wandb_mode: str | None = None
) -> TransferOutcome:
    """Transfer every ok trial's examples to every ok trial and control; writes transfer/."""
    import ray

    start = time.perf_counter()
    store = SweepStore.from_dir(sweep_dir)
    if settings is None:
        recorded = (store.read_json("sweep.json") or {}).get("transfer", {})
        settings = TransferSpec.model_validate(recorded)
    trials = store.read("trials")
    if trials.empty:
        raise FileNotFoundError(f"{store.uri}: no trials to transfer between; run the sweep first")
    expected = (store.read_json("sweep.json") or {}).get("trial_ids", list(trials["trial_id"]))
    ok = trials[trials["status"] == "ok"]
    failed = trials[trials["status"] != "ok"]
    skipped = {t: f"failed: {r}" for t, r in zip(failed["trial_id"], failed["reason"], strict=True)}
    skipped |= {t: "no result" for t in expected if t not in set(trials["trial_id"])}
    examples = store.read("examples")
    examples = examples[examples["trial_id"].isin(set(ok["trial_id"]))]
    records = ok.to_dict("records")
    sets = build_eval_sets(records, examples, settings) + fixed_noise_sets(records, settings)
    sets_ref = ray.put(sets)

    @ray.remote(num_cpus=1)
    def trial_task(trial: dict[str, Any], sets: list[EvalSet]) -> list[dict]:
        torch.set_num_threads(1)
        return evaluate(trial["trial_id"], "trial", trial_predictor(store, trial), sets)

    @ray.remote(num_cpus=1)
    def control_task(name: str, training: dict[str, Any], sets: list[EvalSet]) -> list[dict]:
        torch.set_num_threads(1)
        sources = set(training["sources"])
        mine = [s for s in sets if s.source_trial in sources]
        return evaluate(name, "control", control_predictor(name, training, settings), mine)

    futures = [trial_task.remote(row, sets_ref) for row in ok.to_dict("records")]
    groups = ok.groupby(TRAINING_SET, dropna=False)
    for number, (training, group) in enumerate(groups):
        sources = list(group["trial_id"]) + ([NOISE_SOURCE] if number == 0 else [])
        spec = dict(zip(TRAINING_SET, training, strict=True)) | {"sources": sources}
        futures += [control_task.remote(name, spec, sets_ref) for name in settings.controls]
    rows = [row for result in ray.get(futures) for row in result]
    frame = pd.DataFrame(rows)
    store.write_rows("transfer", "all", rows)
    store.write_json("transfer.json", {"sources": list(ok["trial_id"]), "skipped": skipped})
    log_to_wandb(store, frame, wandb_mode)
    return TransferOutcome(frame, list(ok["trial_id"]), skipped, time.perf_counter() - start)


def transfer_matrices(frame: pd.DataFrame) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Per attack (and budget): sources x targets error on adversarial examples."""
    matrices = {}
    adversarial = frame[frame["kind"] == "adversarial"]
    for (attack, budget), group in adversarial.groupby(["attack", "budget"], dropna=False):
        table = group.pivot_table(index="source_trial", columns="target", values="error_adv")
        name = attack if pd.isna(budget) else f"{attack}@{budget:g}"
        matrices[name] = (list(table.index), list(table.columns), table.to_numpy())
    return matrices


def log_to_wandb(store: SweepStore, frame: pd.DataFrame, mode: str | None) -> None:
    """The transfer table and heatmaps as one run in the sweep's W&B group."""
    from advlab.track import log_transfer_run, reachable_mode, resolve_mode

    recorded = (store.read_json("sweep.json") or {}).get("wandb", {})
    if mode is None:
        mode, _ = reachable_mode(resolve_mode(recorded.get("mode", "auto")))
    log_transfer_run(
        mode=mode,
        project=recorded.get("project", "advlab"),
        entity=recorded.get("entity"),
        group=store.sweep,
        directory=store.local_path() or "/tmp/advlab-wandb",
        rows=frame.to_dict("records"),
        matrices=transfer_matrices(frame),
    )
