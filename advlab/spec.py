"""The specs: what a trial is (TrialSpec, with its attacks and measures), as pydantic models
that refuse unknown keys and bad values; how a sweep runs is advlab.sweep_settings.
advlab.sweepfile reads YAML into them.

A TrialSpec decides a trial's numbers; its id hashes the values that differ from the defaults
(plus SPEC_VERSION) and the digests of the files it reads (advlab.digests), its training key the
subset that decides the trained weights, and each attack's id that attack's settings and
budgets.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from advlab import digests, training_methods
from advlab.attacks import registry as attack_registry
from advlab.measures import registry as measure_registry
from advlab.strict import Strict
from advlab.text import is_file_name

# Seeds are stored as int64 and offset (seed + 1, + a sample count) by the code that uses them.
MAX_SEED = 2**32 - 1
# A guard against typos: the resampled copy of a data set takes N * C * r**2 * 4 bytes (60,000
# Fashion-MNIST images at 512 would be 63 GB).
MAX_RESOLUTION = 512


# The smallest std `normalize` takes: pixels in [0, 1] divided by it stay far from float32's
# overflow (3.4e38) and their gradients far from its underflow.
MIN_STD = 1e-6


class SpecError(ValueError):
    """A mistake in a sweep file or command line; str() is the one-line message for the user."""


class _Strict(BaseModel):
    model_config = Strict.model_config  # advlab.strict's rules (ruff sees the pydantic base here)


class NormalizeSpec(_Strict):
    """Per-channel standardisation done inside the model (pixels stay in [0, 1] outside it)."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _one_per_channel(self) -> NormalizeSpec:
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError("give one mean and one std per channel")
        if not all(math.isfinite(v) for v in [*self.mean, *self.std]) or min(self.std) <= 0:
            raise ValueError("means must be finite and stds finite and > 0")
        if min(self.std) < MIN_STD or max(map(abs, self.mean)) > 1 / MIN_STD:
            raise ValueError(
                f"a std below {MIN_STD:g} (or a mean beyond {1 / MIN_STD:g}) overflows float32 "
                "once pixels are divided by it; give the std of pixels in [0, 1], e.g. 0.3"
            )
        return self


class DatasetSpec(_Strict):
    """Where the data comes from (advlab.sources): a built-in name, npz, folder, module:function."""

    name: str = "digits"
    root: str | None = None  # built-in sets: a folder of the standard files; None downloads
    path: str | None = None  # npz: the file; folder: the ImageFolder root
    args: dict[str, Any] = {}  # keyword arguments of a module:function loader
    normalize: NormalizeSpec | None = None
    # Fixes P1/P2 and fractions across trials, unlike the trial seed.
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    # Images resampled to resolution x resolution pixels (advlab.resample) before training,
    # attacks, transfer and the report see them, so d = C * resolution**2; None: as stored.
    resolution: int | None = None

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_is_a_side(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (whole and 1 <= value <= MAX_RESOLUTION):
            raise ValueError(
                f"give the side in pixels, a whole number from 1 to {MAX_RESOLUTION} (e.g. 14), "
                "or null for the stored size"
            )
        return value

    # Read npz (uncompressed members, memory-mapped) or folder images per batch instead of
    # loading them (advlab.streaming); how data is read, not what it is: no part of any id.
    streaming: bool = False
    workers: int = Field(0, ge=0, le=256)  # DataLoader worker processes of a streaming set

    @model_validator(mode="after")
    def _streams_files(self) -> DatasetSpec:
        if self.streaming and self.name not in ("npz", "folder"):
            raise ValueError(
                f"streaming: reads an npz file or an image folder, not {self.name}; "
                "use name: npz or folder, or drop streaming"
            )
        if self.streaming and self.resolution is not None:
            raise ValueError(
                "resolution: a streamed data set is read per batch and not resampled; "
                "drop streaming or resolution"
            )
        if self.workers and not self.streaming:
            raise ValueError("workers: only a streaming data set has loader workers; drop it")
        return self


# Settings of DatasetSpec that decide how data is read, never the numbers (tests/test_streaming
# checks that streamed and in-memory training give the same weights): left out of every id.
READING_KEYS = {"dataset": {"streaming", "workers"}}


# The newer settings: moving one off its default for a method that does not read it (each
# method's `reads` in advlab.training_methods) is a mistake the sweep file should hear about;
# the older settings stay lenient so existing files keep working. Defaults, not "was it given",
# decide: a spec is dumped with every field and validated again on the Ray worker.
_CHECKED_SETTINGS = ("step_scale", "beta", "replays", "warmup_epochs")


class AdversarialTrainingSpec(_Strict):
    """How training uses adversarial examples (advlab.adversarial_training): fgsm, pgd, fast and
    free minimise J = mix*J(x) + (1-mix)*J(x_adv), trades CE(f(x), y) + beta * KL(f(x) || f(x')),
    pool trains on a pool of examples; eps warms up, and steps follow the epoch's eps. `method`
    names a method of advlab.training_methods (or its import path, module:object)."""

    method: str = "none"
    eps: float = Field(0.1, ge=0, le=1)  # Linf budget of the training perturbations (target)
    mix: float = Field(0.5, ge=0, le=1)  # weight of the clean loss
    pgd_steps: int = Field(10, ge=1, le=10_000)  # inner steps of pgd and trades
    # Step size as a multiple of the epoch's budget; None: the method's own (training_methods:
    # pgd/trades 2.5/pgd_steps after Madry et al., fast 1.25 after Wong et al., free 1.0).
    step_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    beta: float = Field(6.0, ge=0, le=1e6)  # TRADES' weight of the KL term
    replays: int = Field(4, ge=1, le=1000)  # free training: optimizer steps per minibatch (m)
    warmup_epochs: int = Field(
        0, ge=0, le=100_000
    )  # the budget grows linearly, reaching eps at this epoch
    pool_size: int = Field(1000, ge=1, le=10_000_000)  # the paper's pool (section 4.2)
    pool_refresh: float = Field(0.1, ge=0, le=1)  # fraction replaced after each epoch
    pool_layers: list[int] = [0]  # 0: inputs; k: outputs of hidden layer k (one pool each)

    @field_validator("method")
    @classmethod
    def _method_registered(cls, value: str) -> str:
        training_methods.get(value)  # its TrainingMethodError is a ValueError: one line
        return value

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
        method = training_methods.get(self.method)
        if not method.strict:
            return self  # standard training ignores every adversarial setting, as it always did
        fields = type(self).model_fields
        for key in _CHECKED_SETTINGS:
            if getattr(self, key) != fields[key].default and key not in method.reads:
                users = ", ".join(training_methods.reading(key))
                raise ValueError(
                    f"{key}: method {self.method} does not use it (only {users}); "
                    "drop it or set it in the cases that use it"
                )
        if method.check is not None:
            method.check(self)
        return self


class ValidationSpec(_Strict):
    """Robust validation (Rice et al. 2020): PGD robust error on a slice held out of the
    training subset, every `every` epochs; `keep: best` evaluates the weights of the epoch with
    the lowest robust validation error instead of the last (early stopping against robust
    overfitting)."""

    fraction: float = Field(0.0, ge=0, lt=1)  # of the training subset; 0: no validation
    every: int = Field(
        1, ge=1, le=100_000
    )  # epochs between validations; the last epoch always validates
    eps: float | None = Field(None, ge=0, le=1)  # None: train.adversarial.eps
    steps: int = Field(10, ge=1, le=10_000)  # PGD steps (step 2.5 * eps / steps, one start)
    keep: Literal["best", "last"] = "best"


class AugmentSpec(_Strict):
    """Standard augmentation of each training batch (advlab.augment), drawn from the trial's
    seeded generator: off by default."""

    crop_padding: int = Field(0, ge=0, le=64)  # random crop of the image padded by this, zeros
    flip: bool = False  # horizontal flip with probability 1/2


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=0, le=100_000)  # 0: evaluate the `init` weights untrained
    batch_size: int = Field(64, ge=1, le=10_000_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0, le=1e6)
    # The learning rate per epoch (advlab.train.lr_at): constant; cosine from lr down to near 0
    # at the last epoch; step: x0.1 after half the epochs and again after three quarters (the
    # piecewise decay of Madry et al. and Rice et al.).
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    momentum: float = Field(0.9, ge=0, lt=1)
    ae_epochs: int = Field(5, ge=0, le=100_000)  # autoencoder pretraining: (d|c|v)ae<h>-K models
    eval_every: int = Field(1, ge=0, le=100_000)  # epochs between test errors; 0: last only
    adversarial: AdversarialTrainingSpec = AdversarialTrainingSpec()
    validation: ValidationSpec = ValidationSpec()
    augment: AugmentSpec = AugmentSpec()
    # Training's forward passes under autocast (advlab.augment.autocast); evaluation and
    # attacks stay float32. float16 needs a GPU (with a GradScaler); bfloat16 runs on CPU too.
    precision: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _warmup_ends_in_training(self) -> TrainSpec:
        warmup = self.adversarial.warmup_epochs
        if warmup > self.epochs:
            raise ValueError(
                f"adversarial.warmup_epochs: {warmup} is more than epochs ({self.epochs}), so "
                "the target eps would never be reached; lower it"
            )
        return self


class _RunSpec(BaseModel):
    """An attack or a measure as a sweep file lists it: a registered name (or import path), a
    label that names its results, and its own settings beside them (checked by its registry)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)

    name: str
    label: str | None = None  # the name in results; defaults to the registered name

    @field_validator("label")
    @classmethod
    def _label_is_a_file_name(cls, value: str | None) -> str | None:
        if value is not None and not is_file_name(value):
            raise ValueError("use at most 64 letters, digits, '-', '_' or '.' (it names files)")
        return value


class AttackSpec(_RunSpec):
    """One attack of a trial: a registered attack's name, its budgets, and its own settings.

    Budgets are in `norm` (the attack's default when None; see advlab.attacks.registry). The
    attack's settings (steps, loss, candidates, ...) sit beside `name` in the sweep file and are
    validated against the attack's own settings model; only the ones given are stored, so the
    trial id does not change when an attack gains a new setting with a default.
    """

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
        """The attack's name in results: its label, else the registered attack's own name
        (an import path `module:ATTACK` is known by the AttackDef's name)."""
        return self.label or self.defn.name

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


class MeasureSpec(_RunSpec):
    """One measure of a trial: a registered measure's name and its own settings (beside `name`
    in the sweep file, validated against the measure's settings model; only the ones given are
    stored, so the measure's id does not change when it gains a setting with a default)."""

    @model_validator(mode="after")
    def _fits_the_measure(self) -> MeasureSpec:
        try:
            measure_registry.validate_settings(self.defn, dict(self.__pydantic_extra__ or {}))
        except measure_registry.MeasureError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def defn(self) -> measure_registry.MeasureDef:
        try:
            return measure_registry.get(self.name)
        except measure_registry.MeasureError as err:
            raise ValueError(f"name: {err}") from None

    @property
    def key(self) -> str:
        return self.label or self.defn.name

    @property
    def settings(self) -> Any:
        """The measure's settings, defaults filled in."""
        return measure_registry.validate_settings(self.defn, dict(self.__pydantic_extra__ or {}))


class TrialSpec(_Strict):
    """Everything that decides a trial's numbers. Any key may be a grid axis."""

    dataset: DatasetSpec = DatasetSpec()
    # built-in name, torchvision:<name>, timm:<name>, robustbench:<name> or module:function
    model: str = "fc10"
    model_args: dict[str, Any] = {}  # keyword arguments of the model's factory; sweepable
    init: str | None = None  # weights to start from (a state_dict .pt, loaded weights_only)
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    subset: str = "all"
    weight_decay: float | list[float] = 0.0  # one lambda, or one per layer
    seed: int = Field(0, ge=0, le=MAX_SEED)
    train: TrainSpec = TrainSpec()
    eps: list[float] = [0.1, 0.2]  # default budgets for every attack
    # First N correctly classified examples of:
    attack_examples: int = Field(100, ge=1, le=10_000_000)
    attack_split: Literal["test", "train"] = "test"  # train: the trial's training subset
    attacks: list[AttackSpec] = [AttackSpec(name="fgsm"), AttackSpec(name="lbfgs")]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Everything measured besides the attack runs (advlab.measures); None: the model family's
    # defaults (advlab.plan.DEFAULT_MEASURES).
    measures: list[MeasureSpec] | None = None

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
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("weight decay must be finite and >= 0 (one lambda or one per layer)")
        return value

    @field_validator("attacks")
    @classmethod
    def _attack_keys_unique(cls, value: list[AttackSpec]) -> list[AttackSpec]:
        keys = [a.key for a in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"attack names repeat ({keys}); give repeated attacks a `label`")
        return value

    @field_validator("measures")
    @classmethod
    def _measure_keys_unique(cls, value: list[MeasureSpec] | None) -> list[MeasureSpec] | None:
        keys = [m.key for m in value or []]
        tables = [m.defn.table for m in value or []]
        if len(set(keys)) != len(keys) or len(set(tables)) != len(tables):
            raise ValueError(f"measures repeat ({keys}); list each measure once")
        return value

    @model_validator(mode="after")
    def _float16_needs_a_gpu(self) -> TrialSpec:
        if self.device == "cpu" and self.train.precision == "float16":
            raise ValueError(
                "train.precision: float16 needs a GPU and device is cpu; use bfloat16 or float32"
            )
        return self

    @property
    def adversarially_trained(self) -> bool:
        """Whether its training method trains on perturbed inputs (advlab.training_methods)."""
        return training_methods.get(self.train.adversarial.method).adversarial

    def budgets(self, attack: AttackSpec) -> list[float]:
        return attack.eps if attack.eps is not None else self.eps

    def trial_id(self) -> str:
        """Stable id from the trial's content, so a rerun of the same grid point replaces it.

        The attacks are not part of it: a trial is a trained model and its clean evaluation,
        and attack runs are added to it (`attack_id`), so adding an attack to a sweep runs only
        that attack on the trials that already exist. The digests of its input files are
        (`input_digests`): a changed weights file, data file or model module is a new trial.
        """
        excluded = dict.fromkeys(EVALUATION_KEYS, True) | READING_KEYS
        content = self.model_dump(mode="json", exclude=excluded, exclude_defaults=True)
        return _content_hash(content | self._inputs())

    def attack_id(self, attack: AttackSpec) -> str:
        """Id of one attack run set: the attack's settings and its resolved budgets (and the
        source of its module, for an attack named by import path)."""
        content = attack.model_dump(mode="json", exclude_defaults=True)
        return _content_hash(
            {"attack": content, "budgets": self.budgets(attack)} | _module_input(attack.name)
        )

    def measure_id(self, measure: MeasureSpec, attacks: list[str] | None = None) -> str:
        """Id of one measure run: its settings and, for a measure that reads attack results,
        the ids of the attack runs it read (an attack-scope run: the one it looked at); and the
        source of its module, for a measure named by import path."""
        content = measure.model_dump(mode="json", exclude_defaults=True)
        return _content_hash(
            {"measure": content, "attacks": attacks or []} | _module_input(measure.name)
        )

    def input_digests(self) -> dict[str, str]:
        """Digests of the files this trial's training reads (advlab.digests): `init`, an npz
        or image folder, user modules. Taken once per spec object: a sweep run is one moment."""
        held = _INPUTS.get(id(self))
        if held is not None and held[0]() is self:
            return held[1]
        found = digests.trial_inputs(self)
        key = id(self)
        _INPUTS[key] = (weakref.ref(self, lambda _: _INPUTS.pop(key, None)), found)
        return found

    def _inputs(self) -> dict[str, Any]:
        """The input digests as part of an id; nothing when there are none, so trials on
        built-in data and models keep the ids they had before digests were hashed."""
        found = self.input_digests()
        return {"inputs": found} if found else {}

    @classmethod
    def from_stored(cls, text: str) -> TrialSpec:
        """A spec stored as JSON (trials table, Tune configs), by this or an earlier version."""
        raw = json.loads(text) if isinstance(text, str) else dict(text)
        return cls.model_validate({k: v for k, v in raw.items() if k not in RETIRED_KEYS})

    def training_key(self) -> str:
        """Id of the trained model: trials that differ only in evaluation share it."""
        content = self.model_dump(
            mode="json", include=set(TRAINING_KEYS), exclude=READING_KEYS, exclude_defaults=True
        )
        return _content_hash(content | self._inputs())


TRAINING_KEYS = (
    "dataset", "model", "model_args", "init", "activation", "subset", "weight_decay", "seed",
    "train",
)  # fmt: skip
# What attack and measure runs depend on; trials (trained models) do not, so runs are added to
# finished trials without retraining.
EVALUATION_KEYS = ("attacks", "eps", "measures")
# Keys that specs stored by earlier versions may hold; reading them back drops these.
RETIRED_KEYS = ("properties", "strong_attacks")
# Part of every id. Ids hash only the values that differ from their defaults, so a new setting
# with a default leaves existing ids (and finished trials) alone; changing what an existing
# default means must bump this instead.
SPEC_VERSION = 2


# id(spec) -> (a weak reference to it, its input digests); equal specs do not share an entry,
# since a file may change between two parses of one sweep file.
_INPUTS: dict[int, tuple[weakref.ref[Any], dict[str, str]]] = {}


def _module_input(name: str) -> dict[str, Any]:
    found = digests.run_inputs(name)
    return {"inputs": found} if found else {}


def _content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps({"spec_version": SPEC_VERSION, **content}, sort_keys=True)
    return hashlib.sha1(canonical.encode()).hexdigest()[:10]


TRIAL_KEYS = set(TrialSpec.model_fields)
