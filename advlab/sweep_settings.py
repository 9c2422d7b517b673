"""How a sweep runs (SweepSettings): resources, storage, W&B, the transfer stage, the search and
the scheduler, as pydantic models that refuse unknown keys and bad values. What each trial is
lives in advlab.spec; advlab.sweepfile reads a sweep file into both.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from advlab.spec import MAX_SEED, _is_number
from advlab.strict import Strict
from advlab.text import is_file_name


class _Strict(BaseModel):
    model_config = Strict.model_config  # advlab.strict's rules (ruff sees the pydantic base here)


class ResourcesSpec(_Strict):
    # Ray schedules fractions to 1e-4; below a hundredth a trial would starve its threads.
    cpu: float = Field(1, ge=0.01, le=4096)
    gpu: float = Field(0, ge=0, le=1024)


class WandbSpec(_Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "advlab"
    entity: str | None = None

    @field_validator("project", "entity")
    @classmethod
    def _wandb_accepts_it(cls, value: str | None) -> str | None:
        # W&B refuses these characters and long names, but only once a run starts.
        if value is not None and (not 0 < len(value) <= 128 or set(value) & set("/\\#?%:")):
            raise ValueError("use at most 128 characters and none of / \\ # ? % :")
        return value


class TransferSpec(_Strict):
    """The transfer stage run after the trials (Tables 2 and 4 of the paper). Which pairs it
    measures (advlab.transfer_pairs): `all` (every source to every trial target of its data),
    `within` (only to trials that share the source's values of the `within` keys) or `sample`
    (`sample` targets per source drawn by a seeded hash, among the `within` ones if given); each
    source also meets itself and every control, whatever the mode."""

    enabled: bool = True
    pairs: Literal["all", "within", "sample"] = "all"
    within: list[str] = []  # dotted trial keys (grid axes) a source and its targets share
    sample: int = Field(8, ge=1, le=100_000)  # pairs: sample: trial targets per source
    per_example: bool = False  # also one row per (pair, set, example): transfer_examples/
    # Source-target pairs one stage takes before it is refused up front (a cluster may raise it)
    max_pairs: int = Field(50_000, ge=1, le=100_000_000)
    # Prediction-only model families (advlab.families) trained on each source's data.
    controls: list[str] = ["logistic", "linear_svm", "random_forest", "knn"]
    noise: bool = True  # Gaussian noise with each example's own per-pixel rms distortion
    noise_stddev: list[float] = []  # the paper's fixed-stddev noise rows, on the attacked split
    # perturbations enlarged to at least these per-pixel rms values (never shrunk): Table 4
    amplify_rms: list[float] = [0.1]
    # Subsample for the slow controls (rbf_svm)
    control_max_train: int = Field(10000, ge=10, le=10_000_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("controls")
    @classmethod
    def _controls_predict_only(cls, value: list[str]) -> list[str]:
        from advlab.families import ModelNameError, resolve

        for name in value:
            try:
                family = resolve(name)
            except ModelNameError as err:
                raise ValueError(str(err).removeprefix("model: ")) from None
            if not family.estimator or not name:
                raise ValueError(
                    f"{name!r} is no prediction-only model family; use logistic, linear_svm, "
                    "rbf_svm, random_forest, gradient_boosting, knn, constant or module:FAMILY"
                )
        if len(set(value)) != len(value):
            raise ValueError("a control is listed twice; list each once")
        return value

    @field_validator("within")
    @classmethod
    def _within_keys(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value) or len(set(value)) != len(value):
            raise ValueError("name each trial key once, e.g. [subset] or [dataset.name, subset]")
        return value

    @model_validator(mode="after")
    def _pairs_consistent(self) -> TransferSpec:
        if self.pairs == "within" and not self.within:
            raise ValueError(
                "within: pairs: within needs the keys sources and targets share, e.g. [subset]"
            )
        if self.pairs == "all" and self.within:
            raise ValueError(
                "within: applies to pairs: within or sample; set pairs: within, or drop within"
            )
        return self

    @field_validator("amplify_rms", "noise_stddev")
    @classmethod
    def _rms_valid(cls, value: list[float]) -> list[float]:
        if any(math.isnan(v) or not 0 < v <= 1 for v in value):
            raise ValueError("each rms must be in (0, 1]")
        return value


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


class SearchSpec(_Strict):
    """How trials are chosen: the grid (default), random samples, or Optuna (Ray Tune's own
    searchers). `space` maps trial keys to one distribution each, written as
    {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]} (inclusive) or {choice: [...]};
    `metric`/`mode` name what Optuna optimises (a list of two or more: multi-objective, and
    the sweep records its Pareto front)."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, le=10_000)  # samples drawn (per grid point, for random)
    space: dict[str, dict[str, list[Any]]] = {}
    metric: str | list[str] | None = None  # a final metric: test_error, pgd/robust_error@0.1
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if self.algorithm == "grid" and (self.space or self.num_samples != 1):
            raise ValueError("algorithm: grid takes no space or num_samples; use random or optuna")
        if self.algorithm != "grid" and not self.space:
            raise ValueError(
                f"space: {self.algorithm} needs a space to sample, e.g. "
                "{train.lr: {loguniform: [1e-4, 1e-1]}}"
            )
        if self.algorithm == "optuna" and not self.metrics:
            raise ValueError("metric: optuna needs the metric it optimises, e.g. test_error")
        if any(not m.strip() for m in self.metrics):
            raise ValueError("metric: a metric is empty; name one, e.g. test_error")
        if len(self.metrics) != len(self.modes):
            raise ValueError("mode: give one mode (min or max) per metric")
        for key, dist in self.space.items():
            _check_distribution(key, dist)
        return self

    @property
    def metrics(self) -> list[str]:
        return (
            []
            if self.metric is None
            else [self.metric]
            if isinstance(self.metric, str)
            else self.metric
        )

    @property
    def modes(self) -> list[str]:
        if isinstance(self.mode, str):
            return [self.mode] * len(self.metrics)
        return list(self.mode)


def _check_distribution(key: str, dist: dict[str, list[Any]]) -> None:
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ValueError(f"{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{uniform: [0, 1]}}")
    kind, values = next(iter(dist.items()))
    if kind == "choice":
        if not values:
            raise ValueError(f"{key}: choice needs at least one value")
        return
    if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
        raise ValueError(f"{key}: {kind} needs [low, high] numbers with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise ValueError(f"{key}: loguniform needs low > 0")
    if kind == "int" and not all(float(v).is_integer() for v in values):
        raise ValueError(f"{key}: int needs whole-number bounds")


class SchedulerSpec(_Strict):
    """Early stopping on a metric reported every epoch (Ray Tune's ASHA or median stopping):
    trials it stops are recorded as stopped, not failed."""

    name: Literal["none", "asha", "median"] = "none"
    metric: str = "test_error"  # an epoch metric: loss, train_error, test_error, ...
    mode: Literal["min", "max"] = "min"
    # Epochs every trial runs before it can be stopped
    grace_period: int = Field(1, ge=1, le=100_000)
    reduction_factor: float = Field(3.0, gt=1, allow_inf_nan=False)  # ASHA's eta


STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")  # pyarrow.fs knows them


class SweepSettings(_Strict):
    name: str
    grid: dict[str, list[Any]] = {}
    cases: list[dict[str, Any]] = []  # each a set of dotted trial keys applied together
    resources: ResourcesSpec = ResourcesSpec()
    storage: str = "results"  # a path, or a URI of file://, s3://, gs://, hdfs:// or abfs://
    max_concurrent: int | None = Field(None, ge=1, le=100_000)
    max_failures: int = Field(3, ge=0, le=1000)  # retries of a trial whose worker or node was lost
    # Epochs between training checkpoints; 0: none
    checkpoint_every: int = Field(5, ge=0, le=100_000)
    wandb: WandbSpec = WandbSpec()
    transfer: TransferSpec = TransferSpec()
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()

    @field_validator("storage")
    @classmethod
    def _storage_scheme_known(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme and scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"{scheme}:// is no storage advlab can write; use a path or one of "
                f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}"
            )
        if not value.strip() or "\x00" in value:
            raise ValueError("give a folder path or a storage URI")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not is_file_name(value, 100):
            raise ValueError("use at most 100 letters, digits, '-', '_' or '.' (it names a folder)")
        return value


SWEEP_KEYS = set(SweepSettings.model_fields)
