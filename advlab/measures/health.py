"""Evaluation health checks, a measure: is every number of the trial's evaluation one to trust?

Each row is one check: its name, whether it passed (null when it cannot apply to the trial) and
a one-line detail with the numbers behind the verdict. A failed check raises the measure's flag
(W&B tag `health-flagged`, the sweep's summary, the report's Table 1), with the failed checks'
details as the reason. The checks need predictions only, so they run on every model family:

- `minimisation_success`: a minimisation attack has no budget, so it should fool every
  attacked example; one that stops short gave up, and its mean distortion (over successes only)
  leaves the hardest examples out;
- `inside_box`: every stored adversarial example lies in the image box [0, 1] (attacks promise
  it; an image outside it is no image, and its distortion and success mean nothing);
- `monotone_robust_error`: a fixed-budget attack's robust error never falls as its budget grows
  (a larger ball holds the smaller, so a drop is the attack failing, not the model resisting);
- `above_chance`: the model learnt something: its clean test error is clearly below chance, and
  it does not predict one class for every test image (PGD training at eps 0.2 without warm-up
  on digits once ended so, 90.6% test error, status ok, and every robust error was meaningless).

- `above_certified_bound`: no attack's adversarial lies closer than IBP's certified radius
  (L2 and Linf, per attacked example, for a gradient model the bounds can compile): one that
  does is a bug in the attack or the bounds, loudly. IBP is the cheap bound (a forward pass per
  bisection step); the `bounds` measure runs the tighter ones and checks against them too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from advlab.attacks.base import BOX_TOLERANCE
from advlab.attacks.registry import FIXED_BUDGET, MINIMIZATION
from advlab.measures.registry import MeasureContext, MeasureDef, Rows

# A drop this large (in robust-error points) counts as robust error falling: a few examples'
# worth on the usual few hundred attacked, so PGD's random start alone does not trip it.
NON_MONOTONE = 0.05
# A model whose test accuracy beats the best constant predictor's (1/K on a balanced test set)
# by less than this is at chance: 5 points is over 3 standard errors of an accuracy near 1/10
# measured on 450 test images (the digits' test split), so a model that learnt passes.
CHANCE_MARGIN = 0.05

Check = dict[str, Any]
OK = "ok"  # advlab.tables.Status.OK; tables imports spec, which imports the measures


def _check(name: str, passed: bool | None, detail: str) -> Check:
    return {"check": name, "passed": passed, "detail": detail}


def falling_robust_error(curves: Iterable[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """A reason per attack (of `keys`) whose robust error drops by NON_MONOTONE or more as its
    budget grows, naming the peak before the drop and the budget where it fell. The masking
    check reads the same for its gradient attacks."""
    rows = list(curves)
    reasons = []
    for key in keys:
        errors = sorted(
            (r["budget"], r["robust_error"])
            for r in rows
            if r["attack"] == key and r["robust_error"] is not None
        )
        peak_eps, peak = None, -1.0
        for eps, error in errors:
            if peak - error >= NON_MONOTONE:
                reasons.append(
                    f"{key} robust error falls from {peak:.1%} at eps {peak_eps:g} to "
                    f"{error:.1%} at eps {eps:g}, though the larger ball holds every adversarial "
                    f"of the smaller (a fall of {100 * (peak - error):.1f} points; the check "
                    f"needs {100 * NON_MONOTONE:.1f})"
                )
                break
            if error > peak:
                peak_eps, peak = eps, error
    return reasons


def minimisation_success(attacks: list[dict[str, Any]]) -> Check:
    """Every ok minimisation attack run of the trial fools all its examples."""
    name = "minimisation_success"
    runs = [
        r
        for r in attacks
        if r["kind"] == MINIMIZATION and r["status"] == OK and r["success_rate"] is not None
    ]
    if not runs:
        return _check(name, None, "no minimisation attack ran")
    short = [r for r in runs if r["success_rate"] < 1.0]
    if not short:
        names = ", ".join(r["attack"] for r in runs)
        return _check(name, True, f"{names}: 100% success with no budget limit")
    detail = "; ".join(
        f"{r['attack']} fools only {r['success_rate']:.1%} "
        f"({round(r['success_rate'] * r['n'])} of {r['n']}) with no budget limit"
        for r in short
    )
    return _check(name, False, detail)


def inside_box(examples: pd.DataFrame) -> Check:
    """Every stored adversarial pixel within BOX_TOLERANCE of [0, 1] (NaN counts as outside)."""
    name = "inside_box"
    if examples.empty:
        return _check(name, None, "no adversarial examples stored")
    outside = []
    for (attack, budget), group in examples.groupby(["attack", "budget"], dropna=False):
        images = np.stack(group["x_adv"].to_numpy()).astype(np.float64)
        bad = ~((images >= -BOX_TOLERANCE) & (images <= 1 + BOX_TOLERANCE))  # NaN is bad too
        if bad.any():
            where = attack if pd.isna(budget) else f"{attack} at eps {budget:g}"
            outside.append(
                f"{where}: {int(bad.sum())} pixel values of {int(bad.any(axis=1).sum())} "
                f"examples outside [0, 1] (min {np.nanmin(images):.4g}, "
                f"max {np.nanmax(images):.4g})"
            )
    if outside:
        return _check(name, False, "; ".join(outside))
    low, high = examples_range(examples)
    return _check(name, True, f"every adversarial pixel in [{low:.4g}, {high:.4g}]")


def examples_range(examples: pd.DataFrame) -> tuple[float, float]:
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in examples["x_adv"]])
    return float(values.min()), float(values.max())


def monotone_robust_error(curves: list[dict[str, Any]], fixed: list[str]) -> Check:
    """No fixed-budget attack (of `fixed`, with two budgets or more) loses strength as its
    budget grows."""
    name = "monotone_robust_error"
    budgets = {k: {r["budget"] for r in curves if r["attack"] == k} for k in fixed}
    judged = [k for k in fixed if len(budgets[k]) > 1]
    if not judged:
        return _check(name, None, "no fixed-budget attack ran at two budgets or more")
    falls = falling_robust_error(curves, judged)
    if falls:
        return _check(name, False, "; ".join(falls))
    return _check(name, True, f"{', '.join(judged)}: robust error never falls as eps grows")


def above_chance(predictions: Tensor, labels: Tensor, classes: int) -> Check:
    """The model beats the best constant predictor by CHANCE_MARGIN in test accuracy, and
    predicts more than one class."""
    name = "above_chance"
    if len(labels) == 0:
        return _check(name, None, "no test examples")
    predictions, labels = predictions.cpu(), labels.cpu()
    error = float((predictions != labels).double().mean())
    counts = torch.bincount(labels, minlength=classes)
    chance = 1.0 - float(counts.max()) / len(labels)  # 1 - 1/K on a balanced test set
    numbers = f"test error {error:.1%}, chance {chance:.1%} ({classes} classes)"
    found = predictions.unique()
    problems = []
    if error >= chance - CHANCE_MARGIN:
        problems.append(f"at chance: {numbers}")
    if len(found) == 1:
        problems.append(f"a constant predictor: all {len(labels)} test predictions are class "
                        f"{int(found[0])}")  # fmt: skip
    if problems:
        return _check(name, False, "; ".join(problems))
    return _check(name, True, f"{numbers}; predicts {len(found)} classes")


CERTIFIED_EXAMPLES = 100  # the first attacked examples checked against IBP (its cost is tiny)


def above_certified_bound(ctx: MeasureContext, examples: pd.DataFrame) -> Check:
    """Each norm's best attack per example at or above IBP's certified radius (up to float32
    round-off: advlab.measures.bounds.FLAG_RTOL and FLAG_ATOL)."""
    from advlab.bounds import BoundError, certified_radius, compile_model
    from advlab.measures.bounds import FLAG_ATOL, FLAG_RTOL, best_attacks

    name = "above_certified_bound"
    if not getattr(ctx.model, "gradients", False):
        return _check(name, None, "a prediction-only model: no bounds")
    x = ctx.attacked.x[:CERTIFIED_EXAMPLES]
    y = ctx.attacked.y[:CERTIFIED_EXAMPLES]
    try:
        chain = compile_model(ctx.model.module, tuple(x.shape[1:]))
    except BoundError as err:
        return _check(name, None, str(err))
    found, below = 0, []
    for norm in ("linf", "l2"):
        best, labels = best_attacks(examples, norm, len(x))
        if not np.isfinite(best).any():
            continue
        top = torch.as_tensor(best, dtype=torch.float64)
        lower = certified_radius(chain, x, y, norm=norm, method="ibp", upper=top).lower
        lower = lower.cpu().numpy()
        found += int(np.isfinite(best).sum())
        bad = np.isfinite(best) & (best < lower * (1 - FLAG_RTOL) - FLAG_ATOL)
        below += [f"{labels[i]} at {best[i]:.6g} < {lower[i]:.6g} in {norm} (example {i})"
                  for i in np.flatnonzero(bad)]  # fmt: skip
    if not found:
        return _check(name, None, "no attack fooled an example")
    if below:
        return _check(name, False, "a bug in an attack or the bounds: " + "; ".join(below[:3]))
    return _check(name, True, f"{found} adversarials, each at or above IBP's certified radius")


def _run(ctx: MeasureContext, settings: Any) -> Rows:
    assert ctx.results is not None
    planned = {a.key for a in ctx.attacks}  # the runs this measure's id follows
    attacks = ctx.results("attacks")
    attacks = attacks[attacks["attack"].isin(planned)].to_dict("records")
    curves = ctx.results("curves")
    curves = curves[curves["attack"].isin(planned)].to_dict("records")
    examples = ctx.results("examples")
    examples = examples[examples["attack"].isin(planned)]
    fixed = [a.key for a in ctx.attacks if a.defn.kind == FIXED_BUDGET]
    x_test, y_test = ctx.data.x_test, ctx.data.y_test
    return [
        minimisation_success(attacks),
        inside_box(examples),
        monotone_robust_error(curves, fixed),
        above_chance(ctx.model.predict(x_test), y_test, ctx.data.num_classes),
        above_certified_bound(ctx, examples.drop(columns="x_adv")),
    ]


def _flag(rows: Rows) -> str | None:
    failed = [r["detail"] for r in rows if r["passed"] is False]
    return "; ".join(failed) or None


def _metrics(rows: Rows) -> dict[str, float]:
    return {"health/failed_checks": float(sum(r["passed"] is False for r in rows))}


HEALTH = MeasureDef(
    name="health",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("check", pa.string()),  # minimisation_success, inside_box, ...
            ("passed", pa.bool_()),  # null: the check cannot apply to this trial
            ("detail", pa.string()),  # one line, the numbers behind the verdict
        ]
    ),
    run=_run,
    reads_attacks=True,
    summary="Evaluation health: checks that the trial's attacks and model can be trusted",
    report_by=("check",),  # the details are free text: Table 1's flags column shows them
    metrics=_metrics,
    flag=_flag,
)
