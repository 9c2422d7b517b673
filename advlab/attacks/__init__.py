"""Adversarial attacks behind one contract (see base.py): model, inputs, labels -> AttackResult.

Minimisation attacks (one run scores every budget): lbfgs_attack, deepfool, carlini_wagner,
ddn, alma, fmn (L2 or Linf); hopskipjump (L2 or Linf, decision-based: predictions only);
exact_minimum_attack (proven minima of linear models and 1-nearest neighbour).
Fixed-budget attacks (one run per budget): fgsm, pgd, gaussian_noise.

Every attack is called as `attack(model, x, y, [budget,] target=None, settings=None, *,
num_classes=None, generator=None, **overrides)`: its knobs are one settings model defined in
its module (`DDNSettings`, ...), passed as `settings=` and/or as keyword overrides of its fields.
"""

from advlab.attacks.alma import ALMASettings, alma
from advlab.attacks.base import (
    TARGET_MODES,
    AttackError,
    AttackResult,
    Settings,
    Target,
    check_inputs,
    closest_over_targets,
    linearized_distances,
    random_wrong_targets,
    shrink_toward_input,
)
from advlab.attacks.cw import CWSettings, carlini_wagner
from advlab.attacks.ddn import DDNSettings, ddn
from advlab.attacks.deepfool import DeepFoolSettings, deepfool
from advlab.attacks.exact import ExactSettings, exact_minimum_attack
from advlab.attacks.fmn import FMNSettings, fmn
from advlab.attacks.gradient import FGSMSettings, PGDSettings, fgsm, pgd
from advlab.attacks.hopskipjump import HopSkipJumpSettings, hopskipjump
from advlab.attacks.lbfgs import LBFGSSettings, lbfgs_attack
from advlab.attacks.lbfgs_reference import lbfgs_scipy_reference
from advlab.attacks.noise import NoiseSettings, gaussian_noise

__all__ = [
    "TARGET_MODES",
    "ALMASettings",
    "AttackError",
    "AttackResult",
    "CWSettings",
    "DDNSettings",
    "DeepFoolSettings",
    "ExactSettings",
    "FGSMSettings",
    "FMNSettings",
    "HopSkipJumpSettings",
    "LBFGSSettings",
    "NoiseSettings",
    "PGDSettings",
    "Settings",
    "Target",
    "alma",
    "carlini_wagner",
    "check_inputs",
    "closest_over_targets",
    "ddn",
    "deepfool",
    "exact_minimum_attack",
    "fgsm",
    "fmn",
    "gaussian_noise",
    "hopskipjump",
    "lbfgs_attack",
    "lbfgs_scipy_reference",
    "linearized_distances",
    "pgd",
    "random_wrong_targets",
    "shrink_toward_input",
]
