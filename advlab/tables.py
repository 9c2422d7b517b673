"""The results tables: one declared pyarrow schema per table, and the trial config's columns.

Every trial writes every table with exactly these schemas (a failed trial's row carries every
column, as nulls), so pandas, polars and DuckDB read a table folder as it is. Settings that are
lists are typed lists (weight decay is always list<double>); free-form mappings (model_args) are
JSON strings; the trial's whole spec is kept as JSON in `spec`, so downstream code rebuilds it
instead of parsing columns. Attacks, budgets and measures are not trial settings: each attack
run is a row of the attacks table and each measure run a row of the measures table (with their
settings as JSON), so both can be added to finished trials. A measure's own rows go to the table
it declares (advlab.measures); `schema(name)` finds any table's schema, core or measure. The
trial-config columns are derived from `TrialSpec`'s fields: a new setting becomes a column
without an edit here.
"""

from __future__ import annotations

import json
import types
import typing
from enum import StrEnum
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel

from advlab.measures import registry as measures
from advlab.spec import EVALUATION_KEYS, TrialSpec

SCHEMA_VERSION = 3


class Status(StrEnum):
    """The outcome a row records: of a trial, an attack run, a measure run or a transfer target."""

    OK = "ok"
    FAILED = "failed"
    STOPPED = "stopped"  # a trial a scheduler ended early, on purpose


# The transfer table's source for the paper's fixed-stddev noise rows (no trial made them).
NOISE_SOURCE = "gaussian-noise"

EPOCHS = pa.schema(
    [
        ("trial_id", pa.string()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("train_error", pa.float64()),
        ("test_error", pa.float64()),  # null on epochs skipped by train.eval_every
        ("seconds", pa.float64()),
        ("adv_grad_evals", pa.int64()),
        ("train_eps", pa.float64()),  # the training budget that epoch (warm-up); 0: standard
        ("val_robust_error", pa.float64()),  # PGD on the validation slice; null when not run
    ]
)

EXAMPLES = pa.schema(
    [
        ("trial_id", pa.string()),
        ("attack", pa.string()),  # the attack's label in the trial (its name by default)
        ("budget", pa.float64()),  # null for minimisation attacks: one run for every budget
        ("example", pa.int64()),  # position among the attacked examples
        ("split", pa.string()),  # the split attacked: test or train (TrialSpec.attack_split)
        ("dataset_index", pa.int64()),  # index into that split
        ("label", pa.int64()),
        ("target", pa.int64()),  # -1 when untargeted
        ("clean_pred", pa.int64()),
        ("adv_pred", pa.int64()),
        ("success", pa.bool_()),
        ("dist_rms", pa.float64()),
        ("dist_l2", pa.float64()),
        ("dist_linf", pa.float64()),
        ("grad_evals", pa.int64()),
        ("x_adv", pa.list_(pa.float32())),  # the adversarial image, flattened C*H*W
    ]
)

# One row per attack run: once for a minimisation attack (budget null), once per budget for a
# fixed-budget one. Distances are over the successful examples.
ATTACKS = pa.schema(
    [
        ("trial_id", pa.string()),
        ("attack", pa.string()),
        ("attack_id", pa.string()),  # hash of the attack's settings and budgets (TrialSpec)
        ("status", pa.string()),  # ok, or failed with the reason (other columns null)
        ("reason", pa.string()),
        ("method", pa.string()),  # the registered attack (lbfgs, pgd, ...)
        ("kind", pa.string()),  # minimization or fixed_budget
        ("norm", pa.string()),  # the budget norm: rms, l2, linf or stddev
        ("target", pa.string()),  # target mode: untargeted, random or all
        ("budget", pa.float64()),
        ("n", pa.int64()),
        ("success_rate", pa.float64()),
        *[
            (f"{stat}_dist_{norm}", pa.float64())
            for norm in ("rms", "l2", "linf")
            for stat in ("mean", "median")
        ],
        ("grad_evals", pa.float64()),  # mean per example
        ("seconds", pa.float64()),
        ("settings", pa.string()),  # JSON: every setting of the attack, defaults filled in
    ]
)

CURVES = pa.schema(
    [
        ("trial_id", pa.string()),
        ("attack", pa.string()),
        ("norm", pa.string()),
        ("budget", pa.float64()),
        ("n", pa.int64()),  # attacked examples (all correctly classified when clean)
        ("success_rate", pa.float64()),
        ("robust_error", pa.float64()),  # over every example scanned to find the n
    ]
)

# One row per measure run, written after its own table's rows: its presence marks the run done.
MEASURES = pa.schema(
    [
        ("trial_id", pa.string()),
        ("measure", pa.string()),  # the measure's label in the trial (its name by default)
        ("measure_id", pa.string()),  # hash of its settings and the attack runs it read
        ("name", pa.string()),  # the registered measure (or its import path)
        ("scope", pa.string()),  # trial, attack or example
        ("attack", pa.string()),  # the attack run an attack-scope run looked at; else null
        ("table", pa.string()),  # where its rows are
        ("status", pa.string()),  # ok, or failed with the reason
        ("reason", pa.string()),
        ("rows", pa.int64()),
        ("flag", pa.string()),  # a reason to look closer (the measure's own check); "" if none
        ("seconds", pa.float64()),
        ("settings", pa.string()),  # JSON: every setting, defaults filled in
    ]
)

TRANSFER = pa.schema(
    [
        ("source_trial", pa.string()),
        ("attack", pa.string()),
        ("budget", pa.float64()),  # null for minimisation attacks
        ("kind", pa.string()),  # adversarial, noise (same rms as each example's) or amplified
        ("amplified_to", pa.float64()),  # amplified rows: the per-pixel rms aimed at; else null
        ("rms", pa.float64()),  # mean per-pixel rms of the perturbation applied
        ("target", pa.string()),  # a trial id, or a control's name (trained on the source's data)
        ("target_kind", pa.string()),  # trial or control
        ("n", pa.int64()),
        ("errors_adv", pa.int64()),  # examples the target got wrong after perturbation
        ("errors_clean", pa.int64()),  # and before it
        ("error_adv", pa.float64()),  # errors_adv / n, exactly (measure.fraction)
        ("error_clean", pa.float64()),
        ("status", pa.string()),  # ok, or failed (with the reason) for a target that broke
        ("reason", pa.string()),
    ]
)

# transfer.per_example: one row per (source, attack, budget, kind, target, example), what the
# target predicted for the perturbed and the clean image; keyed like the transfer table.
TRANSFER_EXAMPLES = pa.schema(
    [
        ("source_trial", pa.string()),
        ("attack", pa.string()),
        ("budget", pa.float64()),
        ("kind", pa.string()),
        ("amplified_to", pa.float64()),
        ("target", pa.string()),
        ("target_kind", pa.string()),
        ("example", pa.int64()),  # the example's number in the source's attack run
        ("dataset_index", pa.int64()),
        ("label", pa.int64()),
        ("prediction_adv", pa.int64()),
        ("prediction_clean", pa.int64()),
    ]
)

# A multi-objective search's trials: one row per (trial, objective) with the trial's label, the
# objective's value, and whether the trial is on the Pareto front (no other trial is at least as
# good in every objective and better in one).
PARETO = pa.schema(
    [
        ("trial_id", pa.string()),
        ("label", pa.string()),  # the trial's readable label (its sampled values)
        ("metric", pa.string()),
        ("mode", pa.string()),  # min or max
        ("value", pa.float64()),
        ("on_front", pa.bool_()),
    ]
)

# What a trial row holds besides its config: ids, outcome, clean errors, timings, versions.
_TRIAL_HEAD = [
    ("trial_id", pa.string()),
    ("trial_index", pa.int64()),  # position in its sweep version's grid
    ("label", pa.string()),  # readable name from the grid values
    ("sweep", pa.string()),
    ("status", pa.string()),  # ok, failed or stopped
    ("reason", pa.string()),
]
_TRIAL_RESULTS = [
    ("training_key", pa.string()),
    ("trained_here", pa.bool_()),  # False: loaded from the model store
    ("n_train", pa.int64()),
    ("input_dim", pa.int64()),  # d = C * H * W of the images the trial saw (dataset.resolution)
    ("train_error", pa.float64()),
    ("test_error", pa.float64()),
    ("heldout_error", pa.float64()),
    ("n_test", pa.int64()),  # examples behind test_error (its interval counts them)
    ("n_heldout", pa.int64()),  # and behind heldout_error; train_error's are n_train
    ("n_attacked", pa.int64()),
    ("n_scanned", pa.int64()),  # examples looked at to find the n_attacked correct ones
    ("n_clean_wrong", pa.int64()),  # of those, misclassified without any attack
    ("train_adv_grad_evals", pa.int64()),
    ("resumed_from_epoch", pa.int64()),  # epochs restored from a checkpoint (0: trained whole)
    ("n_validation", pa.int64()),  # training-subset examples held out for robust validation
    ("evaluated_epoch", pa.int64()),  # whose weights were evaluated: best robust or the last
    ("val_robust_error", pa.float64()),  # robust validation error of that epoch
    ("train_seconds", pa.float64()),
    ("device_used", pa.string()),  # the device it ran on (`device` is what was asked)
    ("worker_node", pa.string()),
    ("spec", pa.string()),  # the TrialSpec as JSON (attacks live in the attacks table)
    ("advlab_version", pa.string()),
    ("torch_version", pa.string()),
    ("python_version", pa.string()),
]


def _arrow_type(annotation: Any) -> pa.DataType:
    """The column type of a (flattened) TrialSpec field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.string()  # an optional nested setting (dataset.normalize): JSON
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if float in inner and any(typing.get_origin(a) is list for a in inner):
            return pa.list_(pa.float64())  # one lambda or one per layer: always a list
        return _arrow_type(inner[0])
    if origin is list:
        inner_type = args[0]
        if isinstance(inner_type, type) and issubclass(inner_type, BaseModel):
            return pa.string()  # the attack list: JSON
        return pa.list_(_arrow_type(inner_type))
    if origin is dict:
        return pa.string()  # free-form mappings (model_args): JSON
    if origin is Literal:
        return pa.string()
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}[annotation]


def _config_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, pa.DataType]]:
    fields: list[tuple[str, pa.DataType]] = []
    for name, info in model.model_fields.items():
        if model is TrialSpec and name in EVALUATION_KEYS:
            continue  # attack and measure runs are rows of their tables, not trial settings
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields += _config_fields(annotation, f"{prefix}{name}.")
        else:
            fields.append((f"{prefix}{name}", _arrow_type(annotation)))
    return fields


CONFIG_FIELDS = _config_fields(TrialSpec)
TRIALS = pa.schema([*_TRIAL_HEAD, *CONFIG_FIELDS, *_TRIAL_RESULTS])
assert len(set(TRIALS.names)) == len(TRIALS.names), "a config field shadows a results column"

# The examples behind each rate that is a share of a known count (advlab.stats gives such a
# rate an interval over seeds and examples): (table, rate column) -> the count's column, in
# the same row or, where the rate's table lacks it, in the trial's row of the trials table.
# Left out, on purpose: the epochs' train_error (batches seen under changing weights, not one
# set of examples) and measure tables (their rows are the examples already).
RATE_COUNTS: dict[tuple[str, str], str] = {
    ("trials", "train_error"): "n_train",
    ("trials", "test_error"): "n_test",
    ("trials", "heldout_error"): "n_heldout",
    ("trials", "val_robust_error"): "n_validation",  # PGD on every validation example
    ("epochs", "test_error"): "n_test",  # the whole test set, every epoch it is evaluated
    ("epochs", "val_robust_error"): "n_validation",
    ("attacks", "success_rate"): "n",
    ("curves", "success_rate"): "n",
    ("curves", "robust_error"): "n_scanned",  # clean mistakes and fooled, of those scanned
    ("transfer", "error_adv"): "n",
    ("transfer", "error_clean"): "n",
}

SCHEMAS: dict[str, pa.Schema] = {
    "trials": TRIALS,
    "epochs": EPOCHS,
    "examples": EXAMPLES,
    "attacks": ATTACKS,
    "curves": CURVES,
    "measures": MEASURES,
    "transfer": TRANSFER,
    "transfer_examples": TRANSFER_EXAMPLES,
    "pareto": PARETO,
}


def config_columns(spec: TrialSpec) -> dict[str, Any]:
    """The trial's settings as trials-table columns (dotted names, typed as in TRIALS)."""
    dumped = spec.model_dump(mode="json", exclude=set(EVALUATION_KEYS))
    columns: dict[str, Any] = {}
    for name, kind in CONFIG_FIELDS:
        value: Any = dumped
        for part in name.split("."):
            value = value[part]
        if pa.types.is_string(kind) and not isinstance(value, str | None):
            value = json.dumps(value, sort_keys=True)
        elif pa.types.is_list(kind) and not isinstance(value, list):
            value = [value]
        columns[name] = value
    return columns


assert set(SCHEMAS) <= set(measures.RESERVED), "a core table's folder is not reserved"


def schema(name: str) -> pa.Schema:
    """The declared schema of a core table or of a registered measure's table."""
    if name in SCHEMAS:
        return SCHEMAS[name]
    defn = measures.by_table(name)
    if defn is None:
        raise KeyError(f"no table {name!r}: neither a core table nor a registered measure's")
    return defn.schema


def table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table of `name`'s schema; a missing column is null, an unknown one an error."""
    schema_ = schema(name)
    unknown = {key for row in rows for key in row} - set(schema_.names)
    if unknown:
        raise ValueError(f"{name}: columns {sorted(unknown)} are not in the declared schema")
    return pa.Table.from_pylist(rows, schema=schema_)
