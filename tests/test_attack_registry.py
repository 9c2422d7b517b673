"""The attack registry: what each attack declares (kind, norms, targets, needs, its one settings
model), what `register` refuses, and that a settings model, keyword overrides and a run by name
are the same attack."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from attack_cases import ALL_CASES, CASES, Case, advlab_attacks, wrong_targets
from pydantic import BaseModel
from torch import Tensor, nn

from advlab.attacks import (
    ALMASettings,
    AttackError,
    CWSettings,
    DDNSettings,
    DeepFoolSettings,
    FGSMSettings,
    FMNSettings,
    LBFGSSettings,
    NoiseSettings,
    PGDSettings,
    alma,
    base,
    carlini_wagner,
    ddn,
    deepfool,
    fgsm,
    fmn,
    gaussian_noise,
    hopskipjump,
    lbfgs_attack,
    pgd,
)
from advlab.attacks import registry as attack_registry
from advlab.attacks.registry import (
    AttackDef,
    Settings,
    get,
    names,
    register,
    run_attack,
    validate_settings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_test_cases_cover_every_registered_attack() -> None:
    # An attack added to advlab without cases in tests/attack_cases.py fails here, instead of
    # silently escaping the contract tests that enumerate CASES.
    assert set(CASES) == advlab_attacks()
    assert {"fgsm", "lbfgs", "noise"} <= advlab_attacks() <= set(names())
    for name, cases in CASES.items():
        assert cases and all(case.attack == name for case in cases), name
    assert len({case.label for case in ALL_CASES}) == len(ALL_CASES)


def test_registered_as_minimisation_attacks(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    names = ("ddn", "fmn", "fmn_linf", "alma")
    assert {get(name).kind for name in names} == {"minimization"}
    assert get("fmn_linf").default_norm == "linf" and get("fmn").default_norm == "rms"
    x, y = digits[0][1000:1004], digits[1][1000:1004]
    by_name = run_attack("fmn_linf", mlp, x, y, steps=30)
    direct = fmn(mlp, x, y, norm="linf", steps=30)
    assert torch.equal(by_name.x_adv, direct.x_adv)
    with pytest.raises(AttackError, match="stepz"):
        run_attack("ddn", mlp, x, y, stepz=3)
    named = run_attack("alma", mlp, x, y, steps=30, lr_init=0.05)
    assert torch.equal(named.x_adv, alma(mlp, x, y, steps=30, lr_init=0.05).x_adv)


# Each registered attack's settings are the model its own module defines (L-BFGS's adds the
# registry's start attack), and every knob the attack has is a field of it.
_FMN_KNOBS = "steps alpha_init alpha_final gamma_init gamma_final margin candidates"
OWN_SETTINGS: dict[str, tuple[type[Settings], str]] = {
    "fgsm": (FGSMSettings, ""),
    "pgd": (PGDSettings, "steps restarts step_size random_start"),
    "noise": (NoiseSettings, ""),
    "lbfgs": (
        LBFGSSettings,
        "c_init c_factor search_steps c_rtol dist_rtol max_iter history ftol gtol margin loss "
        "kappa warm_start refine_steps max_evals candidates",
    ),
    "deepfool": (DeepFoolSettings, "steps overshoot refine_steps candidates"),
    "cw": (
        CWSettings,
        "steps search_steps c_init lr kappa abort_early margin warm_start candidates",
    ),
    "ddn": (DDNSettings, "steps gamma init_norm margin candidates"),
    "alma": (
        ALMASettings,
        "steps lr_init lr_reduction mu_init rho_init check_steps tau gamma alpha margin candidates",
    ),
    "fmn": (FMNSettings, _FMN_KNOBS),
    "fmn_linf": (FMNSettings, _FMN_KNOBS),
}


@pytest.mark.parametrize("name", sorted(OWN_SETTINGS))
def test_each_attack_has_one_settings_model_from_its_own_module(name: str) -> None:
    own, listed = OWN_SETTINGS[name]
    knobs = set(listed.split())
    defn = get(name)
    assert issubclass(defn.settings, own) and issubclass(own, Settings)
    assert own.__module__.startswith("advlab.attacks.")
    assert own.__module__ not in ("advlab.attacks.registry", "advlab.attacks.base")
    assert set(own.model_fields) == knobs
    extra = set(defn.settings.model_fields) - knobs
    assert extra == ({"start", "start_settings"} if name == "lbfgs" else set())
    # Strict and closed: a count is an int, an unknown key is refused.
    assert own.model_config["strict"] and own.model_config["extra"] == "forbid"


def test_the_settings_keep_their_defaults_and_none_semantics() -> None:
    # The defaults the functions used to carry as keyword arguments, now in one place.
    assert (CWSettings().steps, CWSettings().search_steps, CWSettings().c_init) == (1000, 9, 1e-3)
    assert CWSettings().abort_early and CWSettings().margin == 1e-5
    assert (DDNSettings().steps, DDNSettings().gamma, DDNSettings().init_norm) == (100, 0.05, 1.0)
    alma_defaults = ALMASettings()
    assert (alma_defaults.steps, alma_defaults.mu_init, alma_defaults.check_steps) == (1000, 1, 10)
    assert (alma_defaults.tau, alma_defaults.gamma, alma_defaults.alpha) == (0.95, 1.2, 0.9)
    assert FMNSettings().last_alpha == 0.01 and FMNSettings(alpha_final=0.3).last_alpha == 0.3
    assert (PGDSettings().steps, PGDSettings().restarts, PGDSettings().step_size) == (40, 1, None)
    # L-BFGS's None means the loss's own default, resolved when the attack runs.
    assert LBFGSSettings().max_iter is None and LBFGSSettings().history is None
    ce, margin = LBFGSSettings().resolved(), LBFGSSettings(loss="margin").resolved()
    assert (ce.max_iter, ce.history, margin.max_iter, margin.history) == (100, 5, 10, 3)
    assert LBFGSSettings(loss="margin", max_iter=7).resolved().max_iter == 7


@pytest.mark.parametrize(
    ("name", "settings", "match"),
    [
        ("cw", {"abort_early": 1}, "abort_early: Input should be a valid boolean"),
        ("cw", {"margin": -1.0}, "margin: Input should be greater than or equal to 0"),
        ("alma", {"check_steps": 0}, "check_steps: Input should be greater than or equal to 1"),
        ("alma", {"tau": 1.5}, "tau: Input should be less than or equal to 1"),
        ("alma", {"mu_init": float("nan")}, "mu_init: Input should be a finite number"),
        ("lbfgs", {"history": 0}, "history: Input should be greater than or equal to 1"),
        ("lbfgs", {"c_factor": 1.0}, "c_factor: Input should be greater than 1"),
        ("lbfgs", {"start_settings": {"steps": 3}}, "start_settings: given without start"),
        ("ddn", {"stpes": 3}, "stpes: not a setting of ddn; did you mean 'steps'\\?"),
        ("fgsm", {"steps": 3}, "steps: not a setting of fgsm; it has no settings"),
        ("pgd", {"zzz": 3}, "zzz: not a setting of pgd; its settings: random_start, restarts,"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(
    name: str, settings: dict[str, Any], match: str
) -> None:
    with pytest.raises(AttackError, match="^" + match) as info:
        validate_settings(get(name), settings)
    assert "\n" not in str(info.value)


FUNCTIONS = {
    "fgsm": fgsm,
    "pgd": pgd,
    "noise": gaussian_noise,
    "lbfgs": lbfgs_attack,
    "deepfool": deepfool,
    "cw": carlini_wagner,
    "ddn": ddn,
    "alma": alma,
    "fmn": fmn,
    "fmn_linf": fmn,
    "hsj": hopskipjump,
    "hsj_linf": hopskipjump,
}


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.label for c in ALL_CASES])
def test_a_settings_model_keywords_and_a_run_by_name_are_the_same_attack(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # settings=Model(...), the same fields as keywords, half and half, and run_attack(name)
    # give the same numbers: one settings home, one merge.
    assert set(FUNCTIONS) == set(CASES)
    x, y = digits[0][1000:1004], digits[1][1000:1004]
    target = {"tensor": wrong_targets(y), "default": None}.get(case.target, case.target)
    own = get(case.attack).settings
    if own.__name__ == "LBFGSWithStart":  # the function's own model, without the start attack
        own = LBFGSSettings
    fn = FUNCTIONS[case.attack]
    first = dict(list(case.settings.items())[:1])
    rest = dict(list(case.settings.items())[1:])

    def call(**kw: Any) -> Any:
        args = (case.eps,) if case.eps is not None else ()
        norm = {"norm": "linf"} if case.attack in ("fmn_linf", "hsj_linf") else {}
        norm = {"norm": case.norm} if case.norm else norm
        gen = torch.Generator().manual_seed(5)
        if case.attack == "noise":
            return fn(mlp, x, y, *args, generator=gen, **norm, **kw)
        return fn(mlp, x, y, *args, target, generator=gen, **norm, **kw)

    runs = [
        call(**case.settings),
        call(settings=own(**case.settings)),
        call(settings=own(**first), **rest),
        case.run(mlp, x, y, target, torch.Generator().manual_seed(5)),
    ]
    for run in runs[1:]:
        for field in ("x_adv", "success", "adv_pred", "target", "grad_evals"):
            assert torch.equal(getattr(run, field), getattr(runs[0], field)), field


def test_settings_of_another_attack_are_refused(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][:2], digits[1][:2]
    with pytest.raises(AttackError, match=r"^settings: expected a DDNSettings, got ALMASettings"):
        ddn(mlp, x, y, settings=ALMASettings())  # type: ignore[arg-type]
    with pytest.raises(AttackError, match=r"^settings: expected a CWSettings, got dict"):
        carlini_wagner(mlp, x, y, settings={"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(AttackError, match=r"^steps: Input should be greater"):
        ddn(mlp, x, y, settings=DDNSettings(steps=5), steps=0)


# ----------------------------------------------------------------------------- declarations


def test_every_attack_declares_what_it_needs_of_a_model() -> None:
    # The noise control and HopSkipJump make do with predictions; every other attack takes
    # gradients (the exact minima read the model's structure, and refuse what they cannot read).
    needs = {name: get(name).needs for name in advlab_attacks() | {"exact", "exact_linf"}}
    blind = {"noise", "hsj", "hsj_linf", "exact", "exact_linf"}
    assert needs == {name: "predictions" if name in blind else "gradients" for name in needs}


def _toy_run(model: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> Any:
    raise AssertionError("never run")


class _ToySettings(Settings):
    pass


def _toy(name: str = "toy", **changes: Any) -> AttackDef:
    defn = AttackDef(name, "minimization", ("l2",), ("untargeted",), _ToySettings, _toy_run)
    return dataclasses.replace(defn, **changes)


@pytest.mark.parametrize(
    ("defn", "match"),
    [
        (_toy(""), "attack name '': use 1 to 64 letters"),
        (_toy("a/b"), "attack name 'a/b': use 1 to 64 letters"),
        (_toy("my attack"), "attack name 'my attack'"),
        (_toy(".hidden"), "attack name '.hidden': use 1 to 64"),
        (_toy("x" * 65), "attack name 'x{65}'"),
        (_toy("café"), "attack name 'café'"),
        (_toy(norms=()), "attack 'toy': no norms"),
        (_toy(targets=()), "attack 'toy': no target modes"),
        (_toy(kind="budget"), "attack 'toy': kind 'budget'"),
        (_toy(needs="logits"), "attack 'toy': needs 'logits'"),
        (_toy("fgsm"), "attack 'fgsm' is registered already"),
    ],
)
def test_register_refuses_a_definition_that_cannot_work(defn: AttackDef, match: str) -> None:
    before = set(names())
    with pytest.raises(AttackError, match="^" + match) as info:
        register(defn)
    assert "\n" not in str(info.value)
    assert set(names()) == before


def test_register_takes_a_good_definition_once() -> None:
    defn = _toy("toy-ok_1.v2" + "x" * 53)  # 64 characters, every allowed kind of character
    assert len(defn.name) == 64 and defn.needs == "gradients"  # the default: the safe side
    try:
        assert register(defn) is defn and get(defn.name) is defn
        assert register(defn) is defn  # the same definition again is no conflict
    finally:
        attack_registry._REGISTRY.pop(defn.name, None)  # leave the registry as it was


def test_settings_base_is_one_class_shared_by_the_registry() -> None:
    assert Settings is base.Settings and issubclass(Settings, BaseModel)
