"""The attack registry: the one place that knows which attacks exist and what kind each is.

Each attack declares, once (in the style of Foolbox 3's attack base classes):
- its kind: a *minimisation* attack (L-BFGS, DeepFool, C&W) runs once and returns the closest
  adversarial it found, so success at budget eps is `success & (distance <= eps)` and one run
  scores every budget; a *fixed-budget* attack (FGSM, PGD, noise) runs once per budget;
- its budget norms (the first is the default) and target modes (the first is the default);
- its settings: the pydantic model its own module defines (`DDNSettings`, ...), whose fields are
  the attack function's keyword overrides (validated from sweep files before any work starts);
- what it needs of a model: input gradients, or predictions only;
- the function that runs it.

Spec validation, the trial, the store, W&B and the report ask this module; nothing else keeps a
list of attacks. A plug-in attack is an `AttackDef` passed to `register()`, or named in a sweep
file by import path (`name: "mypkg.attacks:MY_ATTACK"`), which also resolves on Ray workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from advlab.attacks.alma import ALMASettings, alma
from advlab.attacks.base import (
    AttackError,
    AttackResult,
    Settings,
    prepare,
    validated_settings,
)
from advlab.attacks.cw import CWSettings, carlini_wagner
from advlab.attacks.ddn import DDNSettings, ddn
from advlab.attacks.deepfool import DeepFoolSettings, deepfool
from advlab.attacks.exact import ExactSettings, exact_minimum_attack
from advlab.attacks.fmn import FMNSettings, fmn
from advlab.attacks.gradient import FGSMSettings, PGDSettings, fgsm, pgd
from advlab.attacks.hopskipjump import HopSkipJumpSettings, hopskipjump
from advlab.attacks.lbfgs import LBFGSSettings, lbfgs_attack
from advlab.attacks.noise import NoiseSettings, gaussian_noise
from advlab.measure import distortions, success_at_budgets
from advlab.plugins import PluginError, import_object
from advlab.text import is_file_name

Kind = Literal["minimization", "fixed_budget"]
MINIMIZATION: Kind = "minimization"
FIXED_BUDGET: Kind = "fixed_budget"
KINDS: tuple[str, ...] = (MINIMIZATION, FIXED_BUDGET)
# What an attack asks of a model: input gradients, or only its predictions (a decision-based or
# random attack, which a prediction-only model such as a scikit-learn control can face too).
Needs = Literal["gradients", "predictions"]
NEEDS: tuple[str, ...] = ("gradients", "predictions")  # the first is the default

# run(model, x, y, *, eps, norm, target, generator, **settings) -> AttackResult; eps is None for
# minimisation attacks, norm the budget norm the sweep chose (from the attack's own `norms`).
AttackFn = Callable[..., AttackResult]


@dataclass(frozen=True)
class AttackDef:
    """Everything advlab needs to know about one attack."""

    name: str  # names its result files: letters, digits, '-', '_', '.'; at most 64
    kind: Kind
    norms: tuple[str, ...]  # budget norms; the first is the default
    targets: tuple[str, ...]  # target modes; the first is the default
    settings: type[Settings]
    run: AttackFn
    summary: str = ""  # one line for `advlab attacks` and the docs
    needs: Needs = "gradients"  # the safe side: refused on models without input gradients

    @property
    def default_norm(self) -> str:
        return self.norms[0]

    @property
    def default_target(self) -> str:
        return self.targets[0]


# --------------------------------------------------------------------------- settings

_ALL_TARGETS = ("untargeted", "random", "all")
_DIST_NORMS = ("rms", "l2", "linf")  # what a minimisation attack's distances are scored in


class LBFGSWithStart(LBFGSSettings):
    """L-BFGS's own settings plus a start attack run first (`_lbfgs`): the start is composed
    here, from the registry, so lbfgs.py needs to know no other attack."""

    start: str | None = None  # a minimisation attack whose points the search starts from
    start_settings: dict[str, Any] = Field(default_factory=dict)  # that attack's settings

    @model_validator(mode="after")
    def _start_is_a_minimisation_attack(self) -> LBFGSWithStart:
        if self.start is None:
            if self.start_settings:
                raise ValueError("start_settings: given without start; name the start attack")
            return self
        try:
            defn = get(self.start)
        except AttackError as err:
            raise ValueError(f"start: {err}") from None
        if defn.kind != MINIMIZATION or defn.run is _LBFGS_RUN:
            raise ValueError(
                f"start: {self.start} is not a minimisation attack other than lbfgs; "
                "use ddn, alma, fmn, deepfool or cw"
            )
        try:
            validate_settings(defn, self.start_settings)
        except AttackError as err:
            raise ValueError(f"start_settings: {err}") from None
        return self


# --------------------------------------------------------------------------- adapters


def _minimization(fn: Callable[..., AttackResult]) -> AttackFn:
    """A minimisation attack's function takes no budget and optimises its own norm."""

    def run(model: nn.Module, x: Tensor, y: Tensor, *, eps: Any, norm: str, **kw: Any):
        return fn(model, x, y, **kw)

    return run


def _fixed(fn: Callable[..., AttackResult], takes_norm: bool = False) -> AttackFn:
    def run(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, **kw: Any):
        return fn(model, x, y, eps, **({"norm": norm} if takes_norm else {}), **kw)

    return run


def _in_norm(fn: Callable[..., AttackResult], norm: str) -> AttackFn:
    """An attack minimising `norm` whatever the budget norm (which only scores it)."""

    def run(model: nn.Module, x: Tensor, y: Tensor, *, eps: Any, norm: str, **kw: Any):
        return fn(model, x, y, norm=minimised, **kw)

    minimised = norm
    return run


def _lbfgs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: Any,
    norm: str,
    target: Any,
    generator: torch.Generator,
    start: str | None = None,
    start_settings: dict[str, Any] | None = None,
    **kw: Any,
) -> AttackResult:
    """L-BFGS, from another minimisation attack's points when `start` names one.

    The start attack goes for the same classes (random targets are drawn once for both) or,
    for "untargeted" and "all", for any wrong class; its gradient evaluations are counted in.
    """
    if start is None:
        return lbfgs_attack(model, x, y, target, generator=generator, **kw)
    # Resolve targets first, on the model's device, so both attacks go for the same classes.
    x, y, target, _ = prepare(
        model, x, y, target, num_classes=None, generator=generator, default="random"
    )
    target = "untargeted" if target is None else target
    first = run_attack(
        start, model, x, y, target=target if isinstance(target, Tensor) else "untargeted",
        generator=generator, **(start_settings or {}),
    )  # fmt: skip
    result = lbfgs_attack(model, x, y, target, generator=generator, start=first.x_adv, **kw)
    return replace(result, grad_evals=result.grad_evals + first.grad_evals.to(result.grad_evals))


_LBFGS_RUN = _lbfgs


def _noise(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    target: Any,
    generator: Any,
    **settings: Any,
) -> AttackResult:
    return gaussian_noise(model, x, y, eps, generator=generator, **settings)


# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, AttackDef] = {}


def register(defn: AttackDef) -> AttackDef:
    """Add an attack (a plug-in's, or a test's); its name must be new and name a file."""
    _check_definition(defn)
    if defn.name in _REGISTRY and _REGISTRY[defn.name] is not defn:
        raise AttackError(f"attack {defn.name!r} is registered already; pick another name")
    _REGISTRY[defn.name] = defn
    return defn


def _check_definition(defn: AttackDef) -> None:
    """AttackError (one line) unless the definition can run and its name can name files."""
    name = defn.name
    if not is_file_name(name):
        raise AttackError(
            f"attack name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.', not starting "
            "with '.' (it names result files)"
        )
    if defn.kind not in (MINIMIZATION, FIXED_BUDGET):
        raise AttackError(f"attack {name!r}: kind {defn.kind!r}; use {' or '.join(KINDS)}")
    if not defn.norms:
        raise AttackError(f"attack {name!r}: no norms; give its budget norms, e.g. ('l2',)")
    if not defn.targets:
        raise AttackError(f"attack {name!r}: no target modes; give them, e.g. ('untargeted',)")
    if defn.needs not in NEEDS:
        raise AttackError(f"attack {name!r}: needs {defn.needs!r}; use {' or '.join(NEEDS)}")


def names() -> list[str]:
    """Every registered attack's name."""
    return sorted(_REGISTRY)


def get(name: str) -> AttackDef:
    """The attack called `name`, or the AttackDef at an import path `module:attribute`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_attack(name)
    raise AttackError(f"unknown attack {name!r}; use one of {', '.join(names())} or module:object")


def _import_attack(path: str) -> AttackDef:
    try:
        found = import_object(path, "attack")
    except PluginError as err:
        raise AttackError(f"cannot import attack {path!r} ({err}); check the module path") from None
    if not isinstance(found, AttackDef):
        raise AttackError(f"{path!r} is a {type(found).__name__}, not an advlab AttackDef")
    _check_definition(found)
    return _REGISTRY.setdefault(path, found)


# Every attack takes input gradients (AttackDef's default `needs`) but the noise control,
# HopSkipJump and the exact minima (which read the model's structure, and refuse the others).
for _defn in (
    AttackDef("fgsm", FIXED_BUDGET, ("linf",), _ALL_TARGETS, FGSMSettings, _fixed(fgsm),
              "fast gradient sign, one step (Goodfellow et al. 2015)"),
    AttackDef("pgd", FIXED_BUDGET, ("linf", "l2"), _ALL_TARGETS, PGDSettings,
              _fixed(pgd, takes_norm=True), "projected gradient descent (Madry et al. 2018)"),
    AttackDef("noise", FIXED_BUDGET, ("stddev",), ("untargeted",), NoiseSettings, _noise,
              "Gaussian noise of stddev eps, clipped to the box (the paper's control)",
              needs="predictions"),
    AttackDef("lbfgs", MINIMIZATION, _DIST_NORMS, ("random", "untargeted", "all"),
              LBFGSWithStart, _LBFGS_RUN, "box-constrained L-BFGS (Szegedy et al. 2014)"),
    AttackDef("deepfool", MINIMIZATION, _DIST_NORMS, _ALL_TARGETS, DeepFoolSettings,
              _minimization(deepfool), "DeepFool L2 (Moosavi-Dezfooli et al. 2016)"),
    AttackDef("cw", MINIMIZATION, _DIST_NORMS, _ALL_TARGETS, CWSettings,
              _minimization(carlini_wagner), "Carlini & Wagner L2 (2017)"),
    AttackDef("ddn", MINIMIZATION, _DIST_NORMS, _ALL_TARGETS, DDNSettings, _minimization(ddn),
              "decoupled direction and norm, L2 (Rony et al. 2019)"),
    AttackDef("alma", MINIMIZATION, _DIST_NORMS, _ALL_TARGETS, ALMASettings,
              _minimization(alma), "augmented Lagrangian, L2 (Rony et al. 2021)"),
    AttackDef("fmn", MINIMIZATION, _DIST_NORMS, _ALL_TARGETS, FMNSettings, _in_norm(fmn, "l2"),
              "fast minimum-norm, L2 (Pintor et al. 2021)"),
    AttackDef("fmn_linf", MINIMIZATION, ("linf", "rms", "l2"), _ALL_TARGETS, FMNSettings,
              _in_norm(fmn, "linf"), "fast minimum-norm, Linf (Pintor et al. 2021)"),
    AttackDef("hsj", MINIMIZATION, _DIST_NORMS, ("untargeted",), HopSkipJumpSettings,
              _in_norm(hopskipjump, "l2"), "HopSkipJump, L2, decision-based (Chen et al. 2020); "
              "grad_evals counts queries", needs="predictions"),
    AttackDef("hsj_linf", MINIMIZATION, ("linf", "rms", "l2"), ("untargeted",),
              HopSkipJumpSettings, _in_norm(hopskipjump, "linf"), "HopSkipJump, Linf, "
              "decision-based (Chen et al. 2020); grad_evals counts queries", needs="predictions"),
    AttackDef("exact", MINIMIZATION, _DIST_NORMS, ("untargeted",), ExactSettings,
              _in_norm(exact_minimum_attack, "l2"), "exact minimum L2 distortion: linear "
              "models and 1-nearest neighbour (advlab.bounds)", needs="predictions"),
    AttackDef("exact_linf", MINIMIZATION, ("linf", "rms", "l2"), ("untargeted",),
              ExactSettings, _in_norm(exact_minimum_attack, "linf"), "exact minimum Linf "
              "distortion: linear models and 1-nearest neighbour", needs="predictions"),
):  # fmt: skip
    register(_defn)


# --------------------------------------------------------------------------- running


@dataclass
class BudgetRun:
    """One run of an attack: at `budget` (fixed-budget attacks) or at none (minimisation)."""

    budget: float | None
    result: AttackResult
    distances: dict[str, Tensor]  # rms, l2, linf per example
    seconds: float


def run_attack(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | None = None,
    norm: str | None = None,
    target: Any = None,
    generator: torch.Generator | None = None,
    **settings: Any,
) -> AttackResult:
    """Run any registered attack by name (the Python API); settings are validated first."""
    defn = get(name)
    checked = validate_settings(defn, settings)
    if defn.kind == FIXED_BUDGET and eps is None:
        raise AttackError(f"{name}: a fixed-budget attack needs eps=")
    return defn.run(
        model, x, y, eps=eps, norm=norm or defn.default_norm,
        target=target if target is not None else defn.default_target,
        generator=generator if generator is not None else torch.Generator().manual_seed(0),
        **checked.model_dump(),
    )  # fmt: skip


def validate_settings(defn: AttackDef, settings: dict[str, Any]) -> Settings:
    """The attack's settings model from a plain mapping; AttackError on a bad key or value."""
    return validated_settings(defn.settings, settings, defn.name)


def run_budgets(
    defn: AttackDef,
    budgets: Sequence[float],
    attack: Callable[[float | None], AttackResult],
    x: Tensor,
) -> list[BudgetRun]:
    """The runs that cover `budgets`: one for a minimisation attack, one per budget otherwise."""
    plan: list[float | None] = [None] if defn.kind == MINIMIZATION else list(budgets)
    runs = []
    for budget in plan:
        start = time.perf_counter()
        result = attack(budget)
        seconds = time.perf_counter() - start
        runs.append(BudgetRun(budget, result, distortions(x, result.x_adv), seconds))
    return runs


def hits_at_budgets(
    defn: AttackDef, runs: list[BudgetRun], budgets: Sequence[float], norm: str
) -> list[tuple[float, Tensor]]:
    """(budget, per-example success within it) for every budget: what a budget means.

    A minimisation attack's one run counts at eps where it succeeded at distance <= eps in the
    chosen norm; a fixed-budget attack's run at eps counts where it succeeded.
    """
    if defn.kind == MINIMIZATION:
        (run,) = runs
        matrix = success_at_budgets(run.result.success, run.distances[norm], budgets)
        return list(zip(budgets, matrix, strict=True))
    return [(run.budget, run.result.success) for run in runs]  # type: ignore[misc]
