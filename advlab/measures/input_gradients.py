"""Input-gradient norms (Simon-Gabriel et al. 2019): the l1 and l2 norms of the gradient of the
cross-entropy loss with respect to the input pixels, per test point, summarised per trial.

Their claim: for the same task at a higher input resolution d, the l1 norm (the first-order gain
of an l_inf attack of budget eps is eps * ||grad||_1) grows like sqrt(d), while the l2 norm (an
l2 attack's gain) stays put. The sweep's dimension analysis (advlab.dimension) fits both against d.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.runtime import model_device
from advlab.strict import Strict

NORMS = ("l1", "l2")


def input_gradients(module: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> Tensor:
    """(N, d) gradient of each example's own cross-entropy loss with respect to its pixels
    (the loss summed over the batch, so no example's gradient is scaled by its batch size)."""
    device = model_device(module)
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch].to(device=device, dtype=torch.float32).requires_grad_(True)
        loss = F.cross_entropy(module(xb), y[start : start + batch].to(device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        out.append(grad.flatten(1).detach().cpu())
    return torch.cat(out) if out else x.new_zeros((0, x[0].numel()))


def gradient_norm_rows(grads: Tensor) -> Rows:
    """One row per norm: the mean, standard deviation and median over the examples."""
    rows = []
    for norm, p in zip(NORMS, (1, 2), strict=True):
        values = torch.linalg.vector_norm(grads.to(torch.float64), ord=p, dim=1).numpy()
        n = len(values)
        rows.append(
            {
                "norm": norm, "n": n, "input_dim": int(grads.shape[1]),
                "mean": float(values.mean()) if n else None,
                "std": float(values.std(ddof=1)) if n > 1 else None,
                "median": float(np.median(values)) if n else None,
            }
        )  # fmt: skip
    return rows


class InputGradientSettings(Strict):
    examples: int = Field(100, ge=1, le=10_000_000)  # the first N test points (clean labels)
    batch: int = Field(256, ge=1, le=1_000_000)  # examples per backward pass


def _run(ctx: MeasureContext, settings: InputGradientSettings) -> Rows:
    module = ctx.model.module.eval()
    x, y = ctx.data.x_test[: settings.examples], ctx.data.y_test[: settings.examples]
    return gradient_norm_rows(input_gradients(module, x, y, settings.batch))


def _metrics(rows: Rows) -> dict[str, float]:
    return {f"grad_{r['norm']}_mean": r["mean"] for r in rows if r["mean"] is not None}


INPUT_GRADIENTS = MeasureDef(
    name="input_gradients",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("norm", pa.string()),  # l1 or l2, of the loss gradient with respect to the pixels
            ("n", pa.int64()),  # test points
            ("input_dim", pa.int64()),  # d = C * H * W
            ("mean", pa.float64()),
            ("std", pa.float64()),  # over the test points (n - 1 in the denominator)
            ("median", pa.float64()),
        ]
    ),
    run=_run,
    settings=InputGradientSettings,
    needs="gradients",
    metrics=_metrics,
    report_by=("norm",),
    summary="Input gradients: l1 and l2 norms of the loss gradient on test points",
)
