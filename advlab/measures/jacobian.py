"""Jacobian norms: how much a model's representation moves per unit of input, on test points.

Per trial, the Frobenius norm ||J(x)||_F of two Jacobians, each by autograd (one reverse pass
per output unit over a chunk of examples):
- ``code``: d code / d x, the representation an autoencoder's classifier reads (its ``encode``;
  a contractive autoencoder penalises the square of this during pretraining, Rifai et al. 2011);
  only models with an ``encode``;
- ``logits``: d logits / d x, for every torch model (the fc baselines included).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyarrow as pa
import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.models import Normalized
from advlab.runtime import eval_mode, model_device
from advlab.strict import Strict

Map = Callable[[Tensor], Tensor]


def code_map(module: nn.Module) -> Map | None:
    """The map from pixels to the code a classifier reads, or None for models without one."""
    if isinstance(module, Normalized):
        inner = code_map(module.inner)
        return None if inner is None else (lambda x: inner(module.standardize(x)))
    encode = getattr(module, "encode", None)
    return encode if callable(encode) else None


def jacobian_norms(fn: Map, x: Tensor, chunk: int = 128) -> Tensor:
    """(N,) ||d fn(x_i) / d x_i||_F for each example; fn maps a batch (B, ...) to (B, k).

    One reverse pass per output unit over a chunk of examples: the gradient of a unit's sum over
    the chunk is each example's own row of J, as one example's output never reads another's (a
    model in eval mode). torch.func's vmap would do the same after seconds of first-call set-up.
    """
    out = []
    for part in x.split(chunk):
        inputs = part.detach().requires_grad_(True)
        with torch.enable_grad():
            outputs = fn(inputs).flatten(1)
            squares = torch.zeros(len(part), dtype=outputs.dtype, device=outputs.device)
            for unit in range(outputs.shape[1]):
                (row,) = torch.autograd.grad(outputs[:, unit].sum(), inputs, retain_graph=True)
                squares += row.flatten(1).pow(2).sum(dim=1)
        out.append(squares.sqrt())
    return torch.cat(out) if out else x.new_zeros(0)


class JacobianSettings(Strict):
    examples: int = Field(100, ge=1, le=1_000_000)  # the first N test images
    chunk: int = Field(128, ge=1, le=100_000)  # examples per backward pass


def _row(of: str, norms: Tensor) -> dict[str, object]:
    values = norms.to(torch.float64)
    n = len(values)
    sd = float(values.std()) if n > 1 else math.nan
    return {
        "of": of,
        "examples": n,
        "frobenius": float(values.mean()),
        "frobenius_sd": None if math.isnan(sd) else sd,
        "frobenius_sq": float(values.pow(2).mean()),
    }


def _run(ctx: MeasureContext, settings: JacobianSettings) -> Rows:
    module = ctx.model.module
    x = ctx.data.x_test[: settings.examples].to(model_device(module))
    rows = []
    with eval_mode(module):
        code = code_map(module)
        if code is not None:
            rows.append(_row("code", jacobian_norms(code, x, settings.chunk)))
        rows.append(_row("logits", jacobian_norms(module, x, settings.chunk)))
    return rows


def _metrics(rows: Rows) -> dict[str, float]:
    return {f"jacobian/{r['of']}": r["frobenius"] for r in rows}


JACOBIAN = MeasureDef(
    name="jacobian",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("of", pa.string()),  # code (an autoencoder's encoder) or logits
            ("examples", pa.int64()),  # test images measured
            ("frobenius", pa.float64()),  # mean ||J||_F over them
            ("frobenius_sd", pa.float64()),  # its standard deviation over the examples
            ("frobenius_sq", pa.float64()),  # mean ||J||_F^2: the contractive penalty's scale
        ]
    ),
    run=_run,
    settings=JacobianSettings,
    needs="gradients",
    summary="Jacobian norms: ||d code / d x||_F and ||d logits / d x||_F on test points",
    report_by=("of",),
    metrics=_metrics,
)
