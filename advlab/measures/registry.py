"""The measure registry: the one place that knows what a trial produces besides its training
and its attack runs.

Each measure declares, once (in the shape of the attack registry):
- its name, and its table: a declared pyarrow schema, the table named after the measure;
- its scope: "trial" (rows once per trial), "attack" (once per attack run of the trial, each
  row keyed by the attack) or "example" (one row per attacked example, keyed by `example`);
- one settings model (an advlab.strict.Strict subclass) whose fields sit beside `name` in a
  sweep file's `measures` list;
- what it needs of the model: "predictions" (any model) or "gradients" (a torch module);
- whether it reads the trial's attack results (then its id follows the trial's attack runs,
  so adding an attack reruns it);
- the function that runs it, `run(ctx, settings) -> rows`, and optionally `metrics(rows)`
  (scalars for Tune and W&B), `flag(rows)` (a reason to look closer, or None) and `attacks(spec,
  settings)` (attack runs it needs beside the sweep's) and `check(settings, n_train)` (a
  problem with its settings for a trial, found before any work starts).

Spec validation, the trial, the store, results, W&B and the report ask this module. A plug-in
measure is a `MeasureDef` passed to `register()`, or named in a sweep file by import path
(`name: "mypkg.measures:MY_MEASURE"`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import ValidationError

from advlab.plugins import PluginError, import_object
from advlab.strict import NoSettings, Strict
from advlab.text import is_file_name

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

    from advlab.data import Dataset

Scope = Literal["trial", "attack", "example"]
Needs = Literal["predictions", "gradients"]
SCOPES: tuple[Scope, ...] = ("trial", "attack", "example")
# Columns a scope's rows are keyed by (besides trial_id), with the type they must have.
SCOPE_KEYS: dict[str, tuple[tuple[str, pa.DataType], ...]] = {
    "trial": (),
    "attack": (("attack", pa.string()),),
    "example": (("example", pa.int64()),),
}
# Folders the store keeps under a sweep: no measure's table may take one of these names.
RESERVED = (
    "trials", "epochs", "examples", "attacks", "curves", "transfer", "transfer_examples",
    "pareto", "measures", "models", "ray", "wandb", "damaged", "files",
)  # fmt: skip

Rows = list[dict[str, Any]]


class MeasureError(ValueError):
    """A bad measure definition or setting; the message is one line naming the key and the fix."""


@dataclass
class MeasureContext:
    """What one measure run sees. `spec` is the trial's advlab.spec.TrialSpec and `attacks` its
    attack plan (AttackSpecs: the sweep's and those measures add); `model` the trial's
    advlab.families.TrialModel (`.module` is its torch view, `.predict` its labels); `attacked`
    the attacked examples (advlab.evaluate.AttackedSet); `attack` the attack run an
    attack-scope measure looks at; `results(table)` one of the trial's stored tables
    (examples, curves, attacks) as pandas (an attack-scope run sees its attack's rows only);
    `files` a folder for files the measure writes, `shared` one its runs share across the
    sweep's trials (both None on remote storage)."""

    spec: Any
    model: Any
    data: Dataset
    x_train: Tensor
    y_train: Tensor
    attacked: Any
    attacks: list[Any] = field(default_factory=list)
    attack: Any = None
    results: Callable[[str], pd.DataFrame] | None = None
    files: str | None = None
    shared: str | None = None

    @property
    def seed(self) -> int:
        return int(self.spec.seed)


MeasureFn = Callable[[MeasureContext, Any], Rows]


@dataclass(frozen=True)
class MeasureDef:
    """Everything advlab needs to know about one measure."""

    name: str
    scope: Scope
    schema: pa.Schema  # its table's columns, trial_id and the scope's keys among them
    run: MeasureFn
    settings: type[Strict] = NoSettings
    needs: Needs = "predictions"
    reads_attacks: bool = False
    summary: str = ""  # one line: the report's section title and the docs'
    metrics: Callable[[Rows], dict[str, float]] | None = None
    flag: Callable[[Rows], str | None] | None = None
    # (TrialSpec, settings) -> attacks it needs run, as a sweep file's entries (mappings)
    attacks: Callable[[Any, Any], list[dict[str, Any]]] | None = None
    # (settings, training examples) -> what makes them unusable for the trial, in one line
    check: Callable[[Any, int], str | None] | None = None
    # Columns whose values split the report's rows (default: every text column but trial_id),
    # and those of them whose values spread across its columns instead (one column each).
    report_by: tuple[str, ...] | None = None
    report_across: tuple[str, ...] = ()

    @property
    def table(self) -> str:
        return self.name


_REGISTRY: dict[str, MeasureDef] = {}
_TABLES: dict[str, MeasureDef] = {}


def register(defn: MeasureDef) -> MeasureDef:
    """Add a measure (a plug-in's or a test's); its name and table must be new."""
    _check_definition(defn)
    known = _TABLES.get(defn.table)
    if known is not None and known is not defn:
        raise MeasureError(
            f"measure {defn.name!r}: table {defn.table!r} belongs to another measure; rename it"
        )
    _REGISTRY.setdefault(defn.name, defn)
    _TABLES[defn.table] = defn
    return defn


def _check_definition(defn: MeasureDef) -> None:
    where = f"measure {defn.name!r}"
    if not is_file_name(defn.name) or defn.name in RESERVED:
        raise MeasureError(
            f"{where}: a name of at most 64 letters, digits, '-', '_' or '.' that no results "
            f"folder uses ({', '.join(RESERVED)}); rename it"
        )
    if defn.scope not in SCOPES or defn.needs not in ("predictions", "gradients"):
        raise MeasureError(f"{where}: scope must be one of {SCOPES}, needs predictions|gradients")
    if not (isinstance(defn.settings, type) and issubclass(defn.settings, Strict)):
        raise MeasureError(f"{where}: settings must be a subclass of advlab.strict.Strict")
    required = (("trial_id", pa.string()), *SCOPE_KEYS[defn.scope])
    for column, kind in required:
        index = defn.schema.get_field_index(column)
        if index < 0 or defn.schema.field(index).type != kind:
            raise MeasureError(
                f"{where}: its schema needs a {column} column ({kind}) for scope {defn.scope}"
            )


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> MeasureDef:
    """The measure called `name`, or the MeasureDef at an import path `module:attribute`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        return _import_measure(name)
    raise MeasureError(
        f"unknown measure {name!r}; use one of {', '.join(names())} or module:MEASURE"
    )


def by_table(table: str) -> MeasureDef | None:
    """The measure that writes `table`, if one is registered."""
    return _TABLES.get(table)


def _import_measure(path: str) -> MeasureDef:
    try:
        found = import_object(path, "measure")
    except PluginError as err:
        raise MeasureError(f"cannot import measure {path!r} ({err}); check the path") from None
    if not isinstance(found, MeasureDef):
        raise MeasureError(f"{path!r} is a {type(found).__name__}, not an advlab MeasureDef")
    register(found)
    _REGISTRY[path] = found
    return found


def validate_settings(defn: MeasureDef, settings: dict[str, Any]) -> Strict:
    """The measure's settings model from a plain mapping; MeasureError on a bad key or value."""
    try:
        return defn.settings.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if not key:
            raise MeasureError(first["msg"].removeprefix("Value error, ")) from None
        if first["type"] == "extra_forbidden":
            known = sorted(defn.settings.model_fields)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its settings: {known or 'none'}"
            raise MeasureError(f"{key}: not a setting of {defn.name}; {hint}") from None
        message = first["msg"].removeprefix("Value error, ")
        raise MeasureError(f"{key}: {message} (got {first.get('input')!r})") from None
