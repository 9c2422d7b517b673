"""Transfer over a finished sweep: the paper's Tables 2 and 4, plus non-neural controls.

Each ok trial's adversarial examples (from the examples table) are fed to the trial models of
the same data set that `transfer.pairs` chooses for it (advlab.transfer_pairs: all, within
grid axes, or a seeded sample) and to scikit-learn controls trained on the source's own
training subset. Beside each set of adversarial examples stand the paper's baselines: Gaussian
noise with each example's own per-pixel rms distortion, and the perturbation amplified to a
chosen rms (the paper's Table 4: "distortion magnified" to a stddev, so that transfer is
compared at a distortion at least that large; amplification only enlarges, so an example whose
perturbation is already larger keeps it, and the amplified row never transfers less for being
shrunk).

The work is sharded (`transfer_pairs.Shard`: one target and at most 128 of its sources), one
Ray task per shard wherever the cluster has room; each task loads (or fits) its target once,
fetches only its sources' examples, and writes its own files (`transfer/<shard>.parquet`,
rows per pair; `transfer_examples/<shard>.parquet` per example on request) as it finishes, so
a killed stage resumes with the shards it has not written. Shards no longer planned are
removed, then `transfer.json` records the stage: presence of its record with these inputs
means the table is whole.

Failures stay local: a source whose examples cannot be read is skipped with its reason, and a
target that cannot be loaded or fitted leaves a `failed` row with its reason
(`<shard>.failed.parquet`, retried by the next run); every other pair is still measured.
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

from advlab import manifest, text, transfer_summary
from advlab.attacks.noise import add_noise, amplify, matched_noise
from advlab.data import select_subset
from advlab.families import FitJob, ModelRequest, TrialModel, model_for, resolve
from advlab.sources import attacked_split, load_data_spec
from advlab.spec import TrialSpec
from advlab.store import TRANSFER_RECORD, SweepStore
from advlab.sweep_settings import TransferSpec
from advlab.sweepfile import add_plugin_dirs
from advlab.tables import NOISE_SOURCE, Status
from advlab.transfer_pairs import Shard, data_of, first_seen, pair_rank, plan_shards

FAILED = ".failed.parquet"  # a shard whose target failed: its row; the next run retries it
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
    example: np.ndarray | None = None  # (N,) each example's number in its attack run
    index: np.ndarray | None = None  # (N,) its index in the attacked split


@dataclass
class TransferOutcome:
    rows: pd.DataFrame
    sources: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # trial id -> why it is not in
    failed_targets: dict[str, str] = field(default_factory=dict)  # target -> reason
    seconds: float = 0.0
    shards: int = 0  # shards of the stage
    ran: int = 0  # of them run now (the others were written by an earlier run)


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
        index = group["dataset_index"].to_numpy()
        clean = images[torch.tensor(index)].to("cpu").flatten(1).numpy()
        x = np.stack(group["x_adv"].to_numpy()).astype(np.float32)  # a writable copy
        y = group["label"].to_numpy()
        example = group["example"].to_numpy()
        common = {
            "source_trial": trial_id,
            "attack": attack,
            "budget": None if pd.isna(budget) else float(budget),
            "clean": clean,
            "data": data_of(spec),
            "example": example,
            "index": index,
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
            common |= {"clean": clean[moved], "example": example[moved], "index": index[moved]}
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
                data=data_of(specs[0]), example=np.arange(len(y)), index=np.arange(len(y)),
            )
        )  # fmt: skip
    return sets


def evaluate(
    target: str, target_kind: str, predict: Predict, sets: list[EvalSet], per_example: bool
) -> tuple[list[dict], list[dict]]:
    """Errors of one target on every set and on the same examples before perturbation, as
    counts and exact fractions (int / int in float64: 2 of 25 is 0.08); with `per_example`,
    also each example's two predictions."""
    rows, examples = [], []
    for s in sets:
        n = len(s.y)
        key = {
            "source_trial": s.source_trial, "attack": s.attack, "budget": s.budget,
            "kind": s.kind, "amplified_to": s.amplified_to, "target": target,
            "target_kind": target_kind,
        }  # fmt: skip
        adv = predict(s.x) if n else np.zeros(0, dtype=np.int64)
        clean = predict(s.clean) if n else np.zeros(0, dtype=np.int64)
        wrong, wrong_clean = int((adv != s.y).sum()), int((clean != s.y).sum())
        rows.append(
            key | {
                "rms": s.rms, "n": n, "errors_adv": wrong, "errors_clean": wrong_clean,
                "error_adv": wrong / n if n else math.nan,
                "error_clean": wrong_clean / n if n else math.nan,
                "status": Status.OK, "reason": "",
            }
        )  # fmt: skip
        if per_example and n:
            assert s.example is not None and s.index is not None
            examples += [
                key | {"example": int(e), "dataset_index": int(i), "label": int(y),
                       "prediction_adv": int(p), "prediction_clean": int(c)}
                for e, i, y, p, c in zip(s.example, s.index, s.y, adv, clean, strict=True)
            ]  # fmt: skip
    return rows, examples


def failed_target(target: str, target_kind: str, err: Exception) -> list[dict]:
    reason = f"{type(err).__name__}: {err}".splitlines()[0]
    return [
        {"target": target, "target_kind": target_kind, "status": Status.FAILED, "reason": reason}
    ]


def trial_predictor(store: SweepStore, spec: TrialSpec, key: str | None = None) -> Predict:
    """A trial's trained model, loaded once from the storage root's model store: the one its row
    names (`key`, the training key it trained or loaded), else its spec's key now."""
    data = load_data_spec(spec.dataset)
    model = model_for(spec, data.input_shape, data.num_classes, weights="none")  # loaded below
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


@dataclass
class Sources:
    """The ok trials whose examples transfer (in the order the sweep first listed them), their
    sets, and why the others do not."""

    specs: dict[str, TrialSpec]
    sets: dict[str, list[EvalSet]]  # source (or the noise pseudo-source) -> its sets
    skipped: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)  # trial id -> its model's training key


def gather_sources(store: SweepStore, settings: TransferSpec) -> Sources:
    trials = store.read("trials")
    if trials.empty:
        raise FileNotFoundError(f"{store.uri}: no trials to transfer between; run the sweep first")
    recorded = store.read_manifest()
    expected = manifest.trial_order(recorded) or list(trials["trial_id"])
    skipped = {
        row.trial_id: f"{row.status}: {row.reason}"
        for row in trials[trials["status"] != Status.OK].itertuples()
    }
    skipped |= {t: "no result" for t in expected if t not in set(trials["trial_id"])}
    ok = trials[trials["status"] == Status.OK].set_index("trial_id", drop=False)
    examples = store.read("examples")
    by_trial = dict(tuple(examples.groupby("trial_id", sort=False))) if len(examples) else {}
    specs: dict[str, TrialSpec] = {}
    sets: dict[str, list[EvalSet]] = {}
    keys: dict[str, str] = {}
    for trial_id in first_seen(recorded, ok.index):
        row = ok.loc[trial_id]
        try:
            spec = TrialSpec.from_stored(row["spec"])
            mine = by_trial.get(trial_id, examples.iloc[0:0])
            # Its own noise stream: a source's noise rows never depend on the other sources.
            generator = torch.Generator().manual_seed(pair_rank(settings.seed, trial_id, "") >> 1)
            sets[trial_id] = source_sets(trial_id, spec, mine, settings, generator)
            specs[trial_id] = spec
            key = row["training_key"]
            keys[trial_id] = key if isinstance(key, str) else ""
        except Exception as err:  # one unreadable source must not stop the others
            skipped[trial_id] = f"{type(err).__name__}: {err}".splitlines()[0]
    noise = fixed_noise_sets(list(specs.values()), settings)
    if noise:
        sets[NOISE_SOURCE] = noise
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
    is nothing to transfer): none made yet, its table or a shard of it gone, trials or attack
    runs added or gone since, other settings, or a stage cut off before its record."""
    now = transfer_inputs(store, settings)
    recorded = store.read_json(TRANSFER_RECORD)
    if recorded is None:
        return "no transfer table yet" if now["trials"] else None
    made = recorded.get("inputs")
    files = store.trial_files("transfer")
    if not files:
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
    if _settings(made.get("settings")) != settings:
        return "the transfer settings changed"
    if "shards" not in recorded:
        return "its record predates sharded transfer"
    present = {_shard_of(path) for path in files}
    if not set(recorded["shards"]) <= present:
        return "shards of its table are missing"
    return None


def _settings(dumped: Any) -> TransferSpec | None:
    """Recorded settings as settings now (a key added since takes its default)."""
    try:
        return TransferSpec.model_validate(dumped)
    except ValueError:
        return None


def _shard_of(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0]


def run_shard(
    store: SweepStore, shard: Shard, shard_id: str, spec: TrialSpec, sets: list[EvalSet],
    settings: TransferSpec,
) -> str:  # fmt: skip
    """One shard, in a Ray task: load or fit its target once, classify its sources' sets, write
    its files (per-example rows first: the per-pair file last says the shard is done). Returns
    '' or the reason its target failed (then `<shard>.failed.parquet` holds that row)."""
    try:
        if shard.target_kind == "trial":
            predict = trial_predictor(store, spec, shard.key)
            sets = [s for s in sets if s.data == data_of(spec)]
        else:
            predict = control_predictor(shard.target, spec, settings)
        rows, examples = evaluate(
            shard.target, shard.target_kind, predict, sets, settings.per_example
        )
    except Exception as err:
        failed = failed_target(shard.target, shard.target_kind, err)
        store.write_rows("transfer", shard_id, failed, part="failed")  # FAILED
        for table in ("transfer", "transfer_examples"):  # an earlier run's rows of it are void
            for path in store.trial_files(table):
                if _shard_of(path) == shard_id and not path.endswith(FAILED):
                    store.fs.delete_file(path)
        return f"{type(err).__name__}: {err}".splitlines()[0]
    if settings.per_example:
        store.write_rows("transfer_examples", shard_id, examples)
    store.write_rows("transfer", shard_id, rows)
    return ""


def finished_shards(store: SweepStore) -> set[str]:
    return {_shard_of(p) for p in store.trial_files("transfer") if not p.endswith(FAILED)}


def remove_other_shards(store: SweepStore, keep: set[str]) -> None:
    """Files of shards this stage no longer has (pairs displaced, trials rerun, settings
    changed), and failed files of shards that have since succeeded."""
    done = finished_shards(store)
    for table in ("transfer", "transfer_examples"):
        for path in store.trial_files(table):
            shard = _shard_of(path)
            failed_since_done = path.endswith(FAILED) and shard in done
            if shard not in keep or failed_since_done:
                store.fs.delete_file(path)


def run_transfer(
    sweep_dir: str,
    settings: TransferSpec | None = None,
    wandb_mode: str | None = None,
    fresh: bool = False,
) -> TransferOutcome:
    """Transfer each ok trial's examples to the trials `settings.pairs` chooses and to every
    control, one Ray task per shard not yet written (every shard when `fresh`); writes
    transfer/ (and transfer_examples/)."""
    import ray

    start = time.perf_counter()
    store = SweepStore.from_dir(sweep_dir)
    recorded = store.read_manifest() or {}
    if settings is None:
        settings = TransferSpec.model_validate(recorded.get("transfer", {}))
    folders = recorded.get("plugin_dirs", [])
    add_plugin_dirs(folders)
    inputs = transfer_inputs(store, settings)
    sources = gather_sources(store, settings)
    runs: dict[str, list[str]] = {}
    for run in inputs["attack_runs"]:
        trial_id, attack_id = run.split("/", 1)
        runs.setdefault(trial_id, []).append(attack_id)
    shards = plan_shards(sources.specs, sources.keys, settings, NOISE_SOURCE in sources.sets)
    ids = [shard.shard_id(runs, settings) for shard in shards]
    done = set() if fresh else finished_shards(store)
    todo = [(shard, i) for shard, i in zip(shards, ids, strict=True) if i not in done]
    refs = {source: ray.put(sets) for source, sets in sources.sets.items()}

    @ray.remote(num_cpus=1)
    def shard_task(shard: Shard, shard_id: str, spec: TrialSpec, *parts: list[EvalSet]) -> str:
        torch.set_num_threads(1)
        add_plugin_dirs(folders)  # a user's model module imports on this worker too
        return run_shard(store, shard, shard_id, spec, [s for p in parts for s in p], settings)

    pending = [
        shard_task.remote(shard, i, sources.specs[shard.fit_on],
                          *[refs[s] for s in shard.sources if s in refs])
        for shard, i in todo
    ]  # fmt: skip
    ray.get(pending)  # each task wrote its files as it finished
    remove_other_shards(store, set(ids))
    table = store.read("transfer")
    failed_rows = table[table["status"] != Status.OK]
    failed = dict(zip(failed_rows["target"], failed_rows["reason"], strict=True))
    record = {
        "sources": list(sources.specs), "targets": sorted(set(table["target"])),
        "skipped": sources.skipped, "failed": failed, "inputs": inputs, "shards": sorted(ids),
    }  # fmt: skip
    store.write_json(TRANSFER_RECORD, record)  # last: the table is whole, and of these inputs
    frame = table[table["status"] == Status.OK].reset_index(drop=True)
    log_to_wandb(store, frame, wandb_mode)
    seconds = time.perf_counter() - start
    return TransferOutcome(
        frame, list(sources.specs), sources.skipped, failed, seconds, len(shards), len(todo)
    )


def log_to_wandb(store: SweepStore, frame: pd.DataFrame, mode: str | None) -> None:
    """The transfer stage as one run in the sweep's W&B group: its pooled summary, the whole
    table while W&B keeps every row, and each matrix (capped: transfer_summary) as a table and
    a labelled heatmap."""
    from advlab.track import TABLE_ROWS, log_transfer_run, recorded_target

    recorded = store.read_manifest() or {}
    target = recorded_target(recorded, mode)
    if target["mode"] == "disabled" or frame.empty:
        return
    labels = manifest.labels(recorded)
    config = manifest.labels(recorded, without=("seed",))
    frame = transfer_summary.in_order(frame, recorded)
    rows: list[dict[str, Any]] = []
    if len(frame) <= TABLE_ROWS:
        rows = frame.assign(
            source_label=frame["source_trial"].map(lambda t: labels.get(t, t)),
            target_label=frame["target"].map(lambda t: labels.get(t, t)),
        ).to_dict("records")
    matrices = transfer_summary.matrices(frame, labels, config)
    log_transfer_run(
        **target, group=store.sweep, directory=store.wandb_dir(), rows=rows,
        total_rows=len(frame), summary=transfer_summary.summary(frame, config),
        matrices={name: m.frame for name, m in matrices.items()},
        figures={name: heatmap_png(name, m) for name, m in matrices.items()},
    )  # fmt: skip
    store.sync_wandb()


def heatmap_png(name: str, matrix: transfer_summary.Matrix) -> bytes:
    """A transfer matrix drawn with labelled axes and the error in each cell."""
    from advlab.report.charts import png, transfer_heatmap

    note = f" ({matrix.note})" if matrix.note else ""
    spec = transfer_heatmap(
        matrix.frame, title=f"transfer of {name} examples{note}",
        row_title="examples made on", column_title="classified by",
    )  # fmt: skip
    return png(spec)
