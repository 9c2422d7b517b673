"""AttackBench-style quality at equal budgets of gradient evaluations (Cina et al. 2025).

Every minimum-norm attack runs at 100, 300 and 1,000 gradient evaluations (forward + backward
passes) per example: DDN, FMN and ALMA get that many steps; advlab C&W that many Adam steps
split over its rounds (5 x 20, 6 x 50, 10 x 100); advlab L-BFGS a hard cap on its evaluations
(`max_evals`; the 3-nearest search splits it over its three targets after the 10 evaluations of
the linearised distances), with 10, 20 and 100 iterations per solve (its default of 10 ends the
search well under 300 evaluations); "3 nearest from DDN" ("from ALMA") spends 25, 50 and 50 of
the budget on DDN (ALMA at step size 1.0), whose points start the 3-nearest search (`start=`),
and caps the search at the rest. Each attack's result is the closest adversarial point it
returns.

Scores per model, over the same correctly classified examples:
- success and mean L2 over the attack's own successes;
- optimality: (rho eps0 - AUREC_attack) / (rho eps0 - AUREC_best), AUREC the area under the
  robust-accuracy curve on [0, eps0], "best" the per-example minimum over every run of every
  attack at every budget, rho the clean accuracy of the examples (1 here: all are correctly
  classified) and eps0 the largest of those per-example minima, so the best curve reaches 0.
  With per-example distances d (inf where the attack failed) the area is mean(min(d, eps0)),
  so optimality = mean(eps0 - min(d, eps0)) / mean(eps0 - d_best): 1 for the per-example best.

Run through `benchmarks/attacks.py --budgets` (or `--budget-only`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from advlab.attacks import AttackResult, alma, carlini_wagner, ddn, fmn, lbfgs_attack

BUDGETS = (100, 300, 1000)
CW_ROUNDS = {100: (5, 20), 300: (6, 50), 1000: (10, 100)}  # budget -> (rounds, steps)
# L-BFGS iterations per solve at each budget: its default (10) ends the search well under 300
# evaluations, so larger budgets let each solve run longer (100: the ce default).
LBFGS_ITERS = {100: 10, 300: 20, 1000: 100}
# Steps of the attack that starts a "from ..." L-BFGS row (`start=`); the rest is L-BFGS's.
START_STEPS = {100: 25, 300: 50, 1000: 50}
STARTS = {  # the start attacks, as the timing table runs them
    "DDN": lambda m, x, y, steps: ddn(m, x, y, steps=steps),
    "ALMA": lambda m, x, y, steps: alma(m, x, y, steps=steps, lr_init=1.0),
}

Attack = Callable[[nn.Module, Tensor, Tensor, int], tuple[Tensor, float]]


def _ours(run: Callable[..., object]) -> Callable[..., tuple[Tensor, float]]:
    def go(*args: object) -> tuple[Tensor, float]:
        result = run(*args)
        return result.x_adv, float(result.grad_evals.float().max())  # type: ignore[attr-defined]

    return go


def advlab_attacks() -> dict[str, Attack]:
    return {
        "advlab L-BFGS margin, 3 nearest": _ours(
            lambda m, x, y, b: lbfgs_attack(
                m,
                x,
                y,
                "all",
                loss="margin",
                candidates=3,
                max_evals=(b - 10) // 3,
                max_iter=LBFGS_ITERS[b],
            )
        ),
        **{
            f"advlab L-BFGS margin, 3 nearest from {name}": _ours(_lbfgs_from(name))
            for name in STARTS
        },
        "advlab L-BFGS margin, untargeted": _ours(
            lambda m, x, y, b: lbfgs_attack(
                m, x, y, "untargeted", loss="margin", max_evals=b, max_iter=LBFGS_ITERS[b]
            )
        ),
        "advlab DDN": _ours(lambda m, x, y, b: ddn(m, x, y, steps=b)),
        "advlab FMN-L2": _ours(lambda m, x, y, b: fmn(m, x, y, steps=b)),
        "advlab ALMA-L2": _ours(lambda m, x, y, b: alma(m, x, y, steps=b)),
        "advlab C&W": _ours(
            lambda m, x, y, b: carlini_wagner(
                m, x, y, search_steps=CW_ROUNDS[b][0], steps=CW_ROUNDS[b][1]
            )
        ),
    }


def _lbfgs_from(start: str) -> Callable[[nn.Module, Tensor, Tensor, int], AttackResult]:
    """The start attack for START_STEPS[b] steps, then the 3-nearest search with the rest."""

    def run(m: nn.Module, x: Tensor, y: Tensor, b: int) -> AttackResult:
        first = STARTS[start](m, x, y, START_STEPS[b])
        rest = (b - START_STEPS[b] - 10) // 3
        result = lbfgs_attack(m, x, y, "all", loss="margin", candidates=3, start=first.x_adv,
                              max_evals=rest, max_iter=LBFGS_ITERS[b])  # fmt: skip
        return replace(result, grad_evals=result.grad_evals + first.grad_evals)

    return run


def peer_attacks(with_alma: bool = True) -> dict[str, Attack]:
    out: dict[str, Attack] = {}
    try:
        from adv_lib.attacks import alma as advlib_alma
        from adv_lib.attacks import ddn as advlib_ddn
        from adv_lib.attacks import fmn as advlib_fmn

        if with_alma:
            out["adv-lib ALMA-L2"] = lambda m, x, y, b: (advlib_alma(m, x, y, num_steps=b), b)
        out["adv-lib DDN"] = lambda m, x, y, b: (advlib_ddn(m, x, y, steps=b, levels=None), b)
        out["adv-lib FMN-L2"] = lambda m, x, y, b: (advlib_fmn(m, x, y, norm=2, steps=b), b)
    except ImportError as err:
        print(f"  adv-lib unavailable ({err})", file=sys.stderr)
    try:
        import foolbox as fb

        def foolbox(attack: Callable[[int], object]) -> Attack:
            def go(m: nn.Module, x: Tensor, y: Tensor, b: int) -> tuple[Tensor, float]:
                fmodel = fb.PyTorchModel(m, bounds=(0, 1))
                return attack(b)(fmodel, x, y, epsilons=None)[1], b  # type: ignore[operator]

            return go

        out["Foolbox DDN"] = foolbox(lambda b: fb.attacks.DDNAttack(steps=b))
        out["Foolbox FMN-L2"] = foolbox(lambda b: fb.attacks.L2FMNAttack(steps=b))
    except ImportError as err:
        print(f"  foolbox unavailable ({err})", file=sys.stderr)
    return out


def distances(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    """(N,) L2 distance of each fooling point, inf where the model still predicts y."""
    with torch.no_grad():
        adv = x_adv.to(x.dtype).clamp(0, 1)
        fooled = model(adv).argmax(1) != y
    d = (adv - x).flatten(1).norm(dim=1)
    return torch.where(fooled, d, torch.full_like(d, math.inf))


def optimality(d: Tensor, best: Tensor) -> float:
    """AttackBench's optimality of distances d against the per-example best (module doc)."""
    eps0 = float(best.max())
    ideal = float((eps0 - best).mean())
    return float((eps0 - d.clamp(max=eps0)).mean()) / ideal if ideal > 0 else math.nan


def budget_table(model: nn.Module, x: Tensor, y: Tensor, title: str, with_alma: bool = True) -> str:
    """Run every attack at every budget; markdown table of success, mean L2 and optimality."""
    attacks = {**advlab_attacks(), **peer_attacks(with_alma)}
    runs: dict[tuple[str, int], tuple[Tensor, float]] = {}
    for budget in BUDGETS:
        for name, attack in attacks.items():
            x_adv, spent = attack(model, x, y, budget)
            runs[name, budget] = (distances(model, x, y, x_adv.detach().cpu()), spent)
            print(f"  budget {budget}: {name} done", flush=True)
    best = torch.stack([d for d, _ in runs.values()]).amin(dim=0)
    head = " | ".join(f"{b}: success / mean L2 / optimality" for b in BUDGETS)
    lines = [
        f"### {title}: quality at equal budgets ({len(x)} examples)",
        "",
        f"| attack | {head} |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for name in attacks:
        cells = []
        for budget in BUDGETS:
            d, spent = runs[name, budget]
            ok = torch.isfinite(d)
            mean = float(d[ok].mean()) if ok.any() else math.nan
            cells.append(f"{ok.float().mean():.0%} / {mean:.4f} / {optimality(d, best):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nPer-example best over every run: mean L2 {float(best.mean()):.4f}, "
        f"eps0 = {float(best.max()):.4f}. advlab L-BFGS evaluations are capped by max_evals "
        "(most spent by any example: "
        + ", ".join(
            f"{b}: {runs['advlab L-BFGS margin, 3 nearest', b][1]:.0f}"
            for b in BUDGETS
            if ("advlab L-BFGS margin, 3 nearest", b) in runs
        )
        + ")."
    )
    return "\n".join(lines)
