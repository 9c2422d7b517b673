"""Small runs of every registered attack, for the tests that enumerate the registry.

`CASES` maps each attack advlab registers to a few small configurations (settings, target,
budget). `test_attack_registry.py` asserts that it covers the registry exactly, so an attack
added later without cases here fails loudly instead of escaping the contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advlab.attacks import AttackResult, random_wrong_targets
from advlab.attacks import registry as attack_registry


@dataclass(frozen=True)
class Case:
    """One small run of a registered attack."""

    label: str  # the test id
    attack: str  # the registered name
    settings: dict[str, Any] = field(default_factory=dict)
    target: str = "default"  # "tensor" (explicit random wrong classes), a mode, or "default"
    eps: float | None = None  # fixed-budget attacks: the budget
    norm: str | None = None  # the budget norm; None: the attack's default

    @property
    def defn(self) -> attack_registry.AttackDef:
        return attack_registry.get(self.attack)

    @property
    def minimization(self) -> bool:
        return self.defn.kind == attack_registry.MINIMIZATION

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        classes: Tensor,
        generator: torch.Generator,
        **changes: Any,
    ) -> AttackResult:
        """Run through the registry; the explicit target `classes` are used when the case's
        target is "tensor"; `changes` replace eps, norm or the target (mode or classes)."""
        mode: Any = {"tensor": classes, "default": None}.get(self.target, self.target)
        kw = {"eps": self.eps, "norm": self.norm, "target": mode} | changes
        return attack_registry.run_attack(
            self.attack, model, x, y, generator=generator, **kw, **self.settings
        )


_CW = {"steps": 50, "c_init": 1.0, "lr": 0.1, "search_steps": 5}
CASES: dict[str, list[Case]] = {
    "fgsm": [
        Case("fgsm", "fgsm", eps=0.1),
        Case("fgsm-targeted", "fgsm", target="tensor", eps=0.2),
    ],
    "pgd": [
        Case("pgd-linf", "pgd", {"steps": 10, "restarts": 2}, eps=0.08),
        Case("pgd-l2-targeted", "pgd", {"steps": 10}, "tensor", eps=1.0, norm="l2"),
        Case("pgd-l2", "pgd", {"steps": 10, "restarts": 2}, eps=0.5, norm="l2"),
    ],
    "noise": [Case("noise", "noise", eps=0.3)],
    "lbfgs": [
        Case("lbfgs-ce", "lbfgs", {"search_steps": 6}, "tensor"),
        Case("lbfgs-margin", "lbfgs", {"loss": "margin", "search_steps": 6}, "tensor"),
        Case("lbfgs-untargeted", "lbfgs", {"loss": "margin"}, "untargeted"),
    ],
    "deepfool": [
        Case("deepfool", "deepfool"),
        Case("deepfool-targeted", "deepfool", target="tensor"),
    ],
    "cw": [Case("cw", "cw", _CW), Case("cw-targeted", "cw", _CW, "tensor")],
    "ddn": [
        Case("ddn", "ddn", {"steps": 40}),
        Case("ddn-targeted", "ddn", {"steps": 40}, "tensor"),
    ],
    "fmn": [Case("fmn", "fmn", {"steps": 40})],
    "fmn_linf": [Case("fmn-linf-targeted", "fmn_linf", {"steps": 40}, "tensor")],
    "alma": [
        Case("alma", "alma", {"steps": 60}),
        Case("alma-targeted", "alma", {"steps": 60}, "tensor"),
    ],
    "hsj": [Case("hsj", "hsj", {"max_queries": 400}, "untargeted")],
    "hsj_linf": [Case("hsj-linf", "hsj_linf", {"max_queries": 400}, "untargeted")],
}
# Attacks that read the model's structure run only on the models they cover (exact minima:
# linear models and 1-NN), not on the MLP the contract tests share; tests/test_controls.py
# checks them (inside the box, fooling the model itself, equal to the exact minimum).
STRUCTURAL = {"exact", "exact_linf"}
ALL_CASES = [case for cases in CASES.values() for case in cases]
MINIMIZATION_CASES = [case for case in ALL_CASES if case.minimization]
FIXED_BUDGET_CASES = [case for case in ALL_CASES if not case.minimization]


def advlab_attacks() -> set[str]:
    """The registered attacks advlab itself defines (but the STRUCTURAL ones).

    Tests register toy attacks too (tests/report_sweeps.py at import, test_plugins by import
    path); their functions live outside the advlab package, so they are left out here.
    """
    return {
        name
        for name in attack_registry.names()
        if attack_registry.get(name).run.__module__.startswith("advlab.") and name not in STRUCTURAL
    }


class RowByRow(nn.Module):
    """`model` applied to one row at a time.

    A batched matmul may sum in an order that depends on the batch size (PyTorch's AVX2 and
    AVX-512 kernels do), which moves each row by round-off (~1e-16 relative per evaluation in
    float64, ~1e-9 after an L-BFGS search). Evaluated row by row, a row's model arithmetic is
    the same in any batch, so whatever else could differ between batches is the attack's own:
    with per-example state it must not, and rows compare bit for bit.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if len(x) == 0:
            return self.model(x)
        return torch.cat([self.model(row[None]) for row in x])


def wrong_targets(y: Tensor, seed: int = 4) -> Tensor:
    """A random wrong class per example, as the attacks draw them from a seeded generator."""
    return random_wrong_targets(y, 10, torch.Generator().manual_seed(seed))
