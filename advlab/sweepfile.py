"""Sweep files: YAML -> validated SweepSpec -> one TrialSpec per grid point.

A sweep file holds sweep-level keys (name, grid, resources, storage, wandb, ...) and trial-level
keys (everything in TrialSpec) as the base of every trial. `grid` maps trial keys, dotted for
nested ones (`train.lr`), to lists of values; the grid is their cartesian product. `cases` is a
list of named combinations that a product cannot express (Table 1's model-and-decay pairs); the
trials are every case crossed with every grid point. Every grid point is validated here, before
any work starts, and every user mistake becomes a SpecError whose message is one line naming
the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError

from advlab.data import FACTS, DataError, parse_subset
from advlab.evaluate import final_metrics
from advlab.families import TORCH, resolve
from advlab.models import (
    ModelNameError,
    build_model,
    check_decays,
    model_settings,
    parse_architecture,
)
from advlab.plan import check_needs
from advlab.robustbench_models import check_robustbench
from advlab.sources import check_source
from advlab.spec import (
    EVALUATION_KEYS,
    TRIAL_KEYS,
    SpecError,
    TrialSpec,
)
from advlab.sweep_settings import SWEEP_KEYS, SweepSettings
from advlab.text import value_text
from advlab.train import EpochStats
from advlab.yamlfile import YAMLRefused, load_file


class SweepSpec:
    """A validated sweep: its settings and the trial spec of every grid point, in grid order."""

    def __init__(
        self,
        settings: SweepSettings,
        trials: list[TrialSpec],
        definition: dict[str, Any],
        plugin_dirs: list[str] | None = None,
        source: str | None = None,
    ):
        self.settings = settings
        self.source = source  # the sweep file it was read from (absolute), None from Python
        self.probes: list[Probe] = []  # trials its search may draw, checked like grid points
        self.trials = trials
        self.definition = definition  # the sweep file's mapping, overrides applied
        # Folders whose modules (your models, data loaders, attacks) every worker must import.
        self.plugin_dirs = plugin_dirs or []
        values = [{"model": t.model, **self.grid_values(t)} for t in trials]
        self.labels = trial_labels(values, self.ids)

    @property
    def choices(self) -> dict[str, list[Any]]:
        """Each path-valued choice of the search space as its trials read it: relative to the
        sweep file's folder, made absolute (a worker runs elsewhere)."""
        resolved: dict[str, list[Any]] = {}
        for probe in self.probes:
            key = probe.key.removeprefix("search.space.")
            kind = next(iter(self.settings.search.space[key]))
            if kind == "choice" and key in PATH_KEYS:
                value = _get_dotted(probe.trial.model_dump(mode="json"), key)
                resolved.setdefault(key, []).append(value)
        return resolved

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def axes(self) -> list[str]:
        """Every dotted key that varies between trials: case keys, then grid axes."""
        keys = [key for case in self.settings.cases for key in case]
        return list(dict.fromkeys([*keys, *self.settings.grid]))

    @property
    def ids(self) -> list[str]:
        return [t.trial_id() for t in self.trials]

    def grid_values(self, trial: TrialSpec) -> dict[str, Any]:
        """The values a trial takes on each case key and grid axis, keyed by dotted path."""
        dumped = trial.model_dump(mode="json")
        return {axis: _get_dotted(dumped, axis) for axis in self.axes}


def trial_labels(
    values: list[dict[str, Any]], ids: list[str], unique: bool = True
) -> dict[str, str]:
    """A readable name per trial from the grid values that vary, e.g. `fc10 wd=0.0001 p1 seed0`.

    The id stays the key everywhere; a label is for people (progress lines, W&B run names,
    report legends). Where labels would repeat, the id's first characters tell them apart
    (unless `unique` is off: trials repeated over seeds share their configuration's name).
    """
    varying = [a for a in (values[0] if values else {}) if len({_text(v[a]) for v in values}) > 1]
    labels = [" ".join(axis_text(a, v[a]) for a in varying) or _text(v["model"]) for v in values]
    if not unique:
        return dict(zip(ids, labels, strict=True))
    counts = {label: labels.count(label) for label in labels}
    return {
        tid: label if counts[label] == 1 and label else f"{label} [{tid[:6]}]".lstrip()
        for tid, label in zip(ids, labels, strict=True)
    }


def axis_text(axis: str, value: Any) -> str:
    """One grid value as a label part: bare for model and subset, `seed3`, `wd=1e-4`, `lr=0.1`."""
    leaf = axis.rsplit(".", 1)[-1]
    if leaf in ("model", "subset"):
        return _text(value)
    if leaf == "seed":
        return f"seed{value}"
    return f"{'wd' if leaf == 'weight_decay' else leaf}={_text(value)}"


def _text(value: Any) -> str:
    return value_text(value, sep=",", missing="None")


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; `overrides` (dotted keys from the command line) win."""
    path = Path(path)
    if not path.is_file():
        what = "is no regular file" if path.exists() else "no such sweep file"  # a FIFO blocks
        raise SpecError(f"{path}: {what}; pass the path of a YAML sweep file")
    try:
        raw = load_file(path)
    except YAMLRefused as err:
        raise SpecError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep file must be a mapping of keys (name, grid, ...)")
    folder = path.resolve().parent
    add_plugin_dirs([str(folder)])  # modules beside the sweep file import, here and on workers
    try:
        for key, value in (overrides or {}).items():
            set_override(raw, key, value)
        spec = parse_sweep(raw, folder)
        spec.source = str(path.resolve())
        return spec
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def add_plugin_dirs(folders: list[str]) -> None:
    """Put folders on sys.path (first) so `module:function` names in sweeps import."""
    for folder in reversed(folders):
        if folder not in sys.path and Path(folder).is_dir():
            sys.path.insert(0, folder)


def parse_sweep(raw: dict[str, Any], base_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep given as a mapping (a sweep file's contents, or a dict from Python);
    relative paths inside it are relative to `base_dir` (the sweep file's folder)."""
    for key in raw:
        if key in RETIRED:
            raise SpecError(f"{key}: replaced by measures; {RETIRED[key]}")
        if key not in SWEEP_KEYS | TRIAL_KEYS:
            raise SpecError(f"{key}: unknown key{_did_you_mean(key, SWEEP_KEYS | TRIAL_KEYS)}")
    settings = _validate(SweepSettings, {k: v for k, v in raw.items() if k in SWEEP_KEYS})
    settings = settings.model_copy(update={"storage": storage_from(settings.storage, base_dir)})
    base = {k: v for k, v in raw.items() if k in TRIAL_KEYS}
    for axis, values in settings.grid.items():
        _check_axis(f"grid.{axis}", axis)
        if not values:
            raise SpecError(f"grid.{axis}: empty list; give at least one value or drop the axis")
    for number, case in enumerate(settings.cases):
        for key in case:
            _check_axis(f"cases.{number}.{key}", key)
    size = max(len(settings.cases), 1) * math.prod(len(v) for v in settings.grid.values())
    if size > MAX_TRIALS:
        raise SpecError(
            f"grid: {size} trials; a sweep holds at most {MAX_TRIALS} (each is validated before "
            "anything runs); split it, or sample it with search: {algorithm: random}"
        )
    points = [
        point
        for case_base in _apply_cases(base, settings.cases)
        for point in expand_grid(case_base, settings.grid)
    ]
    trials = [_validate_trial(point, base_dir) for point in points]
    probes = _check_search(settings, points, trials, base_dir)
    ids = [t.trial_id() for t in trials]
    if len(set(ids)) != len(ids):
        raise SpecError("grid: two grid points give the same trial; remove repeated values")
    plugin_dirs = [str(base_dir)] if base_dir is not None else []
    spec = SweepSpec(settings, trials, copy.deepcopy(raw), plugin_dirs)
    spec.probes = probes
    return spec


def _check_search(
    settings: SweepSettings,
    points: list[dict[str, Any]],
    trials: list[TrialSpec],
    base_dir: Path | None,
) -> list[Probe]:
    """A search space's every bound and choice makes a valid trial, its metrics exist, and the
    scheduler's metric is reported every epoch: found now, not when a sample draws it."""
    search, scheduler = settings.search, settings.scheduler
    if search.algorithm == "optuna" and (settings.grid or settings.cases):
        raise SpecError("grid: optuna samples search.space alone; move grid axes into it as choice")
    probes = []
    for key, dist in search.space.items():
        _check_axis(f"search.space.{key}", key)
        _check_not_gridded(key, settings)
        kind, values = next(iter(dist.items()))
        for value in values if kind == "choice" else values[:2]:
            sample = value if kind != "int" else int(value)
            trial = _validate_probe(key, sample, points[0], base_dir)
            probes.append(Probe(f"search.space.{key}", sample, trial))
        if kind in ("uniform", "loguniform"):
            _check_fractions(key, kind, values, points[0], base_dir)
    produced = final_metrics(trials[0])
    for metric in search.metrics:
        if metric not in produced:
            raise SpecError(
                f"search.metric: no trial reports {metric!r}; use one of "
                f"{', '.join(sorted(produced))}"
            )
    if scheduler.name != "none":
        _check_scheduler_metric(scheduler.metric, trials)
    return probes


def _check_not_gridded(key: str, settings: SweepSettings) -> None:
    """A setting is sampled or gridded, not both: one would silently override the other (and
    grid points would repeat the same samples)."""
    axes = [*settings.grid, *(k for case in settings.cases for k in case)]
    for axis in axes:
        if axis == key or key.startswith(f"{axis}.") or axis.startswith(f"{key}."):
            where = "a grid axis" if axis in settings.grid else "set by cases"
            raise SpecError(
                f"search.space.{key}: {axis} is also {where}; sample it or grid it, not both"
            )


@dataclasses.dataclass(frozen=True)
class Probe:
    """A trial a search may draw (a choice's value, a range's end), checked before Ray starts
    as a grid point is: its data, subset, model and weights (advlab.preflight)."""

    key: str  # search.space.<setting>
    value: Any
    trial: TrialSpec


def _validate_probe(
    key: str, value: Any, point: dict[str, Any], base_dir: Path | None
) -> TrialSpec:
    try:
        return _validate_trial(expand_grid(point, {key: [value]})[0], base_dir)
    except SpecError as err:
        raise SpecError(f"search.space.{key}: {short(value)} makes no valid trial: {err}") from None


def _check_fractions(
    key: str, kind: str, values: list[Any], point: dict[str, Any], base_dir: Path | None
) -> None:
    """A uniform or loguniform range samples fractions: the setting must take them (a whole
    number setting wants {int: [low, high]})."""
    low, high = float(values[0]), float(values[1])
    inside = low + (high - low) * 0.37  # no whole number for any range of whole-number ends
    if inside.is_integer():
        inside = math.nextafter(inside, high)
    try:
        _validate_trial(expand_grid(point, {key: [inside]})[0], base_dir)
    except SpecError:
        raise SpecError(
            f"search.space.{key}: {kind} samples fractions such as {inside:.4g}, which {key} "
            f"does not take; use {{int: [{values[0]}, {values[1]}]}} for whole numbers"
        ) from None


def _check_scheduler_metric(metric: str, trials: list[TrialSpec]) -> None:
    epoch_metrics = [f.name for f in dataclasses.fields(EpochStats) if f.name != "epoch"]
    if metric not in epoch_metrics:
        raise SpecError(
            f"scheduler.metric: {metric!r} is not reported every epoch; use one of "
            f"{', '.join(epoch_metrics)}"
        )
    if metric == "test_error" and any(t.train.eval_every != 1 for t in trials):
        raise SpecError("scheduler.metric: test_error needs train.eval_every: 1 (every epoch)")
    validated = [t.train.validation for t in trials]
    if metric == "val_robust_error" and any(v.fraction == 0 or v.every != 1 for v in validated):
        raise SpecError(
            "scheduler.metric: val_robust_error needs train.validation with a fraction > 0 and "
            "every: 1 (robust validation each epoch)"
        )


def _check_axis(where: str, axis: str) -> None:
    head = axis.split(".")[0]
    if head not in TRIAL_KEYS:
        raise SpecError(f"{where}: not a trial key{_did_you_mean(head, TRIAL_KEYS)}")
    if head in EVALUATION_KEYS:
        raise SpecError(
            f"{where}: every trial runs every attack at every budget and every measure, so "
            f"{head} is no grid axis; list all budgets in `eps` and give an attack listed "
            "twice a `label`"
        )


def _apply_cases(base: dict[str, Any], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One base per case (the plain base when there are none)."""
    if not cases:
        return [base]
    return [expand_grid(base, {key: [value] for key, value in case.items()})[0] for case in cases]


def expand_grid(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid's axes, each point applied on top of the base."""
    points = []
    for combo in itertools.product(*grid.values()):
        point = copy.deepcopy(base)
        for axis, value in zip(grid, combo, strict=True):
            set_dotted(point, axis, copy.deepcopy(value))
        points.append(point)
    return points


def _validate_trial(point: dict[str, Any], base_dir: Path | None) -> TrialSpec:
    """A grid point as a TrialSpec, with the checks that need no data: the data source exists,
    the subset parses, and for built-in data and models, class counts and per-layer decays fit.
    Your own data and models are checked by advlab.preflight once the data is loaded."""
    trial = _validate(TrialSpec, _resolve_paths(point, base_dir))
    try:
        check_source(trial.dataset.name, trial.dataset.root, trial.dataset.path)
        parse_subset(trial.subset)
        if trial.init is not None and not Path(trial.init).is_file():
            raise SpecError(f"init: no file {trial.init}; give the path of a saved state_dict")
        if trial.model.startswith("robustbench:"):  # built-in data: its shape checked now
            data = FACTS.get(trial.dataset.name)
            fit = None if data is None else (_built_in_shape(trial), data.num_classes)
            check_robustbench(trial.model, trial.model_args, trial.dataset.normalize, fit)
        family = resolve(trial.model)
        if family.gradients is False or family.estimator:
            check_needs(trial, trial.model, gradients=bool(family.gradients))
        if family is not TORCH or ":" in trial.model or trial.dataset.name not in FACTS:
            return trial
        arch = parse_architecture(trial.model)
        model_settings(trial.model, trial.model_args)
    except (DataError, ModelNameError) as err:  # their messages already name the key
        raise SpecError(str(err)) from None
    classes = FACTS[trial.dataset.name].num_classes
    if arch.classes is not None and arch.classes != classes:
        raise SpecError(
            f"model: '{trial.model}' ends in {arch.classes} classes but {trial.dataset.name} "
            f"has {classes}; end the name in {classes}"
        )
    if isinstance(trial.weight_decay, list):
        _check_decay_per_layer(trial, classes)
    return trial


# Relative to the sweep file's folder.
PATH_KEYS = (
    "init", "dataset.path", "dataset.root", "model_args.pretrained", "model_args.model_dir"
)  # fmt: skip


def is_relative_path(value: object) -> bool:
    """A local path that is not absolute (URIs and ~ paths are not relative)."""
    return (
        isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute()
    )


def submitted_job() -> bool:
    """Whether this process is the entrypoint of a `ray job submit` (Ray sets the job's config,
    with its submission id, in the entrypoint's environment)."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return False
    try:
        metadata = json.loads(config).get("metadata") or {}
    except (ValueError, AttributeError):
        return False
    return bool(metadata.get("job_submission_id"))


def storage_from(storage: str, base_dir: Path | None) -> str:
    """A relative `storage` counts from the sweep file's folder, like every relative path in a
    sweep file (a sweep given as a dict: from the working directory). Under `ray job submit`
    that folder is Ray's temporary copy of the working dir, removed with the job: refused."""
    if base_dir is None or not is_relative_path(storage):
        return storage
    if submitted_job():
        raise SpecError(
            f"storage: {storage!r} is relative, and under `ray job submit` the sweep file's "
            "folder is Ray's temporary copy of the working dir (removed with the job); give "
            "an absolute path every node sees or a URI (--storage s3://BUCKET/advlab)"
        )
    return str((base_dir / storage).resolve())


def _resolve_paths(point: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Relative dataset.path, dataset.root, init, model_args.pretrained (a timm model's
    weights file) and model_args.model_dir (a robustbench: model's folder of checkpoints) are
    relative to the sweep file's folder (as `storage` is: `storage_from`)."""
    if base_dir is None:
        return point
    point = copy.deepcopy(point)
    dataset = point.get("dataset")
    args = point.get("model_args")
    # Only RobustBench's: a factory of yours may take a `model_dir` of another meaning.
    robustbench = str(point.get("model", "")).startswith("robustbench:")
    holders = [
        (point, "init"),
        *([(dataset, "path"), (dataset, "root")] if isinstance(dataset, dict) else []),
        *([(args, "pretrained")] if isinstance(args, dict) else []),  # timm's weights file
        *([(args, "model_dir")] if isinstance(args, dict) and robustbench else []),
    ]
    for holder, key in holders:
        value = holder.get(key)
        if is_relative_path(value):
            holder[key] = _absolute(base_dir / value)
    return point


def _absolute(path: Path) -> str:
    """`path` with its symlinks resolved; a symlink loop stays as written (the checks of the
    file then say it is no file, in one line, instead of a RuntimeError)."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError):
        return os.path.abspath(path)


def _check_decay_per_layer(trial: TrialSpec, classes: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(
            trial.model, _built_in_shape(trial), classes, model_args=trial.model_args
        )
    try:
        check_decays(model, trial.weight_decay, trial.model)
    except ModelNameError as err:
        raise SpecError(str(err)) from None


def _built_in_shape(trial: TrialSpec) -> tuple[int, int, int]:
    channels, height, width = FACTS[trial.dataset.name].input_shape
    side = trial.dataset.resolution
    return (channels, height, width) if side is None else (channels, side, side)


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_one_line(err, model)) from None


MAX_TRIALS = 10_000
# Keys of earlier versions, and what a sweep file says instead now.
RETIRED = {
    "properties": "write e.g. measures: [{name: lipschitz}, {name: unit_analysis}, "
    "{name: density, k: 5}, {name: masking}]",
    "strong_attacks": "write measures: [{name: lipschitz}, {name: masking, strong_attacks: "
    "always}]",
}

# pydantic names the member of a union it tried (weight_decay.float); users never wrote those.
_UNION_TAG = re.compile(r"^(float|int|str|bool|none|(list|dict|literal|function-\w+)\[.*\])$")


def _one_line(err: ValidationError, model: type[BaseModel]) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not _UNION_TAG.match(str(p))]
    key = ".".join(parts) or "(top level)"
    if first["type"] == "extra_forbidden":
        leaf = str(first["loc"][-1])
        known = _fields_at(model, [str(p) for p in first["loc"][:-1]])
        return f"{key}: unknown key{_did_you_mean(leaf, known)}"
    if first["type"] == "missing":
        return f"{key}: required; add it"
    message = first["msg"].removeprefix("Value error, ")
    # Validators name the field they refuse as "field: why"; fold it into the key.
    if (named := re.match(r"([A-Za-z_][\w.]*): (.*)", message)) is not None:
        return f"{key}.{named.group(1)}: {named.group(2)}"
    return f"{key}: {message} (got {short(first.get('input'))}){_number_hint(first.get('input'))}"


def _number_hint(value: Any) -> str:
    """YAML 1.1 reads 1e-4 (no dot, no exponent sign) as text: say so, with the spelling it
    reads as a number."""
    match = isinstance(value, str) and re.fullmatch(r"([-+]?[0-9.]+)[eE]([-+]?)([0-9]+)", value)
    if not match:
        return ""
    mantissa, sign, power = match.groups()
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    return f"; YAML reads {value} as text, write {mantissa}e{sign or '+'}{power}"


def short(value: Any, width: int = 60) -> str:
    """A value for an error message: its repr, cut to `width` (a bad value may be huge)."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 5]}...{text[-2:]}"


def _fields_at(model: type[BaseModel], path: list[str]) -> set[str]:
    """The field names valid at a nested location, for did-you-mean suggestions."""
    current: Any = model
    for part in path:
        if part.isdigit():
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return set()
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        current = inner[0] if inner else annotation
    return set(getattr(current, "model_fields", {}))


def _did_you_mean(word: str, choices: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(choices))}" if choices else ""


# Mappings whose keys are themselves dotted paths (a grid axis `model_args.channels`, a search
# dimension `train.lr`): a command-line key names one of them and then one whole key of it.
DOTTED_KEY_MAPS = ("grid", "search.space")


def set_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """One command-line override (`--set KEY=VALUE`): `grid.model_args.channels` sets the grid
    axis `model_args.channels` (any nested axis), `search.space.train.lr` the dimension
    `train.lr`; any other dotted key sets the nested key it names."""
    for prefix in DOTTED_KEY_MAPS:
        if key.startswith(prefix + ".") and len(key) > len(prefix) + 1:
            parents = prefix.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SpecError(f"{key}: '{part}' is not a mapping in the sweep file; fix it")
            node[key[len(prefix) + 1 :]] = value
            return
    set_dotted(raw, key, value)


def set_dotted(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{path}: '{part}' is not a nested mapping; use a top-level key")
        target = node
    target[leaf] = value


def _get_dotted(source: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        source = source[part]
    return source
