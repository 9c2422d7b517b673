"""Sweep files: YAML -> validated SweepSpec -> one TrialSpec per grid point.

A sweep file holds sweep-level keys (name, grid, resources, storage, wandb, ...) and trial-level
keys (everything in TrialSpec) as the base of every trial. `grid` maps trial keys, dotted for
nested ones (`train.lr`), to lists of values; the grid is their cartesian product. `cases` is a
list of named combinations that a product cannot express (Table 1's model-and-decay pairs); the
trials are every case crossed with every grid point. Every grid
point is validated here, before any work starts, and every user mistake becomes a SpecError whose
message is one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advlab.attacks import registry as attack_registry
from advlab.controls import CONTROLS
from advlab.data import DataError, parse_subset, validate_dataset_source
from advlab.models import ModelNameError, build_model, decay_weights, parse_architecture

NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
INPUT_SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


class SpecError(ValueError):
    """A mistake in a sweep file or command line; str() is the one-line message for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    name: str = "digits"
    root: str | None = None  # a local folder of the standard files; None downloads (or embeds)
    split_seed: int = 0  # fixes P1/P2 and fractions across trials, unlike the trial seed


ADVERSARIAL_METHODS = ("none", "fgsm", "pgd", "pool", "trades", "fast", "free")
# Which methods read each of the newer settings; moving one off its default for another method
# is a mistake the sweep file should hear about (the older settings stay lenient so existing
# files keep working). Defaults, not "was it given", decide: a spec is dumped with every field
# and validated again on the Ray worker.
_USED_BY = {
    "step_scale": ("pgd", "trades", "fast", "free"),
    "beta": ("trades",),
    "replays": ("free",),
    "warmup_epochs": ("fgsm", "pgd", "pool", "trades", "fast", "free"),
}


class AdversarialTrainingSpec(_Strict):
    """How training uses adversarial examples (advlab.adversarial_training): fgsm, pgd, fast and
    free minimise J = mix*J(x) + (1-mix)*J(x_adv), trades CE(f(x), y) + beta * KL(f(x) || f(x')),
    pool trains on a pool of examples; eps warms up, and steps follow the epoch's eps."""

    method: Literal[ADVERSARIAL_METHODS] = "none"  # type: ignore[valid-type]
    eps: float = Field(0.1, ge=0)  # Linf budget of the training perturbations (the target)
    mix: float = Field(0.5, ge=0, le=1)  # weight of the clean loss
    pgd_steps: int = Field(10, ge=1)  # inner steps of pgd and trades
    # Step size as a multiple of the epoch's budget; None: pgd/trades 2.5/pgd_steps (Madry et
    # al.), fast 1.25 (Wong et al. 2020), free 1.0 (Shafahi et al. 2019).
    step_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    beta: float = Field(6.0, ge=0, allow_inf_nan=False)  # TRADES' weight of the KL term
    replays: int = Field(4, ge=1)  # free training: optimizer steps per minibatch (m)
    warmup_epochs: int = Field(0, ge=0)  # the budget grows linearly, reaching eps at this epoch
    pool_size: int = Field(1000, ge=1)  # the paper's pool (section 4.2)
    pool_refresh: float = Field(0.1, ge=0, le=1)  # fraction replaced after each epoch
    pool_layers: list[int] = [0]  # 0: inputs; k: outputs of hidden layer k (one pool each)

    @field_validator("eps")
    @classmethod
    def _eps_finite(cls, value: float) -> float:
        if math.isnan(value):
            raise ValueError("eps must be a number >= 0")
        return value

    @field_validator("pool_layers")
    @classmethod
    def _layers_valid(cls, value: list[int]) -> list[int]:
        if not value or any(layer < 0 for layer in value) or len(set(value)) != len(value):
            raise ValueError("give distinct layers >= 0 (0 is the input)")
        return value

    @model_validator(mode="after")
    def _settings_fit_the_method(self) -> AdversarialTrainingSpec:
        if self.method == "none":
            return self  # standard training ignores every adversarial setting, as it always did
        fields = type(self).model_fields
        for key, methods in _USED_BY.items():
            if getattr(self, key) != fields[key].default and self.method not in methods:
                raise ValueError(
                    f"{key}: method {self.method} does not use it (only {', '.join(methods)}); "
                    "drop it or set it in the cases that use it"
                )
        if self.method == "trades" and self.mix != fields["mix"].default:
            raise ValueError("mix: trades weighs its terms with beta; drop mix")
        return self


class ValidationSpec(_Strict):
    """Robust validation (Rice et al. 2020): PGD robust error on a slice held out of the
    training subset, every `every` epochs; `keep: best` evaluates the weights of the epoch with
    the lowest robust validation error instead of the last (early stopping against robust
    overfitting)."""

    fraction: float = Field(0.0, ge=0, lt=1)  # of the training subset; 0: no validation
    every: int = Field(1, ge=1)  # epochs between validations; the last epoch always validates
    eps: float | None = Field(None, ge=0, allow_inf_nan=False)  # None: train.adversarial.eps
    steps: int = Field(10, ge=1)  # PGD steps (step 2.5 * eps / steps, one random start)
    keep: Literal["best", "last"] = "best"


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    ae_epochs: int = Field(5, ge=0)  # autoencoder pretraining epochs, ae<h>-K models only
    eval_every: int = Field(1, ge=0)  # epochs between test-error evaluations; 0: the last only
    adversarial: AdversarialTrainingSpec = AdversarialTrainingSpec()
    validation: ValidationSpec = ValidationSpec()

    @model_validator(mode="after")
    def _warmup_ends_in_training(self) -> TrainSpec:
        warmup = self.adversarial.warmup_epochs
        if warmup > self.epochs:
            raise ValueError(
                f"adversarial.warmup_epochs: {warmup} is more than epochs ({self.epochs}), so "
                "the target eps would never be reached; lower it"
            )
        return self


class AttackSpec(BaseModel):
    """One attack of a trial: a registered attack's name, its budgets, and its own settings.

    Budgets are in `norm` (the attack's default when None; see advlab.attacks.registry). The
    attack's settings (steps, loss, candidates, ...) sit beside `name` in the sweep file and are
    validated against the attack's own settings model; only the ones given are stored, so the
    trial id does not change when an attack gains a new setting with a default.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    label: str | None = None  # the name in results; defaults to `name`
    eps: list[float] | None = None  # budgets; None uses the trial's `eps`
    norm: str | None = None
    target: str | None = None  # a target mode the attack supports; None: its default

    @field_validator("eps", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return [value] if _is_number(value) else value

    @field_validator("eps")
    @classmethod
    def _budgets_valid(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else _check_budgets(value)

    @model_validator(mode="after")
    def _fits_the_attack(self) -> AttackSpec:
        try:
            defn = attack_registry.get(self.name)
        except attack_registry.AttackError as err:
            raise ValueError(f"name: {err}") from None
        if self.norm is not None and self.norm not in defn.norms:
            raise ValueError(f"norm: {self.name} takes {_or(defn.norms)}; got {self.norm!r}")
        if self.target is not None and self.target not in defn.targets:
            raise ValueError(f"target: {self.name} takes {_or(defn.targets)}; got {self.target!r}")
        attack_registry.validate_settings(defn, dict(self.__pydantic_extra__ or {}))
        return self

    @property
    def defn(self) -> attack_registry.AttackDef:
        return attack_registry.get(self.name)

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def budget_norm(self) -> str:
        return self.norm or self.defn.default_norm

    @property
    def target_mode(self) -> str:
        return self.target or self.defn.default_target

    @property
    def settings(self) -> attack_registry.Settings:
        """The attack's settings, defaults filled in."""
        return attack_registry.validate_settings(self.defn, dict(self.__pydantic_extra__ or {}))


def _check_budgets(value: list[float]) -> list[float]:
    for eps in value:
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"budget {eps} must be a finite number >= 0")
    return sorted(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _or(items: tuple[str, ...]) -> str:
    return " or ".join(repr(i) for i in items)


class PropertiesSpec(_Strict):
    """The paper's other properties, each switched on per sweep (sections 3 and 4.3)."""

    lipschitz: bool = True  # per-layer upper Lipschitz bounds and their product
    unit_analysis: bool = False  # natural vs random directions, scored by label purity
    units: int = Field(8, ge=1)
    top_k: int = Field(9, ge=2)
    density: bool = False  # kNN distance to the training set: clean, adversarial, noise
    density_k: int = Field(5, ge=1)
    density_pca: int = Field(0, ge=0)  # > 0: also the residual off the top principal components


class TrialSpec(_Strict):
    """Everything that decides a trial's numbers. Any key may be a grid axis."""

    dataset: DatasetSpec = DatasetSpec()
    model: str = "fc10"
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    subset: str = "all"
    weight_decay: float | list[float] = 0.0  # one lambda, or one per layer
    seed: int = 0
    train: TrainSpec = TrainSpec()
    eps: list[float] = [0.1, 0.2]  # default budgets for every attack
    attack_examples: int = Field(100, ge=1)  # first N correctly classified test examples
    attacks: list[AttackSpec] = [AttackSpec(name="fgsm"), AttackSpec(name="lbfgs")]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    properties: PropertiesSpec = PropertiesSpec()
    # PGD with restarts, a minimum-norm attack and a whole-box PGD probe, added beside the
    # sweep's attacks (labelled strong_*) to check for gradient masking; auto: when the model
    # is adversarially trained.
    strong_attacks: Literal["auto", "always", "never"] = "auto"

    @field_validator("eps", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return [value] if _is_number(value) else value

    @field_validator("eps")
    @classmethod
    def _budgets_valid(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one budget")
        return _check_budgets(value)

    @field_validator("weight_decay")
    @classmethod
    def _decay_valid(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values or any(math.isnan(v) or v < 0 for v in values):
            raise ValueError("weight decay must be >= 0 (one lambda or one per layer)")
        return value

    @field_validator("attacks")
    @classmethod
    def _attack_keys_unique(cls, value: list[AttackSpec]) -> list[AttackSpec]:
        keys = [a.key for a in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"attack names repeat ({keys}); give repeated attacks a `label`")
        return value

    def budgets(self, attack: AttackSpec) -> list[float]:
        return attack.eps if attack.eps is not None else self.eps

    def trial_id(self) -> str:
        """Stable id from the trial's content, so a rerun of the same grid point replaces it."""
        return _content_hash(self.model_dump(mode="json", exclude_defaults=True))

    def training_key(self) -> str:
        """Id of the trained model: trials that differ only in evaluation share it."""
        content = self.model_dump(mode="json", include=set(TRAINING_KEYS), exclude_defaults=True)
        return _content_hash(content)


TRAINING_KEYS = ("dataset", "model", "activation", "subset", "weight_decay", "seed", "train")
# Part of every id. Ids hash only the values that differ from their defaults, so a new setting
# with a default leaves existing ids (and finished trials) alone; changing what an existing
# default means must bump this instead.
SPEC_VERSION = 2


def _content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps({"spec_version": SPEC_VERSION, **content}, sort_keys=True)
    return hashlib.sha1(canonical.encode()).hexdigest()[:10]


class ResourcesSpec(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class WandbSpec(_Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "advlab"
    entity: str | None = None


class TransferSpec(_Strict):
    """The all-pairs transfer stage run after the trials (Tables 2 and 4 of the paper)."""

    enabled: bool = True
    controls: list[Literal[CONTROLS]] = ["logistic", "linear_svm", "random_forest", "knn"]  # type: ignore[valid-type]
    noise: bool = True  # Gaussian noise with each example's own per-pixel rms distortion
    noise_stddev: list[float] = []  # the paper's fixed-stddev noise rows on clean test images
    amplify_rms: list[float] = [0.1]  # perturbations rescaled to these per-pixel rms values
    control_max_train: int = Field(10000, ge=10)  # subsample for the slow controls (rbf_svm)
    seed: int = 0

    @field_validator("amplify_rms", "noise_stddev")
    @classmethod
    def _rms_valid(cls, value: list[float]) -> list[float]:
        if any(math.isnan(v) or not 0 < v <= 1 for v in value):
            raise ValueError("each rms must be in (0, 1]")
        return value


class SweepSettings(_Strict):
    name: str
    grid: dict[str, list[Any]] = {}
    cases: list[dict[str, Any]] = []  # each a set of dotted trial keys applied together
    resources: ResourcesSpec = ResourcesSpec()
    storage: str = "results"
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(3, ge=0)  # retries of a trial whose worker or node was lost
    checkpoint_every: int = Field(5, ge=0)  # epochs between training checkpoints; 0: none
    wandb: WandbSpec = WandbSpec()
    transfer: TransferSpec = TransferSpec()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_." for ch in value) or value[0] == ".":
            raise ValueError("use letters, digits, '-', '_' or '.' (it names a folder)")
        return value


SWEEP_KEYS = set(SweepSettings.model_fields)
TRIAL_KEYS = set(TrialSpec.model_fields)


class SweepSpec:
    """A validated sweep: its settings and the trial spec of every grid point, in grid order."""

    def __init__(
        self, settings: SweepSettings, trials: list[TrialSpec], definition: dict[str, Any]
    ):
        self.settings = settings
        self.trials = trials
        self.definition = definition  # the sweep file's mapping, overrides applied
        values = [{"model": t.model, **self.grid_values(t)} for t in trials]
        self.labels = trial_labels(values, self.ids)

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


def trial_labels(values: list[dict[str, Any]], ids: list[str]) -> dict[str, str]:
    """A readable name per trial from the grid values that vary, e.g. `fc10 wd=0.0001 p1 seed0`.

    The id stays the key everywhere; a label is for people (progress lines, W&B run names,
    report legends). Where labels would repeat, the id's first characters tell them apart.
    """
    varying = [a for a in (values[0] if values else {}) if len({_text(v[a]) for v in values}) > 1]
    labels = [" ".join(axis_text(a, v[a]) for a in varying) or _text(v["model"]) for v in values]
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
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{_text(v)}" for k, v in value.items())
    return str(value)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; `overrides` (dotted keys from the command line) win."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep file; pass the path of a YAML sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep file must be a mapping of keys (name, grid, ...)")
    try:
        for key, value in (overrides or {}).items():
            _set_dotted(raw, key, value)
        return parse_sweep(raw)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def parse_sweep(raw: dict[str, Any]) -> SweepSpec:
    for key in raw:
        if key not in SWEEP_KEYS | TRIAL_KEYS:
            raise SpecError(f"{key}: unknown key{_did_you_mean(key, SWEEP_KEYS | TRIAL_KEYS)}")
    settings = _validate(SweepSettings, {k: v for k, v in raw.items() if k in SWEEP_KEYS})
    base = {k: v for k, v in raw.items() if k in TRIAL_KEYS}
    for axis, values in settings.grid.items():
        _check_axis(f"grid.{axis}", axis)
        if not values:
            raise SpecError(f"grid.{axis}: empty list; give at least one value or drop the axis")
    for number, case in enumerate(settings.cases):
        for key in case:
            _check_axis(f"cases.{number}.{key}", key)
    points = [
        point
        for case_base in _apply_cases(base, settings.cases)
        for point in expand_grid(case_base, settings.grid)
    ]
    trials = [_validate_trial(point) for point in points]
    ids = [t.trial_id() for t in trials]
    if len(set(ids)) != len(ids):
        raise SpecError("grid: two grid points give the same trial; remove repeated values")
    return SweepSpec(settings, trials, copy.deepcopy(raw))


def _check_axis(where: str, axis: str) -> None:
    head = axis.split(".")[0]
    if head not in TRIAL_KEYS:
        raise SpecError(f"{where}: not a trial key{_did_you_mean(head, TRIAL_KEYS)}")


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
            _set_dotted(point, axis, copy.deepcopy(value))
        points.append(point)
    return points


def _validate_trial(point: dict[str, Any]) -> TrialSpec:
    trial = _validate(TrialSpec, point)
    try:
        validate_dataset_source(trial.dataset.name, trial.dataset.root)
        parse_subset(trial.subset)
        arch = parse_architecture(trial.model)
    except (DataError, ModelNameError) as err:  # their messages already name the key
        raise SpecError(str(err)) from None
    classes = NUM_CLASSES[trial.dataset.name]
    if arch.classes is not None and arch.classes != classes:
        raise SpecError(
            f"model: '{trial.model}' ends in {arch.classes} classes but {trial.dataset.name} "
            f"has {classes}; end the name in {classes}"
        )
    if isinstance(trial.weight_decay, list):
        _check_decay_per_layer(trial, classes)
    return trial


def _check_decay_per_layer(trial: TrialSpec, classes: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(trial.model, INPUT_SHAPES[trial.dataset.name], classes)
    layers = len(decay_weights(model))
    if len(trial.weight_decay) != layers:
        raise SpecError(
            f"weight_decay: {len(trial.weight_decay)} values for {trial.model}, which has "
            f"{layers} weight layers; give {layers} values or one number"
        )


def _validate(model: type[_Strict], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_one_line(err, model)) from None


def _one_line(err: ValidationError, model: type[BaseModel]) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
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
    return f"{key}: {message} (got {first.get('input')!r})"


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


def _set_dotted(target: dict[str, Any], path: str, value: Any) -> None:
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
