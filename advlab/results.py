"""Load a sweep's results as typed, joined pandas frames: `advlab.results.load(path)`.

    >>> res = advlab.results.load("results/quickstart")
    >>> res.trials[["label", "model", "weight_decay", "test_error"]]
    >>> res.attacks.query("attack == 'lbfgs'")[["label", "mean_dist_rms", "success_rate"]]
    >>> res.curves.pivot_table(index="label", columns="budget", values="robust_error")

Every frame has its table's declared schema (advlab.tables), whatever version of advlab wrote
each file: a column a file lacks reads as null. Trials come in grid order (the newest version
of the sweep first) with readable labels; the other tables carry the trial's label and the
grid values of every axis beside their own columns, so nothing needs a join or column parsing.
Measure tables (lipschitz, density, your own measure's) are `res.table(name)`, or `res.<name>`;
`res.tables` lists what the sweep holds. Each table folder is also plain parquet that pandas,
polars and DuckDB read as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from advlab import dimension, manifest, transfer_summary
from advlab.stats import aggregate, with_counts
from advlab.store import SweepStore, list_sweeps
from advlab.tables import RATE_COUNTS, SCHEMAS, Status

__all__ = ["Results", "load"]


@dataclass
class Results:
    """One sweep's tables. `axes` are the grid keys whose values label the trials."""

    name: str
    uri: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    attacks: pd.DataFrame
    curves: pd.DataFrame
    measures: pd.DataFrame  # one row per measure run (its rows are in the measure's table)
    transfer: pd.DataFrame
    pareto: pd.DataFrame  # a multi-objective search: (trial, objective) values, on_front
    manifest: dict[str, Any] | None
    axes: list[str] = field(default_factory=list)
    store: SweepStore | None = None
    measure_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be read, and why
    trial_suffix: str = ""  # appended to every trial id (`rename_trials`)

    @property
    def tables(self) -> list[str]:
        """Every table this sweep holds: the core tables, then the measures'."""
        return [*CORE, *self.measure_tables]

    def table(self, name: str) -> pd.DataFrame:
        """Any table by name, measure tables included (joined with labels like the rest)."""
        if name in self.measure_tables:
            return self.measure_tables[name]
        if name == "examples":
            return self.examples()
        if name in CORE:
            return getattr(self, name)
        if name in ON_REQUEST and self.store is not None:
            return _label_transfer(self.store.read(name), self.labels)
        raise KeyError(f"{self.name} has no table {name!r}; it has {', '.join(self.tables)}")

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("measure_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def examples(self, images: bool = False) -> pd.DataFrame:
        """The examples table (one row per attacked example and run), joined with labels; the
        adversarial images (`x_adv`) only when asked for, since they dominate its size."""
        assert self.store is not None
        columns = None if images else [n for n in SCHEMAS["examples"].names if n != "x_adv"]
        return self._join(self._suffixed(self.store.read("examples", columns)))

    def rename_trials(self, suffix: str) -> None:
        """Append `suffix` to every trial id in every table (and in the examples read later),
        so two sweeps that share trials (a copy of one, or a grid point in both) stay apart
        when read side by side."""
        self.trial_suffix += suffix
        for name in ("trials", "epochs", "attacks", "curves", "measures", "pareto"):
            setattr(self, name, _with_suffix(getattr(self, name), suffix))
        self.measure_tables = {n: _with_suffix(f, suffix) for n, f in self.measure_tables.items()}
        ids = set(self.trials["trial_id"])
        self.transfer = self.transfer.assign(
            source_trial=[
                t + suffix if t + suffix in ids else t for t in self.transfer["source_trial"]
            ],
            target=[t + suffix if t + suffix in ids else t for t in self.transfer["target"]],
        )
        if self.manifest:
            self.manifest = _manifest_with_suffix(self.manifest, suffix)

    def _suffixed(self, frame: pd.DataFrame) -> pd.DataFrame:
        return _with_suffix(frame, self.trial_suffix) if self.trial_suffix else frame

    def over_seeds(
        self,
        name: str,
        value: str,
        by: tuple[str, ...] = ("attack", "budget"),
        count: str | None = None,
    ) -> pd.DataFrame:
        """`value` of table `name` summarised over seeds: trials that differ only in their seed
        are repeats of one configuration; one row per configuration (and `by` key present)
        with the mean, its 95% interval (lo, hi), the number of seeds n, the seeds' own
        `values` (a list, in grid order) and the interval's `method` (advlab.stats). A rate
        whose count of examples is known (advlab.tables.RATE_COUNTS, or the column `count`
        names, in the table or the trials table) gets the interval over seeds and examples;
        any other value the bootstrap over seeds."""
        frame = self.trials if name == "trials" else getattr(self, name)
        keys = ["configuration", *[k for k in by if k in frame and name != "trials"]]
        if "configuration" not in frame:
            frame = frame.merge(self.trials[["trial_id", "configuration"]], on="trial_id")
        frame, count = with_counts(frame, self.trials, count or RATE_COUNTS.get((name, value)))
        return aggregate(frame, keys, value, count)

    def dimension(self) -> pd.DataFrame:
        """Distortion and input-gradient norms against the input dimension d (a sweep over
        `dataset.resolution`), long-form: trial_id, group (the grid values besides seed and
        resolution), seed, input_dim, quantity (dist_l2, dist_rms, grad_l1, grad_l2), attack
        (null for gradients), value. advlab.dimension says where each comes from."""
        axes = [
            a for a in self.axes if a not in ("seed", "dataset.resolution") and a in self.trials
        ]
        group = [
            " ".join(f"{a}={_text(v)}" for a, v in zip(axes, row, strict=True)) or self.name
            for row in self.trials[axes].itertuples(index=False)
        ]
        trials = self.trials.assign(group=group)
        return dimension.points(trials, self.attacks, self.measure_tables.get("input_gradients"))

    def dimension_exponents(self) -> pd.DataFrame:
        """Per group, attack and quantity: the exponent k of value ~ d^k fitted per seed, its
        mean over seeds with the 95% bootstrap interval (lo, hi), the seeds' own exponents,
        the predicted exponent and whether the interval holds it (advlab.dimension)."""
        return dimension.exponents(self.dimension())

    def objectives(self) -> pd.DataFrame:
        """A multi-objective search's trials, one row each in grid order: trial_id, label, one
        column per objective (in the search's order) and on_front; empty for other sweeps.
        `pareto` holds the same long-form, with each objective's mode."""
        if self.pareto.empty:
            return pd.DataFrame(columns=["trial_id", "label", "on_front"])
        metrics = list(dict.fromkeys(self.pareto["metric"]))
        wide = self.pareto.pivot_table(
            index="trial_id", columns="metric", values="value", aggfunc="first", sort=False
        )
        front = self.pareto.groupby("trial_id", sort=False)["on_front"].first()
        ids = list(dict.fromkeys(self.pareto["trial_id"]))
        out = pd.DataFrame({"trial_id": ids, "label": [self.labels.get(t, t) for t in ids]})
        for metric in metrics:
            out[metric] = wide.loc[ids, metric].to_numpy(float)
        return out.assign(on_front=front.loc[ids].to_numpy(bool))

    def _join(self, frame: pd.DataFrame) -> pd.DataFrame:
        keys = ["trial_id", "label", *[a for a in self.axes if a in self.trials]]
        # A table's own column keeps its name (examples' `label` is the true class); the
        # trial's value of the same name comes in as trial_<name>.
        clash = {k: f"trial_{k}" for k in keys[1:] if k in frame.columns}
        extra = self.trials[keys].rename(columns=clash)
        joined = frame.merge(extra, on="trial_id", how="left", sort=False)
        return _in_trial_order(joined, self.trials)

    @property
    def labels(self) -> dict[str, str]:
        return dict(zip(self.trials["trial_id"], self.trials["label"], strict=True))


CORE = ("trials", "epochs", "examples", "attacks", "curves", "measures", "transfer", "pareto")
# Read only when asked for (`res.table(name)`): a row per transfer pair and example is large.
ON_REQUEST = ("transfer_examples",)


def load(path: str) -> Results:
    """Read the sweep folder `path` (<storage>/<sweep>, local or a pyarrow URI)."""
    store = SweepStore.from_dir(path, read_only=True)  # a reader moves and writes nothing
    store.check_reachable()
    recorded = store.read_manifest()
    notes = manifest.register_measures(recorded)
    trials = store.read("trials")
    if trials.empty and recorded is None:
        raise FileNotFoundError(
            f"{path}: no advlab results here (no trials/ nor sweep.json); pass a "
            "<storage>/<sweep> folder such as results/quickstart"
        )
    axes = _axes(recorded)
    trials = _ordered_trials(trials, recorded, axes)
    results = Results(
        name=store.sweep, uri=store.uri, trials=trials, manifest=recorded, axes=axes, store=store,
        epochs=pd.DataFrame(), attacks=pd.DataFrame(), curves=pd.DataFrame(),
        measures=pd.DataFrame(), transfer=pd.DataFrame(), pareto=pd.DataFrame(), notes=notes,
    )  # fmt: skip
    for name in ("epochs", "attacks", "curves", "measures"):
        setattr(results, name, results._join(store.read(name)))
    # The pareto table's own label is the one it was written with; the trials' (joined) rules.
    results.pareto = results._join(store.read("pareto").drop(columns="label"))
    for name in store.tables():
        if name not in CORE and name not in ON_REQUEST:
            results.measure_tables[name] = results._join(store.read(name))
    transfer = transfer_summary.in_order(store.read("transfer"), recorded)
    results.transfer = _label_transfer(transfer, results.labels)
    results.notes += store.damaged
    return results


def _with_suffix(frame: pd.DataFrame, suffix: str) -> pd.DataFrame:
    if "trial_id" not in frame:
        return frame
    return frame.assign(trial_id=frame["trial_id"].astype("string") + suffix)


def _manifest_with_suffix(recorded: dict[str, Any], suffix: str) -> dict[str, Any]:
    versions = [
        v | {"trial_ids": [t + suffix for t in v.get("trial_ids", [])]}
        for v in recorded.get("versions", [])
    ]
    trials = {t + suffix: v for t, v in (recorded.get("trials") or {}).items()}
    return recorded | {"versions": versions, "trials": trials}


def _axes(recorded: dict[str, Any] | None) -> list[str]:
    versions = (recorded or {}).get("versions") or []
    return list(dict.fromkeys(a for v in versions for a in v.get("axes", [])))


def _ordered_trials(
    trials: pd.DataFrame, recorded: dict[str, Any] | None, axes: list[str]
) -> pd.DataFrame:
    """Trials in the manifest's order with its labels (over every version's grid), and a column
    per grid axis that is no trials column of its own (a model_args key)."""
    order = manifest.trial_order(recorded)
    labels = manifest.labels(recorded)
    configurations = manifest.labels(recorded, without=("seed",))
    rank = {t: i for i, t in enumerate(order)}
    trials = trials.assign(
        configuration=[configurations.get(t, t) for t in trials["trial_id"]],
        label=[
            labels.get(t, lab) for t, lab in zip(trials["trial_id"], trials["label"], strict=True)
        ],
        _rank=[rank.get(t, len(rank)) for t in trials["trial_id"]],
    )
    trials = trials.sort_values(["_rank", "trial_index"], kind="stable").drop(columns="_rank")
    for axis in axes:
        if axis not in trials:
            values = (recorded or {}).get("trials", {})
            trials[axis] = [
                _text(values.get(t, {}).get("values", {}).get(axis)) for t in trials["trial_id"]
            ]
    return trials.reset_index(drop=True)


def _text(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _in_trial_order(frame: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    rank = {t: i for i, t in enumerate(trials["trial_id"])}
    order = frame["trial_id"].map(rank).fillna(len(rank))
    return (
        frame.assign(_rank=order)
        .sort_values("_rank", kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


def _label_transfer(frame: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    return frame.assign(
        source_label=frame["source_trial"].map(lambda t: labels.get(t, t)),
        target_label=frame["target"].map(lambda t: labels.get(t, t)),
    )


def sweeps(storage: str) -> list[dict[str, Any]]:
    """Every sweep folder under a storage root: name, trials ok / failed / stopped / expected,
    and notes on what could not be read. Reads only: nothing is moved or written."""
    return [_sweep_counts(store) for store in list_sweeps(storage)]


def _sweep_counts(store: SweepStore) -> dict[str, Any]:
    """One row of `sweeps`; `notes` says what could not be read (a damaged sweep.json: its
    trials are counted from the trials table, as the sweep's current ones)."""
    recorded = store.read_manifest()
    trials = store.read("trials", ["trial_id", "status"])
    status = dict(zip(trials["trial_id"], trials["status"], strict=True))
    current = manifest.current_ids(recorded) if recorded is not None else list(status)
    return {
        "sweep": store.sweep,
        "versions": len((recorded or {}).get("versions", [])),
        "trials": len(current),
        "ok": sum(status.get(t) == Status.OK for t in current),
        "failed": sum(status.get(t) == Status.FAILED for t in current),
        "stopped": sum(status.get(t) == Status.STOPPED for t in current),
        "missing": sum(t not in status for t in current),
        "older": len(set(status) - set(current)),
        "notes": list(store.damaged),
    }
