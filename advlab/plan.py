"""What a trial runs once its model is trained: its attack runs and its measure runs, each with
the id that says whether a stored result is still current.

The sweep's attacks come first, then the attacks its measures ask for (the masking check's
strong set). Measures are the trial's `measures`, or by default the Lipschitz bounds (torch
models), the masking check and the health checks. An attack-scope measure runs once per attack
run; a measure that reads attack results has the ids of those runs in its own, so adding an
attack reruns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from advlab.families import resolve
from advlab.spec import AttackSpec, MeasureSpec, SpecError, TrialSpec

DEFAULT_MEASURES = ("lipschitz", "masking", "health")


def measures_of(spec: TrialSpec) -> list[MeasureSpec]:
    """The trial's measures: as listed, or the defaults its model family can take."""
    if spec.measures is not None:
        return list(spec.measures)
    defaults = [MeasureSpec(name=name) for name in DEFAULT_MEASURES]
    family = resolve(spec.model)
    if family.gradients is False or family.estimator:  # no layers for the Lipschitz bounds
        return [m for m in defaults if m.defn.needs == "predictions"]
    return defaults


def attack_plan(spec: TrialSpec) -> list[AttackSpec]:
    """Every attack a trial runs: the sweep's, then those its measures add (first one wins)."""
    plan = list(spec.attacks)
    for measure in measures_of(spec):
        extra = measure.defn.attacks
        for entry in extra(spec, measure.settings) if extra is not None else []:
            attack = AttackSpec.model_validate(entry)
            if all(a.key != attack.key for a in plan):
                plan.append(attack)
    return plan


@dataclass(frozen=True)
class MeasureRun:
    """One run of a measure: on the whole trial, or on one attack run (attack scope)."""

    measure: MeasureSpec
    attack: AttackSpec | None
    run_id: str

    @property
    def part(self) -> str:
        return run_part(self.measure.key, None if self.attack is None else self.attack.key)


def run_part(measure: str, attack: str | None) -> str:
    """The name of a measure run's files beside the trial's own (`<trial>.<part>.parquet`)."""
    return f"measure.{measure}" if attack is None else f"measure.{measure}.{attack}"


def measure_runs(spec: TrialSpec) -> list[MeasureRun]:
    """Every measure run of the trial, in order, with its id."""
    plan = attack_plan(spec)
    runs = []
    for measure in measures_of(spec):
        defn = measure.defn
        if defn.scope == "attack":
            runs += [
                MeasureRun(measure, a, spec.measure_id(measure, [spec.attack_id(a)])) for a in plan
            ]
            continue
        read = sorted(spec.attack_id(a) for a in plan) if defn.reads_attacks else []
        runs.append(MeasureRun(measure, None, spec.measure_id(measure, read)))
    return runs


def check_needs(spec: TrialSpec, model: str, gradients: bool = False) -> None:
    """Refuse, in one line, what a scikit-learn-style model cannot take: init weights and
    adversarial training; and, when it is prediction-only (no torch decision function),
    attacks and measures that need input gradients."""
    why = f"model {model} is prediction-only (no input gradients)"
    fitted = why if not gradients else f"model {model} is a scikit-learn-style estimator"
    if spec.init is not None:
        raise SpecError(f"init: weights to start from, but {fitted}; drop init")
    if spec.adversarially_trained:
        raise SpecError(f"train.adversarial.method: training on adversarial examples, but {fitted}")
    if gradients:
        return
    for attack in attack_plan(spec):
        if attack.defn.needs == "gradients":
            raise SpecError(
                f"attacks: {attack.key} needs input gradients, but {why}; use attacks that "
                "need predictions only (noise), or a torch model"
            )
    for measure in measures_of(spec):
        if measure.defn.needs == "gradients":
            raise SpecError(f"measures: {measure.key} needs a torch model, but {why}; drop it")
