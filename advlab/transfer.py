"""All-pairs transfer over a finished sweep: the paper's Tables 2 and 4, plus non-neural controls.

Every ok trial's adversarial examples (from the examples table) are fed to every ok trial's model
of the same data set (a sweep may hold several) and to scikit-learn controls trained on the
source's own training subset. Beside each set of
adversarial examples stand the paper's baselines: Gaussian noise with each example's own
per-pixel rms distortion, and the perturbation amplified to a chosen rms (the paper's Table 4:
"distortion magnified" to a stddev, so that transfer is compared at a distortion at least that
large; amplification only enlarges, so an example whose perturbation is already larger keeps
it, and the amplified row never transfers less for being shrunk). Each target is one Ray
task that loads (or trains) its model once and evaluates every set, so the cost grows with the
number of models, not with pairs of model loads.

Failures stay local: a source whose examples cannot be read is skipped with its reason, and a
target that cannot be loaded or fitted leaves one `failed` row with its reason; every other
pair is still measured and written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from advlab import manifest, text
from advlab.attacks.noise import add_noise, amplify, matched_noise
from advlab.data import select_subset
from advlab.families import FitJob, ModelRequest, TrialModel, model_for, resolve
from advlab.sources import attacked_split, load_data_spec
from advlab.spec import TrialSpec
from advlab.store import TRANSFER_RECORD, SweepStore
from advlab.sweep_settings import TransferSpec
from advlab.sweepfile import add_plugin_dirs
from advlab.tables import NOISE_SOURCE, Status

Predict = Callable[[np.ndarray], np.ndarray]  # (N, D) float32 in [0,1] -> (N,) labels


@dataclass
class EvalSet:
    """One row of the transfer matrix: inputs derived from one source trial's examples."""

    source_trial: str
    attack: str
    budget: float | None  # None for minimisation attacks
    kind: str  # adversarial, noise or amplified
    rms: float  # mean per-pixel rms of the perturbation actually applied
    x: np.ndarray  # (N, D) float32 in [0, 1]
    clean: np.ndarray  # (N, D) the same examples before any perturbation
    y: np.ndarray  # (N,) true labels
    amplified_to: float | None = None  # amplified sets: the per-pixel rms aimed at
    data: str = ""  # the data set its images come from (`data_of`): targets of that data only


@dataclass
class TransferOutcome:
    rows: pd.DataFrame
    sources: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # trial id -> why it is not in
    failed_targets: dict[str, str] = field(default_factory=dict)  # target -> reason
    seconds: float = 0.0


def per_pixel_rms(x: np.ndarray, clean: np.ndarray) -> float:
    return float(np.sqrt(((x.astype(np.float64) - clean) ** 2).mean(1)).mean())


def source_sets(
    trial_id: str, spec: TrialSpec, rows: pd.DataFrame, settings: TransferSpec, gen: torch.Generator
) -> list[EvalSet]:
    """Adversarial, noise and amplified sets for every (attack, budget) of one source trial."""
    images = attacked_split(spec.dataset, spec.attack_split)[0]
    sets = []
    for (attack, budget), group in rows.groupby(["attack", "budget"], dropna=False, sort=True):
        group = group.sort_values("example")
        # a copy of the rows (a streaming set reads just these: `.to` reads a view's rows)
        index = torch.as_tensor(group["dataset_index"].to_numpy())
        clean = images[index].to("cpu").flatten(1).numpy()
        x = np.stack(group["x_adv"].to_numpy()).astype(np.float32)  # a writable copy
        y = group["label"].to_numpy()
        common = {
            "source_trial": trial_id,
            "attack": attack,
            "budget": None if pd.isna(budget) else float(budget),
            "clean": clean,
            "data": data_of(spec),
        }
        sets.append(EvalSet(**common, kind="adversarial", rms=per_pixel_rms(x, clean), x=x, y=y))
        clean_t, x_t = torch.tensor(clean), torch.tensor(x)
        if settings.noise:
            own = torch.tensor(group["dist_rms"].to_numpy(), dtype=torch.float32)
            noisy = matched_noise(clean_t, own, gen).numpy()
            sets.append(
                EvalSet(**common, kind="noise", rms=per_pixel_rms(noisy, clean), x=noisy, y=y)
            )
        moved = group["success"].to_numpy().copy()  # only real perturbations amplify
        own_rms = torch.tensor(group["dist_rms"].to_numpy()[moved], dtype=torch.float32)
        for target in settings.amplify_rms if moved.any() else []:
            # upward only: a perturbation already above the target keeps its size
            goal = torch.clamp(own_rms, min=target)
            big = amplify(clean_t[moved], x_t[moved], goal).numpy()
            common |= {"clean": clean[moved]}
            rms = per_pixel_rms(big, clean[moved])
            sets.append(
                EvalSet(**common, kind="amplified", rms=rms, x=big, y=y[moved], amplified_to=target)
            )
    return sets


def fixed_noise_sets(specs: list[TrialSpec], settings: TransferSpec) -> list[EvalSet]:
    """The paper's 'Gaussian noise, stddev s' rows: the first images of the split the sweep's
    trials attack (as many as they attack) plus noise of a fixed stddev, clipped to [0,1].
    One set serves the whole sweep, so its data set and split are the first trial's."""
    if not settings.noise_stddev or not specs:
        return []
    images, labels = attacked_split(specs[0].dataset, specs[0].attack_split)
    count = max(s.attack_examples for s in specs)
    clean = images[:count].to("cpu").flatten(1)
    y = labels[:count].numpy()
    generator = torch.Generator().manual_seed(settings.seed)
    sets = []
    for stddev in settings.noise_stddev:
        noisy = add_noise(clean, torch.full((len(clean),), stddev), generator).numpy()
        sets.append(
            EvalSet(
                source_trial=NOISE_SOURCE, attack="gaussian", budget=stddev, kind="noise",
                rms=per_pixel_rms(noisy, clean.numpy()), x=noisy, clean=clean.numpy(), y=y,
                data=data_of(specs[0]),
            )
        )  # fmt: skip
    return sets


def data_of(spec: TrialSpec) -> str:
    """The data set a trial reads, as its images and labels are (normalisation lives inside
    the model): a model is a transfer target only of examples made on its own data set, since
    other images differ in shape or in what their labels mean."""
    return json.dumps(spec.dataset.model_dump(mode="json", exclude={"normalize"}), sort_keys=True)


def evaluate(target: str, target_kind: str, predict: Predict, sets: list[EvalSet]) -> list[dict]:
    """Error of one target on every set, and on the same examples before perturbation."""
    rows = []
    for s in sets:
        n = len(s.y)
        rows.append(
            {
                "source_trial": s.source_trial,
                "attack": s.attack,
                "budget": s.budget,
                "kind": s.kind,
                "amplified_to": s.amplified_to,
                "rms": s.rms,
                "target": target,
                "target_kind": target_kind,
                "n": n,
                "error_adv": float((predict(s.x) != s.y).mean()) if n else math.nan,
                "error_clean": float((predict(s.clean) != s.y).mean()) if n else math.nan,
                "status": Status.OK,
                "reason": "",
            }
        )
    return rows


def failed_target(target: str, target_kind: str, err: Exception) -> list[dict]:
    reason = f"{type(err).__name__}: {err}".splitlines()[0]
    return [
        {"target": target, "target_kind": target_kind, "status": Status.FAILED, "reason": reason}
    ]


def trial_predictor(store: SweepStore, spec: TrialSpec, key: str | None = None) -> Predict:
    """A trial's trained model, loaded once from the storage root's model store: the one its row
    names (`key`, the training key it trained or loaded), else its spec's key now."""
    data = load_data_spec(spec.dataset)
    model = model_for(spec, data.input_shape, data.num_classes)
    key = key or spec.training_key()
    saved = store.load_model(key)
    if saved is None:
        raise FileNotFoundError(f"no saved model {key}; rerun the sweep")
    model.load_state(saved)
    return _predictor(model, data.input_shape)


def control_predictor(name: str, spec: TrialSpec, settings: TransferSpec) -> Predict:
    """A control (a prediction-only model family) trained on a trial's training subset, the
    images its sources trained on; families that subsample by default (the RBF SVM) take
    `control_max_train` examples at most."""
    data = load_data_spec(spec.dataset)
    split = select_subset(data, spec.subset, spec.dataset.split_seed)
    family = resolve(name)
    fields = family.settings.model_fields if family.settings is not None else {}
    subsampled = "max_train" in fields and fields["max_train"].default is not None
    args = {"max_train": settings.control_max_train} if subsampled else {}
    request = ModelRequest(name, data.input_shape, data.num_classes, args=args, seed=settings.seed)
    model = family.build(request)
    # a streaming set's subset read whole: a control is fitted on it at once, in memory
    x, y = data.x_train[split.train_idx].to("cpu"), data.y_train[split.train_idx]
    model.fit(FitJob(x, y, data.x_test, data.y_test, spec.train, 0.0, settings.seed))
    return _predictor(model, data.input_shape)


def _predictor(model: TrialModel, shape: tuple[int, int, int]) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(torch.from_numpy(x).float().view(len(x), *shape)).cpu().numpy()

    return predict


def training_set(spec: TrialSpec) -> str:
    """What a control trains on: the same data set, subset and split as the trial."""
    return json.dumps([spec.dataset.model_dump(mode="json"), spec.subset], sort_keys=True)


@dataclass
class Sources:
    """The ok trials whose examples transfer, and why the others do not."""

    specs: dict[str, TrialSpec]
    sets: list[EvalSet]
    skipped: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)  # trial id -> its model's training key


def gather_sources(store: SweepStore, settings: TransferSpec) -> Sources:
    trials = store.read("trials")
    if trials.empty:
        raise FileNotFoundError(f"{store.uri}: no trials to transfer between; run the sweep first")
    expected = manifest.trial_order(store.read_manifest()) or list(trials["trial_id"])
    skipped = {
        row.trial_id: f"{row.status}: {row.reason}"
        for row in trials[trials["status"] != Status.OK].itertuples()
    }
    skipped |= {t: "no result" for t in expected if t not in set(trials["trial_id"])}
    ok = trials[trials["status"] == Status.OK]
    examples = store.read("examples")
    generator = torch.Generator().manual_seed(settings.seed)
    specs: dict[str, TrialSpec] = {}
    sets: list[EvalSet] = []
    keys: dict[str, str] = {}
    for row in ok.itertuples():
        try:
            spec = TrialSpec.from_stored(row.spec)
            mine = examples[examples["trial_id"] == row.trial_id]
            sets += source_sets(row.trial_id, spec, mine, settings, generator)
            specs[row.trial_id] = spec
            keys[row.trial_id] = row.training_key if isinstance(row.training_key, str) else ""
        except Exception as err:  # one unreadable source must not stop the others
            skipped[row.trial_id] = f"{type(err).__name__}: {err}".splitlines()[0]
    sets += fixed_noise_sets(list(specs.values()), settings)
    return Sources(specs, sets, skipped, keys)


def transfer_inputs(store: SweepStore, settings: TransferSpec) -> dict[str, Any]:
    """What a transfer table is made of: the ok trials (sources and targets), their ok attack
    runs (the examples that transfer) and the stage's settings. The record keeps them, so a
    table made of other inputs is known to be stale."""
    trials = store.read("trials", ["trial_id", "status"])
    ok = sorted(set(trials.loc[trials["status"] == Status.OK, "trial_id"]))
    runs = store.read("attacks", ["trial_id", "attack_id", "status"])
    done = runs[(runs["status"] == Status.OK) & runs["trial_id"].isin(ok)]
    attack_runs = sorted(
        {f"{t}/{a}" for t, a in zip(done["trial_id"], done["attack_id"], strict=True)}
    )
    return {"trials": ok, "attack_runs": attack_runs, "settings": settings.model_dump(mode="json")}


def stale_reason(store: SweepStore, settings: TransferSpec) -> str | None:
    """Why the sweep's transfer table does not match its trials now (None: it does, or there
    is nothing to transfer): none made yet, its table gone, trials or attack runs added or
    gone since, other settings, or a stage cut off before its record."""
    now = transfer_inputs(store, settings)
    recorded = store.read_json(TRANSFER_RECORD)
    if recorded is None:
        return "no transfer table yet" if now["trials"] else None
    made = recorded.get("inputs")
    if not store.trial_files("transfer"):
        return "its table is missing"
    if not isinstance(made, dict):
        return "its record predates the record of its inputs"
    if made.get("trials") != now["trials"]:
        return (
            f"it covers {text.count(len(made.get('trials') or []), 'trial')}, the sweep has "
            f"{text.count(len(now['trials']), 'ok trial')}"
        )
    if made.get("attack_runs") != now["attack_runs"]:
        return "attack runs were added or rerun since"
    if made.get("settings") != now["settings"]:
        return "the transfer settings changed"
    return None


def run_transfer(
    sweep_dir: str, settings: TransferSpec | None = None, wandb_mode: str | None = None
) -> TransferOutcome:
    """Transfer every ok trial's examples to every ok trial and control; writes transfer/."""
    import ray

    start = time.perf_counter()
    store = SweepStore.from_dir(sweep_dir)
    if settings is None:
        recorded = (store.read_manifest() or {}).get("transfer", {})
        settings = TransferSpec.model_validate(recorded)
    folders = (store.read_manifest() or {}).get("plugin_dirs", [])
    add_plugin_dirs(folders)
    inputs = transfer_inputs(store, settings)
    sources = gather_sources(store, settings)
    sets_ref = ray.put(sources.sets)

    @ray.remote(num_cpus=1)
    def trial_task(trial_id: str, spec: TrialSpec, key: str, sets: list[EvalSet]) -> list[dict]:
        torch.set_num_threads(1)
        add_plugin_dirs(folders)  # a user's model module imports on this worker too
        try:
            mine = [s for s in sets if s.data == data_of(spec)]
            return evaluate(trial_id, "trial", trial_predictor(store, spec, key), mine)
        except Exception as err:
            return failed_target(trial_id, "trial", err)

    @ray.remote(num_cpus=1)
    def control_task(name: str, spec: TrialSpec, mine: list[str], sets: list[EvalSet]) -> list:
        torch.set_num_threads(1)
        add_plugin_dirs(folders)
        try:
            chosen = [s for s in sets if s.source_trial in set(mine)]
            return evaluate(name, "control", control_predictor(name, spec, settings), chosen)
        except Exception as err:
            return failed_target(name, "control", err)

    futures = [
        trial_task.remote(t, s, sources.keys.get(t, ""), sets_ref) for t, s in sources.specs.items()
    ]
    groups: dict[str, list[str]] = {}
    for trial_id, spec in sources.specs.items():
        groups.setdefault(training_set(spec), []).append(trial_id)
    for number, members in enumerate(groups.values()):
        mine = members + ([NOISE_SOURCE] if number == 0 else [])
        spec = sources.specs[members[0]]
        futures += [control_task.remote(n, spec, mine, sets_ref) for n in settings.controls]
    rows = [row for result in ray.get(futures) for row in result]
    failed = {r["target"]: r["reason"] for r in rows if r["status"] == Status.FAILED}
    store.write_rows("transfer", "all", rows)
    record = {
        "sources": list(sources.specs), "targets": sorted({r["target"] for r in rows}),
        "skipped": sources.skipped, "failed": failed, "inputs": inputs,
    }  # fmt: skip
    store.write_json(TRANSFER_RECORD, record)  # last: the table is whole, and of these inputs
    frame = pd.DataFrame([r for r in rows if r["status"] == Status.OK])
    log_to_wandb(store, frame, wandb_mode)
    seconds = time.perf_counter() - start
    return TransferOutcome(frame, list(sources.specs), sources.skipped, failed, seconds)


def transfer_matrices(
    frame: pd.DataFrame, labels: dict[str, str] | None = None
) -> dict[str, pd.DataFrame]:
    """Per attack (and budget): error on adversarial examples, sources (rows) x targets, both
    named by their labels (controls by their own names) in the order they were run."""
    names = labels or {}
    matrices = {}
    adversarial = frame[frame["kind"] == "adversarial"] if len(frame) else frame
    for (attack, budget), group in adversarial.groupby(["attack", "budget"], dropna=False):
        table = group.pivot_table(index="source_trial", columns="target", values="error_adv")
        table = table.reindex(
            index=list(dict.fromkeys(group["source_trial"])),
            columns=list(dict.fromkeys(group["target"])),
        )
        table.index = [names.get(t, t) for t in table.index]
        table.columns = [names.get(t, t) for t in table.columns]
        matrices[attack if pd.isna(budget) else f"{attack}@{budget:g}"] = table
    return matrices


def log_to_wandb(store: SweepStore, frame: pd.DataFrame, mode: str | None) -> None:
    """The transfer table, matrices and labelled heatmaps as one run in the sweep's W&B group."""
    from advlab.track import log_transfer_run, recorded_target

    recorded = store.read_manifest() or {}
    target = recorded_target(recorded, mode)
    if target["mode"] == "disabled" or frame.empty:
        return
    labels = manifest.labels(recorded)
    named = frame.assign(
        source_label=frame["source_trial"].map(lambda t: labels.get(t, t)),
        target_label=frame["target"].map(lambda t: labels.get(t, t)),
    )
    matrices = transfer_matrices(frame, labels)
    log_transfer_run(
        **target, group=store.sweep, directory=store.wandb_dir(), rows=named.to_dict("records"),
        matrices=matrices, figures={name: heatmap_png(name, m) for name, m in matrices.items()},
    )  # fmt: skip
    store.sync_wandb()


def heatmap_png(name: str, matrix: pd.DataFrame) -> bytes:
    """A transfer matrix drawn with labelled axes and the error in each cell."""
    from advlab.report.charts import png, transfer_heatmap

    spec = transfer_heatmap(
        matrix, title=f"transfer of {name} examples",
        row_title="examples made on", column_title="classified by",
    )  # fmt: skip
    return png(spec)
