"""The gradient-masking check, a measure: a strong attack set for adversarially trained
models, and the signs of masking in a trial's attack results.

A defence can look robust because its gradients stopped pointing anywhere useful (saturated
softmax, shattered or noisy gradients, a loss surface curved just where FGSM looks) rather than
because its decision boundary moved. Athalye et al. 2018 and Carlini et al. 2019 list the tell-
tale signs; the ones checked here need nothing beyond the trial's own attacks:

- single-step FGSM finds far fewer adversarials than iterative PGD at the same budget, within
  the budget the model was adversarially trained at (the signature of FGSM training's
  catastrophic overfitting: the model bends its loss so that one step from x fails inside that
  ball). Beyond the training budget every adversarially trained model loses its robustness
  within a few hundredths of eps, PGD follows that cliff while one linear step from x, where the
  loss was made flat, does not: the gap is there whether or not gradients are masked, and PGD
  finding the adversarials shows they are not. A model trained without perturbations has no
  such ball, so it is compared at every budget;
- a minimum-norm attack finds adversarials within a budget where PGD, which maximises the loss
  over exactly that budget, finds fewer: PGD's gradients mislead it;
- PGD with the whole box as its budget (any image is reachable) does not fool nearly every
  example;
- a fixed-budget attack gets weaker as its budget grows.

The flag means "look closer", not "broken": each reason names the sign, the numbers behind it
and the threshold they crossed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import pyarrow as pa
import torch

from advlab.attacks.registry import MINIMIZATION
from advlab.measure import robust_error, success_at_budgets
from advlab.measures.health import falling_robust_error
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.strict import Strict


class MaskingSettings(Strict):
    # auto: the strong set for adversarially trained models; always; never (the sweep's only).
    strong_attacks: Literal["auto", "always", "never"] = "auto"


# The strong set, written as a sweep file's attack entries (advlab.plan makes them AttackSpecs).
STRONG_PGD = {"name": "pgd", "label": "strong_pgd", "steps": 50, "restarts": 5}
STRONG_MIN_NORM = {"name": "deepfool", "label": "strong_deepfool", "norm": "linf"}
PROBE_EPS = 1.0  # Linf 1 reaches every image in the box, so PGD should fool every example
PROBE_PGD = {"name": "pgd", "label": "strong_pgd_box", "eps": [PROBE_EPS], "steps": 50}

# Thresholds, in robust-error points on the attacked examples: loose enough that a normal
# model (FGSM somewhat weaker than PGD, DeepFool's L2 steps scored in Linf) never trips them.
FGSM_GAP = 0.25  # and FGSM finds under half of what PGD finds
MIN_NORM_LEAD = 0.05
PROBE_SUCCESS = 0.99
EPS_MATCH = 1e-9  # budgets equal to the training budget, whatever their decimal spelling


def strong_attacks(spec: Any, settings: MaskingSettings) -> list[dict[str, Any]]:
    """The attacks the check adds to a trial's (advlab.spec.TrialSpec) list, as sweep-file
    entries: PGD with restarts, a minimum-norm attack and the whole-box PGD probe, each unless
    the sweep already asked for one like it; `auto` adds them to adversarially trained models
    only."""
    wanted = settings.strong_attacks
    if wanted == "never" or (wanted == "auto" and not spec.adversarially_trained):
        return []
    pgd = [a for a in spec.attacks if a.name == "pgd" and a.budget_norm == "linf"]
    added = []
    if not any(a.settings.model_dump()["restarts"] > 1 for a in pgd):
        added.append(STRONG_PGD)
    if not any(a.defn.kind == MINIMIZATION for a in spec.attacks):
        added.append(STRONG_MIN_NORM)
    if not any(max(spec.budgets(a)) >= PROBE_EPS for a in pgd):
        added.append(PROBE_PGD)
    taken = {a.key for a in spec.attacks}
    return [a for a in added if a["label"] not in taken]


def assess_masking(
    plan: list[Any],
    curves: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    clean_wrong: int,
    trained_eps: float | None = None,
) -> tuple[bool | None, str | None]:
    """(flag, reasons) from a trial's attack plan (AttackSpecs), curves and examples rows;
    (None, None) when the attacks run allow no check (no PGD in Linf). `trained_eps`: the
    Linf budget the model was adversarially trained at (None: trained without perturbations),
    which bounds the budgets FGSM and PGD are compared at."""
    pgd_keys = [a.key for a in plan if a.name == "pgd" and a.budget_norm == "linf"]
    if not pgd_keys:
        return None, None
    # The whole-box probe is judged on its own; comparisons use the budgets below it.
    pgd = {e: v for e, v in _worst(curves, pgd_keys, "robust_error").items() if e < PROBE_EPS}
    fgsm = _worst(curves, [a.key for a in plan if a.name == "fgsm"], "robust_error")
    minimum = {
        a.key: _linf_robust_error(examples, a.key, sorted(pgd), clean_wrong)
        for a in plan
        if a.defn.kind == MINIMIZATION
    }
    reasons = [
        *_fgsm_gap(fgsm, pgd, trained_eps),
        *_min_norm_lead(minimum, pgd),
        *_probe_short(_worst(curves, pgd_keys, "success_rate")),
        *falling_robust_error(curves, [a.key for a in plan if a.name in ("fgsm", "pgd")]),
    ]
    return bool(reasons), "; ".join(reasons)


def _worst(curves: list[dict[str, Any]], keys: Iterable[str], column: str) -> dict[float, float]:
    """Per budget, the highest value of `column` over the given attacks (the strongest one)."""
    wanted = set(keys)
    worst: dict[float, float] = {}
    for row in curves:
        if row["attack"] in wanted and row[column] is not None:
            worst[row["budget"]] = max(worst.get(row["budget"], 0.0), row[column])
    return worst


def _linf_robust_error(
    examples: list[dict[str, Any]], key: str, budgets: list[float], clean_wrong: int
) -> dict[float, float]:
    """A minimisation attack's robust error at Linf budgets, whatever norm it was scored in."""
    rows = [r for r in examples if r["attack"] == key]
    if not rows and not clean_wrong:
        return {}
    success = torch.tensor([bool(r["success"]) for r in rows], dtype=torch.bool)
    distance = torch.tensor([float(r["dist_linf"]) for r in rows], dtype=torch.float64)
    hits = success_at_budgets(success, distance, budgets)
    return {eps: robust_error(hit, clean_wrong) for eps, hit in zip(budgets, hits, strict=True)}


def _fgsm_gap(
    fgsm: dict[float, float], pgd: dict[float, float], trained_eps: float | None
) -> list[str]:
    """FGSM far behind PGD at a budget the model was trained to resist (see the module's
    docstring for why beyond it the gap means nothing)."""
    within = "" if trained_eps is None else f", within the training budget {trained_eps:g}"
    return [
        f"FGSM robust error {fgsm[eps]:.1%} vs PGD {pgd[eps]:.1%} at eps {eps:g}{within}: "
        f"one step finds under half of what PGD finds ({_points(pgd[eps] - fgsm[eps])} apart; "
        f"the check needs {_points(FGSM_GAP)} and under half)"
        for eps in sorted(set(fgsm) & set(pgd))
        if (trained_eps is None or eps <= trained_eps + EPS_MATCH)
        and pgd[eps] - fgsm[eps] >= FGSM_GAP
        and fgsm[eps] <= pgd[eps] / 2
    ]


def _min_norm_lead(minimum: dict[str, dict[float, float]], pgd: dict[float, float]) -> list[str]:
    return [
        f"{key} (minimum norm) robust error {errors[eps]:.1%} vs PGD {pgd[eps]:.1%} at eps "
        f"{eps:g}: PGD, maximising the loss over that ball, misses adversarials a minimum-norm "
        f"attack finds in it ({_points(errors[eps] - pgd[eps])} more; the check needs "
        f"{_points(MIN_NORM_LEAD)})"
        for key, errors in minimum.items()
        for eps in sorted(errors)
        if errors[eps] - pgd[eps] >= MIN_NORM_LEAD
    ]


def _probe_short(success: dict[float, float]) -> list[str]:
    return [
        f"PGD fools only {rate:.1%} at eps {eps:g}, where every image is within reach (the "
        f"check needs {PROBE_SUCCESS:.0%})"
        for eps, rate in sorted(success.items())
        if eps >= PROBE_EPS and rate < PROBE_SUCCESS
    ]


def _points(share: float) -> str:
    return f"{100 * share:.1f} points"


def _run(ctx: MeasureContext, settings: MaskingSettings) -> Rows:
    assert ctx.results is not None
    curves = ctx.results("curves").to_dict("records")
    examples = ctx.results("examples").drop(columns="x_adv").to_dict("records")
    trained = ctx.spec.train.adversarial.eps if ctx.spec.adversarially_trained else None
    flag, reason = assess_masking(
        ctx.attacks, curves, examples, ctx.attacked.n_clean_wrong, trained_eps=trained
    )
    return [{"flagged": flag, "reason": reason or ""}]


def _flag(rows: Rows) -> str | None:
    return next((r["reason"] for r in rows if r["flagged"]), None)


def _metrics(rows: Rows) -> dict[str, float]:
    verdicts = [r["flagged"] for r in rows if r["flagged"] is not None]
    return {"gradient_masking": float(verdicts[0])} if verdicts else {}


MASKING = MeasureDef(
    name="masking",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("flagged", pa.bool_()),  # possible gradient masking; null: no check possible
            ("reason", pa.string()),  # the signs that raised the flag ("" when none did)
        ]
    ),
    run=_run,
    settings=MaskingSettings,
    reads_attacks=True,
    summary="Gradient masking: signs that the attacks' gradients mislead them",
    report_by=(),  # the reasons are free text: Table 1 shows them
    metrics=_metrics,
    flag=_flag,
    attacks=strong_attacks,
)
