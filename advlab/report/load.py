"""The sweeps of one report, read with advlab.results and put on common terms.

Comparing is the point, so every trial gets a *configuration*: its sweep and its whole spec
less `seed`. Trials of one configuration are repeats (the report shows their mean and a 95%
interval); each configuration gets one colour that every chart and table uses. Attacks are told
apart by *variant*: the attacks table's label together with the method, norm, target mode and
settings the run recorded, so two L-BFGS set up differently never share a column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from advlab import manifest, results
from advlab.report.settings import ReportSettings
from advlab.results import Results
from advlab.sweepfile import trial_labels
from advlab.tables import Status
from advlab.text import value_text

# Tableau's 10 colours, then their lighter partners: the first ten configurations get the
# strongest contrast; beyond twenty colours repeat.
PALETTE = (
    "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1",
    "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac",
    "#a0cbe8", "#ff9d9a", "#8cd17d", "#ffbe7d", "#d4a6c8",
    "#86bcb6", "#f1ce63", "#fabfd2", "#d7b5a6", "#79706e",
)  # fmt: skip
VARIANT_FIELDS = ("method", "norm", "target")  # with the settings JSON: what an attack is


@dataclass
class Config:
    """Trials of one sweep that differ only in their seed."""

    key: str  # unique in the report
    name: str  # for people: legends, table rows
    sweep: str
    colour: str
    values: dict[str, str]  # sweep and grid values (seed left out): what the filters match
    trial_ids: list[str] = field(default_factory=list)


@dataclass
class Compared:
    """Every sweep's tables, concatenated, each row tagged with its configuration."""

    runs: list[Results]
    sweep_names: list[str]
    configs: list[Config]
    axes: list[str]  # grid axes of any sweep, seed left out, in order
    trials: pd.DataFrame
    attacks: pd.DataFrame
    curves: pd.DataFrame
    epochs: pd.DataFrame
    measures: dict[str, pd.DataFrame]  # every measure table of any sweep, tagged, by name
    settings: ReportSettings = field(default_factory=ReportSettings)
    left_out: int = 0  # configurations the settings' filters and top-k left out

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    def config(self, key: str) -> Config:
        return next(c for c in self.configs if c.key == key)

    @property
    def ok_trials(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == Status.OK]


def load_all(dirs: list[str], settings: ReportSettings | None = None) -> Compared:
    """Read each sweep folder; FileNotFoundError names a folder that holds no results."""
    return compare([results.load(d) for d in dirs], settings or ReportSettings())


def compare(runs: list[Results], settings: ReportSettings) -> Compared:
    """The sweeps on common terms. A sweep sharing trials with one before it gets its trial ids
    suffixed (`~<n>`), so the two stay apart on the page."""
    seen: set[str] = set()
    for number, run in enumerate(runs):
        if seen & set(run.trials["trial_id"]):  # a copy of a sweep, or a grid point in two
            run.rename_trials(f"~{number + 1}")
        seen |= set(run.trials["trial_id"])
    sweep_names = _unique_names([r.name for r in runs])
    axes = list(dict.fromkeys(a for r in runs for a in r.axes if not is_seed(a)))
    configs: list[Config] = []
    trials = []
    for run, name in zip(runs, sweep_names, strict=True):
        tagged, found = _configurations(run, name, len(runs) > 1, len(configs), axes)
        configs += found
        trials.append(tagged)
    frame = pd.concat(trials, ignore_index=True) if trials else pd.DataFrame()
    tags = frame[["trial_id", "sweep_name", "config", "configuration"]]
    joined = {
        table: _tagged(pd.concat([getattr(r, table) for r in runs], ignore_index=True), tags)
        for table in ("attacks", "curves", "epochs")
    }
    names = list(dict.fromkeys(t for r in runs for t in r.measure_tables))
    measures = {
        name: _tagged(pd.concat([r.table(name) for r in runs if name in r.measure_tables]), tags)
        for name in names
    }
    attacks = with_variants(joined["attacks"])
    curves = joined["curves"].merge(
        attacks[["trial_id", "attack", "variant"]].drop_duplicates(["trial_id", "attack"]),
        on=["trial_id", "attack"],
        how="left",
    )
    return Compared(
        runs, sweep_names, configs, axes, frame, attacks, curves, joined["epochs"], measures,
        settings,
    )  # fmt: skip


def is_seed(axis: str) -> bool:
    return axis.rsplit(".", 1)[-1] == "seed"


def _unique_names(names: list[str]) -> list[str]:
    """Sweep names as shown; two folders of one name (other storage roots) get a number."""
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def _configurations(
    run: Results, sweep: str, prefixed: bool, start: int, axes: list[str]
) -> tuple[pd.DataFrame, list[Config]]:
    """The sweep's trials tagged with their configuration, and the configurations in grid order.
    Names come from the sweep's own grid axes; `values` hold every report axis (a sweep without
    a weight-decay axis still has a weight decay) for the filters and Table 1."""
    trials = run.trials.copy()
    hashes = [_without_seed(spec) for spec in trials["spec"]]
    keys = [f"{sweep}:{h}" for h in hashes]
    trials["config"] = keys
    trials["sweep_name"] = sweep
    order = list(dict.fromkeys(keys))
    first_at = {k: i for i, k in reversed(list(enumerate(keys)))}
    first = [first_at[k] for k in order]
    own = _grid_values(run, trials, [a for a in run.axes if not is_seed(a)])
    every = _grid_values(run, trials, axes)
    names = trial_labels([own[i] for i in first], [hashes[i] for i in first])
    members_of: dict[str, list[str]] = {k: [] for k in order}
    for trial_id, key in zip(trials["trial_id"], keys, strict=True):
        members_of[key].append(trial_id)
    configs = []
    for number, (key, index) in enumerate(zip(order, first, strict=True)):
        name = names[hashes[index]]
        name = f"{sweep} · {name}" if prefixed else name
        filters = {"sweep": sweep} | {a: value_text(every[index][a]) for a in axes}
        members = members_of[key]
        colour = PALETTE[(start + number) % len(PALETTE)]
        configs.append(Config(key, name, sweep, colour, filters, members))
    named = {c.key: c.name for c in configs}
    trials["configuration"] = [named[k] for k in keys]
    return trials, configs


def _without_seed(spec: str | None) -> str:
    """A short hash of the trial's spec less its seed: equal for repeats, different otherwise."""
    content = json.loads(spec) if isinstance(spec, str) and spec else {}
    content.pop("seed", None)
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def _grid_values(run: Results, trials: pd.DataFrame, axes: list[str]) -> list[dict[str, Any]]:
    """Per trial: its model and its values on `axes`, as sweep.json recorded them where it has
    them (as the sweep file wrote them), else from the trials table."""
    recorded = (run.manifest or {}).get("trials", {})
    out = []
    for row in trials.to_dict("records"):
        grid = recorded.get(row["trial_id"], {}).get("values", {})
        values = {a: grid[a] if a in grid else row.get(a) for a in axes if a != "model"}
        out.append({"model": row.get("model")} | values)
    return out


def _tagged(frame: pd.DataFrame, tags: pd.DataFrame) -> pd.DataFrame:
    """A table's rows with their trial's sweep and configuration (rows of unknown trials go)."""
    if frame.empty:
        return frame.assign(sweep_name=[], config=[], configuration=[])
    return frame.merge(tags, on="trial_id", how="inner", sort=False)


def with_variants(attacks: pd.DataFrame) -> pd.DataFrame:
    """The attacks table with a `variant` name: the label alone when every run under that label
    was set up alike, else the label and the settings that differ, e.g. `lbfgs (max_iter=20)`."""
    if attacks.empty:
        return attacks.assign(variant=[])
    setups = [_describe(row) for row in attacks.to_dict("records")]
    keys = [
        (label, json.dumps(s, sort_keys=True))
        for label, s in zip(attacks["attack"], setups, strict=True)
    ]
    names: dict[tuple[str, str], str] = {}
    for label in dict.fromkeys(attacks["attack"]):
        kinds = [json.loads(k) for k in dict.fromkeys(k for lab, k in keys if lab == label)]
        fields = dict.fromkeys(f for kind in kinds for f in kind)
        differing = [f for f in fields if len({json.dumps(k.get(f)) for k in kinds}) > 1]
        for kind in kinds:
            parts = ", ".join(f"{f}={value_text(kind.get(f))}" for f in differing)
            names[(label, json.dumps(kind, sort_keys=True))] = (
                f"{label} ({parts})" if parts else label
            )
    return attacks.assign(variant=[names[k] for k in keys])


def _describe(row: dict[str, Any]) -> dict[str, Any]:
    """What sets an attack run up: method, norm, target mode and every recorded setting."""
    settings = json.loads(row["settings"]) if isinstance(row.get("settings"), str) else {}
    return {f: row.get(f) for f in VARIANT_FIELDS} | settings


def sweep_labels(run: Results) -> dict[str, str]:
    """Labels of every trial the sweep lists, finished or not (the manifest's, else the row's)."""
    return run.labels | manifest.labels(run.manifest)
