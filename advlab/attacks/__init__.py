"""Adversarial attacks behind one contract (see base.py): model, inputs, labels -> AttackResult."""

from advlab.attacks.base import (
    AttackError,
    AttackResult,
    check_inputs,
    random_wrong_targets,
)
from advlab.attacks.gradient import fgsm, pgd
from advlab.attacks.lbfgs import (
    lbfgs_attack,
    lbfgs_attack_all_targets,
    lbfgs_scipy_reference,
)

__all__ = [
    "AttackError",
    "AttackResult",
    "check_inputs",
    "fgsm",
    "lbfgs_attack",
    "lbfgs_attack_all_targets",
    "lbfgs_scipy_reference",
    "pgd",
    "random_wrong_targets",
]
