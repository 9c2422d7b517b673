"""Bounds: every attacked example bracketed between a certified lower bound on its minimum
adversarial distortion and the best adversarial any of the trial's attacks found.

Per example and norm (L2, Linf) the table holds one row per method:
- a bound-propagation method (ibp, crown-ibp, crown, alpha-crown: advlab.bounds) gives the
  largest radius it certifies, by bisection between 0 and the best attack's distortion;
- `exact` where the minimum can be computed (advlab.bounds.exact): closed forms for a linear
  model; for a small ReLU net a MILP (Linf, CBC) or MIQP (L2, SCIP) with CROWN's pre-activation
  bounds over the ball of the best attack's radius as big-M constants, under a time limit. A
  solve that hits the limit leaves the bracket [solver's bound, best found] (exact false).

`upper` is the best attack's distortion in that norm (null when no attack fooled the example),
`upper_attack` the attack that found it. An attack below a certified lower bound (or an exact
minimum) is impossible unless the attack or the bound is wrong: the measure flags it loudly.
`optimality` turns the table and the examples table into each attack's distance from the limit.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field

from advlab.bounds import BoundError, Chain, certified_radius, compile_model
from advlab.bounds.propagation import backward_neurons, crown_relaxed, input_set
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.runtime import eval_mode, model_device
from advlab.strict import Strict

BoundNorm = Literal["l2", "linf"]
BoundMethod = Literal["ibp", "crown-ibp", "crown", "alpha-crown"]
EXACT = "exact"
PER_NEURON = ("crown", "alpha-crown")  # methods whose cost grows with intermediate neurons
# An attack's distortion comes from float32 images through a float32 model; the bounds are of
# the float64 twin. 0.1% is far above that round-off on models this size and far below any bug.
FLAG_RTOL = 1e-3
# ... plus an absolute allowance for examples right at the boundary: float32 logits of size ~10
# are off by ~1e-6 each, which moves the boundary by under 1e-5 where input gradients exceed 1.
FLAG_ATOL = 1e-5
NEAR = 0.01  # "within 1% of the lower bound"
# Seconds past its time limit a solve may run before its worker is stopped (CBC checks its clock
# between nodes; on a 784-input MILP one node can take long): the example keeps its bracket.
GRACE = 10.0

SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("example", pa.int64()),  # position among the attacked examples (examples table)
        ("norm", pa.string()),  # l2 or linf
        ("method", pa.string()),  # ibp, crown-ibp, crown, alpha-crown, or exact
        ("lower", pa.float64()),  # certified: no adversarial lies closer
        ("upper", pa.float64()),  # the best attack's distortion; null when none fooled it
        ("upper_attack", pa.string()),  # that attack's label
        ("exact", pa.bool_()),  # lower is the minimum itself (exact rows the solver closed)
        ("status", pa.string()),  # certified (bound methods), skipped: why, or the solve's
        ("solver", pa.string()),  # closed form, cbc, scip, highs; empty for bound methods
        ("solver_upper", pa.float64()),  # an exact row's confirmed point's distance, if any
        ("seconds", pa.float64()),  # per example (a batched method's time shared out)
    ]
)


class BoundsSettings(Strict):
    norms: list[BoundNorm] = Field(default=["linf", "l2"], min_length=1)
    methods: list[BoundMethod] = Field(default=["ibp", "crown"], min_length=1)
    # auto: exact minima where the model allows (linear; ReLU nets of <= milp_units hidden units)
    exact: Literal["auto", "never"] = "auto"
    milp_units: int = Field(default=256, ge=0)
    time_limit: float = Field(default=5.0, gt=0)  # seconds per example and norm, MILP/MIQP
    examples: int | None = Field(default=None, ge=1)  # the first n attacked examples; None: all
    rtol: float = Field(default=1e-3, gt=0, lt=1)  # bisection: stop at upper - lower <= rtol*upper
    # crown and alpha-crown bound each intermediate neuron by a backward pass of its own; on a
    # model with more such neurons (a conv net at 28x28 has ~38,000) they are skipped, said in
    # the row's status, and ibp / crown-ibp carry the bracket.
    max_neurons: int = Field(default=8192, ge=0)


def best_attacks(examples: pd.DataFrame, norm: str, n: int) -> tuple[np.ndarray, list[str]]:
    """(distance (n,), attack label per example): the closest successful adversarial in `norm`
    among every attack run (inf and "" where none succeeded)."""
    hits = examples[examples["success"].astype(bool) & (examples["example"] < n)]
    column = f"dist_{norm}"
    best = np.full(n, math.inf)
    labels = [""] * n
    for example, attack, dist in zip(hits["example"], hits["attack"], hits[column], strict=True):
        if dist is not None and np.isfinite(dist) and dist < best[int(example)]:
            best[int(example)], labels[int(example)] = float(dist), str(attack)
    return best, labels


def _row(example: int, norm: str, method: str, lower: float, best: tuple, **rest: Any) -> dict:
    upper, attack = best
    return {
        "example": example,
        "norm": norm,
        "method": method,
        "lower": lower,
        "upper": upper if math.isfinite(upper) else None,
        "upper_attack": attack,
        "exact": rest.get("exact", False),
        "status": rest.get("status", "certified"),
        "solver": rest.get("solver", ""),
        "solver_upper": rest.get("solver_upper"),
        "seconds": rest["seconds"],
    }


def _propagated(
    chain: Chain, x: torch.Tensor, y: torch.Tensor, norm: str, method: str, upper: np.ndarray,
    rtol: float,
) -> list[float]:  # fmt: skip
    top = torch.as_tensor(upper, dtype=torch.float64)
    found = certified_radius(chain, x, y, norm=norm, method=method, upper=top, rtol=rtol)
    return [float(v) for v in found.lower.cpu()]


def layer_bounds(chain: Chain, x: torch.Tensor, radius: np.ndarray) -> list[tuple[Any, Any]]:
    """CROWN's bounds (B, n) on every hidden pre-activation over the box intersected with the
    Linf ball of `radius` (B,) around each example: the MILP's big-M constants."""
    s = input_set(chain, x, torch.as_tensor(radius, dtype=torch.float64), "linf")
    per_example = [crown_relaxed(chain, s.row(i)).bounds for i in range(len(x))]
    nodes = sorted(per_example[0])
    return [
        tuple(torch.cat([b[k][j] for b in per_example]).cpu().numpy() for j in (0, 1))
        for k in nodes
    ]


def _exact_results(
    ctx: MeasureContext, chain: Chain, x: torch.Tensor, y: torch.Tensor, norm: str,
    upper: np.ndarray, settings: BoundsSettings,
) -> tuple[list[Any], str] | None:  # fmt: skip
    """(advlab.bounds.exact's results per example, the solver), or None when the model is out
    of its reach (not a ReLU net of Linear layers, or too many hidden units for the MILP)."""
    # Imported here: the solver machinery is only loaded by trials that can use it.
    from advlab.bounds.exact import SOLVERS, linear_minimum, milp_minimum, relu_net

    module = ctx.model.module
    try:
        net = relu_net(module, tuple(x.shape[1:]))
    except ValueError:
        return None
    if len(net.weights) == 1:
        return linear_minimum(module, x, y, norm=norm), "closed form"
    if sum(len(b) for b in net.biases[:-1]) > settings.milp_units:
        return None
    # The minimiser lies within the best attack's distance in `norm`, so within that Linf ball.
    radius = np.where(np.isfinite(upper), upper * (1 + 1e-6) + 1e-9, 1.0)
    bounds = layer_bounds(chain, x, radius)
    found = milp_minimum(
        module,
        x,
        y,
        norm=norm,
        bounds=bounds,
        radius=radius,
        time_limit=settings.time_limit,
        grace=GRACE,
    )
    return found, SOLVERS[norm][0]


def _norm_rows(
    ctx: MeasureContext, chain: Chain, x: torch.Tensor, y: torch.Tensor, norm: str,
    best: tuple[np.ndarray, list[str]], settings: BoundsSettings,
) -> Rows:  # fmt: skip
    upper, labels = best
    rows: Rows = []
    neurons = backward_neurons(chain)
    for method in settings.methods:
        if method in PER_NEURON and neurons > settings.max_neurons:
            status = (f"skipped: {neurons} neurons to bound by backward passes, over "
                      f"max_neurons {settings.max_neurons}")  # fmt: skip
            rows += [
                _row(i, norm, method, math.nan, (upper[i], labels[i]), status=status, seconds=0.0)
                for i in range(len(x))
            ]
            continue
        start = time.perf_counter()
        lowers = _propagated(chain, x, y, norm, method, upper, settings.rtol)
        each = (time.perf_counter() - start) / max(len(x), 1)
        rows += [
            _row(i, norm, method, low, (upper[i], labels[i]), seconds=each)
            for i, low in enumerate(lowers)
        ]
    auto = settings.exact == "auto"
    exact = _exact_results(ctx, chain, x, y, norm, upper, settings) if auto else None
    if exact is not None:
        found, solver = exact
        rows += [
            _row(
                i, norm, EXACT, r.lower, (upper[i], labels[i]), exact=r.exact,
                status=r.status, solver=solver, solver_upper=r.upper, seconds=r.seconds,
            )
            for i, r in enumerate(found)
        ]  # fmt: skip
    return rows


def _run(ctx: MeasureContext, settings: BoundsSettings) -> Rows:
    assert ctx.results is not None
    module = ctx.model.module
    n = len(ctx.attacked.x) if settings.examples is None else settings.examples
    x, y = ctx.attacked.x[:n], ctx.attacked.y[:n]
    n = len(x)
    if n == 0:
        return []
    planned = {a.key for a in ctx.attacks}
    examples = ctx.results("examples").drop(columns="x_adv")
    examples = examples[examples["attack"].isin(planned)]
    with eval_mode(module):
        try:
            chain = compile_model(module, tuple(x.shape[1:]), device=model_device(module))
        except BoundError as err:
            raise ValueError(str(err)) from None
        rows: Rows = []
        for norm in settings.norms:
            rows += _norm_rows(ctx, chain, x, y, norm, best_attacks(examples, norm, n), settings)
    return rows


def below_bound(rows: Rows | pd.DataFrame) -> pd.DataFrame:
    """The rows where the best attack lies below the certified lower bound beyond round-off."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    upper = frame["upper"].astype("float64")
    return frame[upper < frame["lower"].astype("float64") * (1 - FLAG_RTOL) - FLAG_ATOL]


def _flag(rows: Rows) -> str | None:
    bad = below_bound(rows)
    if bad.empty:
        return None
    parts = [
        f"{attack} lands below the certified {method} bound in {norm} on {len(group)} examples "
        f"(e.g. example {int(group['example'].iloc[0])}: {group['upper'].iloc[0]:.6g} < "
        f"{group['lower'].iloc[0]:.6g})"
        for (attack, method, norm), group in bad.groupby(["upper_attack", "method", "norm"])
    ]
    return "a bug in an attack or in the bounds: " + "; ".join(parts)


def _metrics(rows: Rows) -> dict[str, float]:
    frame = pd.DataFrame(rows)
    out: dict[str, float] = {}
    if frame.empty:
        return out
    for (norm, method), group in frame.groupby(["norm", "method"]):
        gap = bracket_gap(group)
        out[f"bounds/{norm}/{method}/mean_lower"] = float(group["lower"].mean())
        out[f"bounds/{norm}/{method}/mean_gap"] = float(gap.mean()) if len(gap) else math.nan
    return out


def bracket_gap(rows: pd.DataFrame) -> pd.Series:
    """upper / lower per row, where both are known and lower > 0."""
    upper, lower = rows["upper"].astype("float64"), rows["lower"].astype("float64")
    keep = upper.notna() & (lower > 0)
    return upper[keep] / lower[keep]


BOUNDS = MeasureDef(
    name="bounds",
    scope="example",
    schema=SCHEMA,
    run=_run,
    settings=BoundsSettings,
    needs="gradients",
    reads_attacks=True,
    summary="Bracket: certified lower bound and best attack per example (mean of each)",
    report_by=("norm", "method"),
    metrics=_metrics,
    flag=_flag,
)
