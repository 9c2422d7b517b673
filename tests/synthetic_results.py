"""A big sweep's results written without running it: schema-valid parquet for hundreds of
trials in a second, with values chosen so the report's grouping and ranking have known answers.

Trials are a real sweep file's grid (parse_sweep: real ids, labels, specs and sweep.json); each
table is one parquet file (`all.parquet`, which readers take like any trial's file). A
configuration's test error is `BASE + STEP * c` (c: its number in grid order) plus a seed
offset `SPREAD * (s - mean seed)`, which cancels over the seeds: its mean is exactly
`BASE + STEP * c`. L-BFGS's mean distortion falls as c rises, so the two rankings differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from conftest import tiny_sweep

from advlab import manifest
from advlab.spec import EVALUATION_KEYS
from advlab.store import SweepStore
from advlab.sweepfile import SweepSpec, parse_sweep
from advlab.tables import config_columns

BASE, STEP, SPREAD = 0.05, 0.001, 0.0004
EXAMPLES = 3  # stored per attack run (with images)
TARGETS = 4  # other trials each source's examples are fed to (a sample), besides its own
CONTROLS = ("logistic", "knn")
FGSM_EPS = (0.05, 0.1)


def synthetic_spec(storage: Path, models: list[str], decays: list[float], seeds: int) -> SweepSpec:
    raw = tiny_sweep(name="synthetic", storage=str(storage))
    raw["grid"] = {"model": models, "weight_decay": decays, "seed": list(range(seeds))}
    return parse_sweep(raw)


def write_synthetic(storage: Path, models: list[str], decays: list[float], seeds: int) -> str:
    """Write the sweep; returns its folder. Configurations are models x decays, in grid order
    (the seed axis is last, so a configuration's trials are neighbours)."""
    spec = synthetic_spec(storage, models, decays, seeds)
    store = SweepStore(str(storage), spec.name)
    recorded = manifest.record_version(None, spec)
    store.write_manifest(recorded)
    labels = manifest.labels(recorded)
    rng = np.random.default_rng(0)
    tables: dict[str, list[dict[str, Any]]] = {
        t: [] for t in ("trials", "attacks", "curves", "epochs", "examples", "transfer")
    }
    ids = spec.ids
    for index, trial_id in enumerate(ids):
        config, seed = divmod(index, seeds)
        error = BASE + STEP * config + SPREAD * (seed - (seeds - 1) / 2)
        tables["trials"].append(_trial_row(spec, index, trial_id, labels[trial_id], error))
        distortion = 0.2 - 0.0001 * config + 0.001 * seed
        for table, rows in _attack_rows(trial_id, distortion, rng).items():
            tables[table] += rows
        tables["epochs"] += [
            {"trial_id": trial_id, "epoch": e, "loss": 1.0 / e, "train_error": error,
             "test_error": error + 0.1 / e, "seconds": 0.1}
            for e in (1, 2, 3)
        ]  # fmt: skip
        targets = [ids[(index + k) % len(ids)] for k in range(TARGETS + 1)]  # itself first
        tables["transfer"] += _transfer_rows(trial_id, targets, rng)
    for table, rows in tables.items():
        store.write_rows(table, "all", rows)
    return store.uri


def _trial_row(spec: SweepSpec, index: int, trial_id: str, label: str, error: float) -> dict:
    trial = spec.trials[index]
    return {
        "trial_id": trial_id, "trial_index": index, "label": label, "sweep": spec.name,
        "status": "ok", "reason": "", **config_columns(trial),
        "spec": trial.model_dump_json(exclude=set(EVALUATION_KEYS)),
        "train_error": error / 2, "test_error": error, "n_attacked": 12, "n_scanned": 13,
        "n_clean_wrong": 1, "train_seconds": 1.0,
    }  # fmt: skip


def _attack_rows(trial_id: str, distortion: float, rng: np.random.Generator) -> dict[str, list]:
    runs = [("lbfgs", "minimization", "rms", None, 1.0)]
    runs += [("fgsm", "fixed_budget", "linf", eps, 0.3 + eps) for eps in FGSM_EPS]
    out: dict[str, list] = {"attacks": [], "curves": [], "examples": []}
    for attack, kind, norm, budget, success in runs:
        out["attacks"].append(
            {"trial_id": trial_id, "attack": attack, "attack_id": f"{attack}-id",
             "status": "ok", "reason": "", "method": attack, "kind": kind, "norm": norm,
             "target": "random" if attack == "lbfgs" else "untargeted", "budget": budget,
             "n": 12, "success_rate": success, "mean_dist_rms": distortion,
             "mean_dist_linf": 4 * distortion, "seconds": 0.5, "settings": "{}"}
        )  # fmt: skip
        for eps in [budget] if budget is not None else FGSM_EPS:
            out["curves"].append(
                {"trial_id": trial_id, "attack": attack, "norm": norm, "budget": eps, "n": 12,
                 "success_rate": success, "robust_error": min(1.0, success + 0.05)}
            )  # fmt: skip
        for example in range(EXAMPLES):
            out["examples"].append(
                {"trial_id": trial_id, "attack": attack, "budget": budget, "example": example,
                 "split": "test", "dataset_index": example, "label": 1, "target": 2,
                 "clean_pred": 1, "adv_pred": 2, "success": True, "dist_rms": distortion,
                 "dist_l2": 8 * distortion, "dist_linf": 4 * distortion, "grad_evals": 10,
                 "x_adv": rng.random(64).astype(np.float32).tolist()}
            )  # fmt: skip
    return out


def _transfer_rows(source: str, targets: list[str], rng: np.random.Generator) -> list[dict]:
    rows = []
    for attack, budget in [("lbfgs", None), *[("fgsm", eps) for eps in FGSM_EPS]]:
        for target in [*targets, *CONTROLS]:
            kind = "control" if target in CONTROLS else "trial"
            error = 1.0 if target == source else float(rng.random())
            rows.append(
                {"source_trial": source, "attack": attack, "budget": budget,
                 "kind": "adversarial", "rms": 0.1, "target": target, "target_kind": kind,
                 "n": 12, "error_adv": error, "error_clean": 0.05, "status": "ok", "reason": ""}
            )  # fmt: skip
    return rows
