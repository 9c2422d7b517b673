"""What differs between the compared sweeps and between their trials.

Three sources, all as recorded, none guessed from names:
- each trial's whole spec (the trials table's `spec` JSON, defaults filled in), flattened to
  dotted keys: model, activation, weight decay, train.*, dataset.*, seed ...;
- each attack run's setup (the attacks table: method, norm, target mode, the settings JSON with
  defaults filled in) and its budgets (the curves table);
- each sweep's newest definition in sweep.json (command-line --set overrides included) for the
  sweep-level keys: transfer, resources, W&B ..., and what changed between its versions.
A key is listed when it takes more than one value anywhere in the report.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from advlab.report.load import Compared
from advlab.results import Results
from advlab.sweep_settings import SweepSettings
from advlab.text import value_text

# Sweep-level keys that never change results, or that the trial specs already cover.
_SWEEP_KEYS_SKIPPED = {"name", "storage", "grid", "cases"}
ABSENT = "—"


@dataclass
class Difference:
    key: str
    values: dict[str, list[str]]  # sweep name -> the distinct values its trials take

    def varies_within(self, sweep: str) -> bool:
        return len(self.values.get(sweep, [])) > 1


def differences(compared: Compared) -> list[Difference]:
    """Every setting that differs between or within the sweeps: trial settings, then attack
    setups (over the trials that ran their attacks), then sweep-level settings."""
    names = compared.sweep_names
    specs = {
        name: {
            row["trial_id"]: flatten(_spec(row["spec"])) for row in run.trials.to_dict("records")
        }
        for name, run in zip(names, compared.runs, strict=True)
    }
    attacks: dict[str, dict[str, dict[str, str]]] = {name: {} for name in names}
    for (sweep, trial), found in _attack_settings(compared).items():
        attacks[sweep][trial] = found
    sweep_level = {
        name: {"": flatten(sweep_settings(run), "sweep.")}
        for name, run in zip(names, compared.runs, strict=True)
    }
    return _varying(specs) + _collapse_absent(_varying(attacks)) + _varying(sweep_level)


def _collapse_absent(found: list[Difference]) -> list[Difference]:
    """An attack that some sweep never ran: one row `attack <label>` saying how the others
    set it up, rather than a row per setting of it."""
    out: list[Difference] = []
    absent = {d.key.split(".")[0] for d in found if [ABSENT] in d.values.values()}
    for label in dict.fromkeys(d.key.split(".")[0] for d in found):
        mine = [d for d in found if d.key.split(".")[0] == label]
        if label not in absent:
            out += mine
            continue
        sweeps = list(dict.fromkeys(s for d in mine for s in d.values))
        summary = {
            s: [
                ", ".join(f"{d.key.split('.', 1)[1]}={'/'.join(d.values[s])}" for d in mine)
                if any(d.values.get(s) != [ABSENT] for d in mine) else ABSENT
            ]
            for s in sweeps
        }  # fmt: skip
        out.append(Difference(label, summary))
    return out


def _spec(text: Any) -> dict[str, Any]:
    spec = json.loads(text) if isinstance(text, str) and text else {}
    spec.pop("attacks", None)  # the attacks table says what each attack ran with
    return spec


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys; lists and scalars as text."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out |= flatten(inner, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): value_text(value, missing="null", brackets=True)}


def _attack_settings(compared: Compared) -> dict[tuple[str, str], dict[str, str]]:
    """Per (sweep, trial): `attack <label>.<setting>` keys, budgets included."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    attacks = compared.attacks.drop_duplicates(["trial_id", "attack"])
    budgets = (
        compared.curves.groupby(["trial_id", "attack"], sort=False)["budget"].agg(list).to_dict()
    )
    for row in attacks.to_dict("records"):
        label = f"attack {row['attack']}"
        settings = json.loads(row["settings"]) if isinstance(row["settings"], str) else {}
        found = {"method": row["method"], "norm": row["norm"], "target": row["target"]}
        found |= settings | {"budgets": sorted(budgets.get((row["trial_id"], row["attack"]), []))}
        mine = out.setdefault((row["sweep_name"], row["trial_id"]), {})
        mine |= {
            f"{label}.{k}": value_text(v, missing="null", brackets=True) for k, v in found.items()
        }
    return out


def sweep_settings(run: Results) -> dict[str, Any]:
    """The newest definition's sweep-level settings, defaults filled in where they validate."""
    versions = (run.manifest or {}).get("versions") or []
    definition = versions[-1].get("definition", {}) if versions else {}
    sweep_keys = {k: v for k, v in definition.items() if k in SweepSettings.model_fields}
    try:
        filled = SweepSettings.model_validate(sweep_keys).model_dump(mode="json")
    except ValueError:  # written by another advlab version: show what was written
        filled = sweep_keys
    return {k: v for k, v in filled.items() if k not in _SWEEP_KEYS_SKIPPED}


def _varying(per_sweep: dict[str, dict[str, dict[str, str]]]) -> list[Difference]:
    """The keys that take more than one value over every (sweep, trial), in first-seen order."""
    keys = list(
        dict.fromkeys(k for trials in per_sweep.values() for v in trials.values() for k in v)
    )
    found = []
    for key in keys:
        values = {
            sweep: _distinct(v.get(key, ABSENT) for v in trials.values())
            for sweep, trials in per_sweep.items()
            if trials
        }
        if len({x for v in values.values() for x in v}) > 1:
            found.append(Difference(key, values))
    return found


def _distinct(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def version_changes(run: Results) -> list[str]:
    """For a sweep run again with an edited definition: what each new version changed."""
    versions = (run.manifest or {}).get("versions") or []
    lines = []
    for before, after in itertools.pairwise(versions):
        old = flatten(before.get("definition", {}))
        new = flatten(after.get("definition", {}))
        changed = [
            f"{k}: {old.get(k, ABSENT)} → {new.get(k, ABSENT)}"
            for k in dict.fromkeys([*old, *new])
            if old.get(k) != new.get(k) and k != "storage"
        ]
        lines.append(f"v{after.get('version')}: " + ("; ".join(changed) or "same definition"))
    return lines
