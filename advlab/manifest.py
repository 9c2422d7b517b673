"""A sweep's manifest (sweep.json): every version of its definition and the trials each added.

Sweeps grow: editing a sweep file (a new weight decay, a new case, a new attack) and running it
again records a new version and runs only the trials that are new; finished trials of earlier
versions stay, untouched, and keep being read, reported and transferred. The manifest is what
tells which trials belong to the sweep, in what order (grid order, newest version first), and
by what readable names.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from advlab.measures import registry as measures
from advlab.plan import measures_of
from advlab.spec import SPEC_VERSION, SpecError
from advlab.sweepfile import SweepSpec, add_plugin_dirs, trial_labels
from advlab.tables import SCHEMA_VERSION


def empty(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "schema_version": SCHEMA_VERSION,
        "spec_version": SPEC_VERSION,
        "versions": [],
        "trials": {},
    }


def record_version(manifest: dict[str, Any] | None, spec: SweepSpec) -> dict[str, Any]:
    """The manifest with `spec` recorded: a new version when its trials or settings changed.

    Each trial keeps the version that first added it; its grid values are refreshed from the
    newest version that has it, so labels follow the newest grid.
    """
    out = dict(manifest) if manifest else empty(spec.name)
    versions = list(out.get("versions", []))
    searched = spec.settings.search.algorithm != "grid"
    # A search's trials are known once sampled (record_samples adds them); its version is its
    # definition.
    ids = [] if searched else spec.ids
    current = {"trial_ids": ids, "definition": spec.definition, "file": spec.source}
    if not versions or _changed(versions[-1], current, searched):
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        versions.append(
            {"version": len(versions) + 1, "created": stamp, "axes": spec.axes, **current}
        )
    elif searched:  # the same search continued: keep its trials, note the new definition
        versions[-1] = versions[-1] | {"definition": spec.definition, "file": spec.source}
    else:  # the same trials: note where the file is now (it may have moved)
        versions[-1] = versions[-1] | {"file": spec.source}
    trials = dict(out.get("trials", {}))
    for index, trial_id in enumerate(ids):
        trial = spec.trials[index]
        first = trials.get(trial_id, {}).get("version", versions[-1]["version"])
        trials[trial_id] = {
            "version": first,
            "index": index,
            "model": trial.model,
            "values": spec.grid_values(trial),
        }
    out |= {
        "versions": versions,
        "trials": trials,
        "schema_version": SCHEMA_VERSION,
        "spec_version": SPEC_VERSION,
        "transfer": spec.settings.transfer.model_dump(mode="json"),
        "plugin_dirs": spec.plugin_dirs,  # where its models and loaders import from
        "wandb": spec.settings.wandb.model_dump(mode="json"),
        # table -> the measure (a name or import path) that writes it, over every version
        "measures": dict(out.get("measures", {})) | measure_tables(spec),
    }
    return out


def measure_tables(spec: SweepSpec) -> dict[str, str]:
    return {m.defn.table: m.name for trial in spec.trials for m in measures_of(trial)}


def register_measures(manifest: dict[str, Any] | None) -> list[str]:
    """Import the sweep's own measures (modules beside its sweep file), so their tables read
    with their declared schemas; a note for each one that cannot be imported here."""
    if not manifest:
        return []
    add_plugin_dirs(manifest.get("plugin_dirs", []))
    notes = []
    for table, name in (manifest.get("measures") or {}).items():
        try:
            measures.get(name)
        except measures.MeasureError as err:
            notes.append(f"{table}: {err}; read with each file's own columns")
    return notes


def check_same_sweep(manifest: dict[str, Any] | None, spec: SweepSpec, where: str) -> None:
    """One sweep definition per storage and name: a sweep file other than the one that made
    the sweep in `where` continues it only when it shares trials with it (the same sweep,
    moved or grown; a search: the same search); an unrelated one is refused, so two sweeps
    never mix their trials, transfer or W&B runs under one name."""
    versions = (manifest or {}).get("versions") or []
    recorded = versions[-1].get("file") if versions else None
    if recorded is None or spec.source is None or recorded == spec.source:
        return
    if spec.settings.search.algorithm == "grid":
        known = {t for v in versions for t in v.get("trial_ids", [])}
        if known & set(spec.ids):
            return
    elif _without_samples(versions[-1].get("definition")) == _without_samples(spec.definition):
        return
    raise SpecError(
        f"name: {where} holds sweep '{spec.name}' of {recorded}, which shares no trial with "
        "this file; give this sweep its own name (name: or --set name=...) or pass another "
        "--storage"
    )


def _changed(newest: dict[str, Any], current: dict[str, Any], searched: bool) -> bool:
    """Whether `current` is a new version. A search that only asks for more samples is the
    same search, continued (its trials stay in its version)."""
    if not searched:
        return any(newest.get(k) != current[k] for k in ("trial_ids", "definition"))
    return _without_samples(newest.get("definition")) != _without_samples(current["definition"])


def _without_samples(definition: Any) -> Any:
    if not isinstance(definition, dict) or not isinstance(definition.get("search"), dict):
        return definition
    search = {k: v for k, v in definition["search"].items() if k != "num_samples"}
    return definition | {"search": search}


def trial_order(manifest: dict[str, Any] | None) -> list[str]:
    """Every trial of the sweep: the newest version's, in its grid order, then older ones."""
    if not manifest or not manifest.get("versions"):
        return []
    newest = manifest["versions"][-1]["trial_ids"]
    seen = set(newest)
    older = [
        t
        for version in reversed(manifest["versions"][:-1])
        for t in version["trial_ids"]
        if not (t in seen or seen.add(t))
    ]
    return [*newest, *older]


def current_ids(manifest: dict[str, Any] | None) -> list[str]:
    """The trials of the newest version: what the sweep as now written expects."""
    if not manifest or not manifest.get("versions"):
        return []
    return list(manifest["versions"][-1]["trial_ids"])


def labels(manifest: dict[str, Any] | None, without: tuple[str, ...] = ()) -> dict[str, str]:
    """Readable names for every trial, built over all versions' grid values together;
    `without=("seed",)` names configurations, which trials repeated over seeds share."""
    order = trial_order(manifest)
    if not order:
        return {}
    trials = manifest["trials"]  # type: ignore[index]
    # The versions' axis lists keep grid order (a JSON object's keys come back sorted).
    versions = manifest["versions"]  # type: ignore[index]
    axes = [a for a in dict.fromkeys(a for v in versions for a in v["axes"]) if a not in without]
    by_version = {v["version"]: v.get("definition") or {} for v in versions}
    values = [
        _axis_values(trials[t], axes, by_version.get(trials[t].get("version"), {})) for t in order
    ]
    return trial_labels(values, order, unique=not without)  # repeats share their name


def _axis_values(trial: dict[str, Any], axes: list[str], definition: dict[str, Any]) -> dict:
    """A trial's value on every axis of any version: an axis its own version did not vary
    holds that version's fixed setting (the model, or the definition's value), not None."""
    out = {"model": trial["model"]}
    for axis in axes:
        if axis in trial["values"]:
            out[axis] = trial["values"][axis]
        elif axis != "model":
            out[axis] = _fixed(definition, axis)
    return out


def _fixed(definition: dict[str, Any], axis: str) -> Any:
    node: Any = definition
    for part in axis.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def record_samples(
    manifest: dict[str, Any] | None, samples: list[tuple[str, str, dict[str, Any]]]
) -> dict[str, Any]:
    """A search's sampled trials (trial id, model, grid and sampled values) added to the newest
    version, in the order Tune ran them; their labels come from those values."""
    out = dict(manifest or {})
    versions = [dict(v) for v in out.get("versions", [])]
    newest = versions[-1]
    trials = dict(out.get("trials", {}))
    for trial_id, model, values in samples:
        if trial_id not in newest["trial_ids"]:
            newest["trial_ids"] = [*newest["trial_ids"], trial_id]
        newest["axes"] = list(dict.fromkeys([*newest["axes"], *values]))
        trials[trial_id] = {
            "version": trials.get(trial_id, {}).get("version", newest["version"]),
            "index": newest["trial_ids"].index(trial_id),
            "model": model,
            "values": values,
        }
    return out | {"versions": versions, "trials": trials}
