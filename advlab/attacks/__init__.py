"""Adversarial attacks behind one contract (see base.py): model, inputs, labels -> AttackResult.

Minimisation attacks (one run scores every budget): lbfgs_attack, deepfool, carlini_wagner,
ddn, alma, fmn (L2 or Linf).
Fixed-budget attacks (one run per budget): fgsm, pgd, gaussian_noise.
"""

from advlab.attacks.alma import alma
from advlab.attacks.base import (
    TARGET_MODES,
    AttackError,
    AttackResult,
    Target,
    check_inputs,
    closest_over_targets,
    linearized_distances,
    random_wrong_targets,
    shrink_toward_input,
)
from advlab.attacks.cw import carlini_wagner
from advlab.attacks.ddn import ddn
from advlab.attacks.deepfool import deepfool
from advlab.attacks.fmn import fmn
from advlab.attacks.gradient import fgsm, pgd
from advlab.attacks.lbfgs import LBFGSSettings, lbfgs_attack
from advlab.attacks.lbfgs_reference import lbfgs_scipy_reference
from advlab.attacks.noise import gaussian_noise

__all__ = [
    "TARGET_MODES",
    "AttackError",
    "AttackResult",
    "LBFGSSettings",
    "Target",
    "alma",
    "carlini_wagner",
    "check_inputs",
    "closest_over_targets",
    "ddn",
    "deepfool",
    "fgsm",
    "fmn",
    "gaussian_noise",
    "lbfgs_attack",
    "lbfgs_scipy_reference",
    "linearized_distances",
    "pgd",
    "random_wrong_targets",
    "shrink_toward_input",
]
