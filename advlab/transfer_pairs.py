"""Which (source, target) pairs the transfer stage measures, how it cuts them into shards, and
how large it will be: plain functions of trial specs (no Ray, no torch), so the sweep file's
check and the stage itself agree.

Pairs (`transfer.pairs`):
- `all`: every source meets every trial of its data set (itself included).
- `within`: a source meets only the trials that share its value of every `transfer.within`
  key (dotted trial keys, e.g. `[subset]`: P1's examples go to P1's models only).
- `sample`: a source meets itself and `transfer.sample` other trials (of those `within` would
  allow, when `within` is given), the ones with the smallest hash of (seed, source, target).
  The same seed gives the same pairs; a sweep that grows keeps every pair whose target still
  ranks among the source's K smallest hashes (only a new target with a smaller hash displaces
  one), so growing never reshuffles the pairs.
Every source also meets every control (trained on its own training set), in every mode.

A shard is one target with at most SHARD_SOURCES of its sources: its own task and its own
files, named by a hash of everything that decides its rows, so a stage killed midway resumes
with the shards it has not written, and a grown sweep recomputes only the shards it changed
(sources are chunked in the order the sweep first listed them, so new ones join the last).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from advlab import text
from advlab.attacks.registry import MINIMIZATION
from advlab.plan import attack_plan
from advlab.spec import SpecError, TrialSpec
from advlab.sweep_settings import TransferSpec
from advlab.tables import NOISE_SOURCE

# Sources per shard: bounds what one task holds and the work a killed stage loses, while a
# shard still loads its target's model (or fits its control) once for many sources.
SHARD_SOURCES = 128
# Settings that decide a shard's rows; pairs, within, sample and max_pairs only choose shards.
# Per-example rows one stage writes at most (transfer.per_example): beyond, fewer pairs.
MAX_EXAMPLE_ROWS = 20_000_000
ROW_SETTINGS = ("noise", "noise_stddev", "amplify_rms", "control_max_train", "seed", "per_example")


def data_of(spec: TrialSpec) -> str:
    """The data set a trial reads, as its images and labels are (normalisation lives inside
    the model): a model is a transfer target only of examples made on its own data set, since
    other images differ in shape or in what their labels mean."""
    return json.dumps(spec.dataset.model_dump(mode="json", exclude={"normalize"}), sort_keys=True)


def training_set(spec: TrialSpec) -> str:
    """What a control trains on: the same data set, subset and split as the trial."""
    return json.dumps([spec.dataset.model_dump(mode="json"), spec.subset], sort_keys=True)


def value_at(spec: TrialSpec, key: str) -> str:
    """A trial's value of a dotted key, as canonical JSON (so lists and numbers compare)."""
    value: Any = spec.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return json.dumps(value, sort_keys=True)


def pair_rank(seed: int, source: str, target: str) -> int:
    """A target's place in a source's sample: a hash, so it depends on nothing else."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def trial_targets(specs: dict[str, TrialSpec], settings: TransferSpec) -> dict[str, list[str]]:
    """Each source's trial targets (in `specs` order), as `settings.pairs` chooses them."""
    keys = {
        tid: (data_of(spec), *(value_at(spec, k) for k in settings.within))
        for tid, spec in specs.items()
    }
    groups: dict[tuple[str, ...], list[str]] = {}
    for tid, key in keys.items():
        groups.setdefault(key, []).append(tid)
    chosen = {}
    for source, key in keys.items():
        group = groups[key]
        if settings.pairs == "sample":
            others = sorted(
                (t for t in group if t != source),
                key=lambda t: pair_rank(settings.seed, source, t),
            )[: settings.sample]
            picked = {source, *others}
            group = [t for t in group if t in picked]
        chosen[source] = group
    return chosen


@dataclass(frozen=True)
class Shard:
    """One task: a target (a trial, or a control fitted on `fit_on`'s training set) and the
    sources whose examples it classifies. `key` is what decides its rows beyond the sources'
    attack runs (a trial target's training key; a control's training set)."""

    target: str
    target_kind: str  # trial or control
    fit_on: str  # the trial whose spec builds the target (itself, or a control's group's first)
    sources: tuple[str, ...]
    key: str

    def shard_id(self, runs: dict[str, list[str]], settings: TransferSpec) -> str:
        """The hash its files are named by: equal exactly when its rows would be."""
        content = {
            "target": [self.target, self.target_kind, self.key],
            "sources": [[s, runs.get(s, [])] for s in self.sources],
            "settings": {k: v for k, v in settings.model_dump(mode="json").items()
                         if k in ROW_SETTINGS},
        }  # fmt: skip
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def chunks(items: list[str]) -> list[tuple[str, ...]]:
    size = SHARD_SOURCES
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def plan_shards(
    specs: dict[str, TrialSpec],
    keys: dict[str, str],
    settings: TransferSpec,
    noise: bool = False,
) -> list[Shard]:
    """Every shard of the stage. `specs` are the sources in the order the sweep first listed
    them; `keys` their models' training keys; `noise`: the fixed-stddev noise rows exist (they
    join the first shard of every trial target of the first trial's data, and the controls of
    the first training set)."""
    first_data = data_of(next(iter(specs.values()))) if specs else ""
    fed: dict[str, list[str]] = {t: [] for t in specs}
    for source, targets in trial_targets(specs, settings).items():
        for target in targets:
            fed[target].append(source)
    shards = []
    for target, sources in fed.items():
        extra = [NOISE_SOURCE] if noise and data_of(specs[target]) == first_data else []
        key = keys.get(target) or specs[target].training_key()
        for part in chunks(extra + sources):
            shards.append(Shard(target, "trial", target, part, key))
    groups: dict[str, list[str]] = {}
    for tid, spec in specs.items():
        groups.setdefault(training_set(spec), []).append(tid)
    for number, (fit_set, members) in enumerate(groups.items()):
        extra = [NOISE_SOURCE] if noise and number == 0 else []
        for name in settings.controls:
            shards += [
                Shard(name, "control", members[0], part, fit_set)
                for part in chunks(extra + members)
            ]
    return shards


def first_seen(manifest: dict[str, Any] | None, ids: Iterable[str]) -> list[str]:
    """`ids` in the order the sweep's versions first listed them (oldest version first, each in
    its grid order), then any it never listed: a grown sweep's new trials come last."""
    wanted = list(ids)
    order = [t for v in (manifest or {}).get("versions", []) for t in v.get("trial_ids", [])]
    rank = {t: i for i, t in reversed(list(enumerate(order)))}
    return sorted(wanted, key=lambda t: (rank.get(t, len(rank)), t))


@dataclass
class Estimate:
    trials: int
    pairs: int  # source-target pairs, controls included
    rows: int  # rows of the transfer table
    example_rows: int  # rows of transfer_examples, were per_example on


def sets_of(spec: TrialSpec, settings: TransferSpec) -> list[int]:
    """The examples of each set a trial's examples make (adversarial, noise, amplified) per
    attack run and budget; amplified sets hold the fooled ones only, counted here in full."""
    kinds = 1 + int(settings.noise) + len(settings.amplify_rms)
    runs = sum(
        1 if a.defn.kind == MINIMIZATION else len(spec.budgets(a)) for a in attack_plan(spec)
    )
    return [spec.attack_examples] * (runs * kinds)


def estimate(trials: list[TrialSpec], settings: TransferSpec) -> Estimate:
    """The stage's size over these trials (a search's samples as their grid points)."""
    specs = {f"{i}": spec for i, spec in enumerate(trials)}
    targets = trial_targets(specs, settings)
    pairs = rows = example_rows = 0
    for source, spec in specs.items():
        sizes = sets_of(spec, settings)
        meets = len(targets[source]) + len(settings.controls)
        pairs += meets
        rows += meets * len(sizes)
        example_rows += meets * sum(sizes)
    if settings.noise_stddev and trials:
        same = sum(data_of(t) == data_of(trials[0]) for t in trials)
        meets = same + len(settings.controls)
        rows += meets * len(settings.noise_stddev)
        example_rows += meets * len(settings.noise_stddev) * max(t.attack_examples for t in trials)
    return Estimate(len(trials), pairs, rows, example_rows)


def check_size(trials: list[TrialSpec], settings: TransferSpec) -> None:
    """Refuse, before any trial runs, a stage larger than `max_pairs`, with its size and the
    setting that fits; also a `within` key no trial has."""
    if not settings.enabled or not trials:
        return
    for key in settings.within:
        try:
            value_at(trials[0], key)
        except KeyError:
            raise SpecError(
                f"transfer.within: {key!r} is no trial key; use a grid axis such as subset, "
                "model or weight_decay (dotted for nested keys: dataset.name)"
            ) from None
    size = estimate(trials, settings)
    if settings.per_example and size.example_rows > MAX_EXAMPLE_ROWS:
        raise SpecError(
            f"transfer.per_example: {size.example_rows:,} rows over "
            f"{text.count(size.trials, 'trial')}, over the {MAX_EXAMPLE_ROWS:,} one stage writes; "
            "set transfer.per_example: false (the per-pair table keeps the counts) or fewer pairs"
        )
    if size.pairs <= settings.max_pairs:
        return
    fits = max(1, settings.max_pairs // size.trials - len(settings.controls) - 1)
    sampled = estimate(trials, settings.model_copy(update={"pairs": "sample", "sample": fits}))
    raise SpecError(
        f"transfer.pairs: {settings.pairs} over {text.count(size.trials, 'trial')} makes "
        f"{size.pairs:,} source-target pairs ({size.rows:,} rows), over transfer.max_pairs "
        f"({settings.max_pairs:,}); set transfer.pairs: sample with transfer.sample: {fits} "
        f"({sampled.pairs:,} pairs), or transfer.enabled: false"
    )
