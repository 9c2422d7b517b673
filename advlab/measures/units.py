"""Unit analysis (section 3 of the paper): are single units more interpretable than random
directions of the same layer? The paper compared by eye; this scores it with two numbers, the
label purity and the mean pairwise cosine similarity of the top-k held-out images along each
unit versus along random directions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from advlab.measures.lipschitz import forward_calls
from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.runtime import eval_mode, model_device
from advlab.strict import Strict


def label_purity(labels: Tensor) -> float:
    """Fraction of the labels equal to the most common one."""
    if labels.numel() == 0:
        raise ValueError("label_purity: needs at least one label")
    return float(torch.bincount(labels.flatten().long()).max()) / labels.numel()


def mean_pairwise_cosine(images: Tensor) -> float:
    """Mean cosine similarity over distinct pairs of the flattened images (1.0 for one image)."""
    n = images.shape[0]
    if n < 2:
        return 1.0
    flat = F.normalize(images.flatten(1).to(torch.float64), dim=1)
    gram = flat @ flat.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def _default_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The input of the last Linear (last hidden layer), or its output if it reads the pixels."""
    calls = forward_calls(model, input_shape)
    weighted = [c for c in calls if isinstance(c.module, nn.Linear | nn.Conv2d)]
    if not weighted or not isinstance(weighted[-1].module, nn.Linear):
        raise ValueError("unit_analysis: the model has no final Linear layer; name a layer")
    last = weighted[-1].name
    return last if len(weighted) == 1 else f"{last}:input"


def _features(model: nn.Module, x: Tensor, layer: str, batch_size: int = 512) -> Tensor:
    """(N, F) activations at ``layer``: a module's output, or its input with a ":input" suffix."""
    name, _, where = layer.partition(":")
    if where not in ("", "input"):
        raise ValueError(f"layer: {layer!r} must be a module name, optionally with ':input'")
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(
            f"layer: {name!r} is not a module of the model; use one of {list(modules)}"
        )
    captured: list[Tensor] = []

    def keep(value: Tensor) -> None:
        captured.append(value.detach().flatten(1).to(torch.float64).cpu())

    if where == "input":
        handle = modules[name].register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = modules[name].register_forward_hook(lambda _m, _a, out: keep(out))
    device = model_device(model)
    chunks: list[Tensor] = []
    try:
        with eval_mode(model), torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                captured.clear()
                model(x[start : start + batch_size].to(device))
                chunks.append(captured[0])  # first call: the module's place in the forward
    finally:
        handle.remove()
    return torch.cat(chunks)


def _top_k(scores: Tensor, k: int) -> Tensor:
    # Stable sort: ties (e.g. a ReLU unit at zero) resolve by index, the same on every run.
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _save_grid(images: Tensor, path: Path, min_side: int = 28) -> None:
    """Save (rows, k, C, H, W) images in [0, 1] as one PNG, a row per direction."""
    from PIL import Image

    rows, k, c, h, w = images.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    pad = 2
    canvas = np.ones((rows * (h * scale + pad) + pad, k * (w * scale + pad) + pad, c))
    pixels = images.clamp(0, 1).permute(0, 1, 3, 4, 2).cpu().numpy()
    for i in range(rows):
        for j in range(k):
            tile = pixels[i, j].repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            canvas[top : top + h * scale, left : left + w * scale] = tile
    array = (canvas * 255).round().astype(np.uint8)
    image = Image.fromarray(array[:, :, 0] if c == 1 else array[:, :, :3])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def unit_analysis(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layer: str | None = None,
    units: int = 8,
    top_k: int = 9,
    seed: int = 0,
    out_dir: str | None = None,
) -> Rows:
    """Score the top-k held-out images along unit versus random directions of ``layer``.

    ``layer`` is a module name (its output) or "name:input" (its input); the default is the input
    of the last Linear (the last hidden layer), or for a one-layer model (fc10) its logits.
    ``units`` units are drawn at random (seeded) among those that vary over x, and as many random
    unit-norm directions. Rows, one per kind of direction (natural: units, random): the mean
    label purity and mean pairwise cosine similarity of the top-k sets. With ``out_dir``, saves
    unit_analysis_natural.png and unit_analysis_random.png, one row of top-k images per
    direction.
    """
    if units < 1 or top_k < 1:
        raise ValueError(f"unit_analysis: units and top_k must be >= 1, got {units}, {top_k}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"unit_analysis: {x.shape[0]} images and {y.shape[0]} labels")
    layer = layer or _default_layer(model, tuple(x.shape[1:]))
    phi = _features(model, x, layer)
    gen = torch.Generator().manual_seed(seed)
    # A unit constant over x (a dead ReLU) would rank images by index alone.
    alive = torch.nonzero(phi.std(dim=0) > 0).flatten() if phi.shape[0] > 1 else None
    candidates = alive if alive is not None and alive.numel() else torch.arange(phi.shape[1])
    chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:units]]
    directions = torch.randn(units, phi.shape[1], generator=gen, dtype=torch.float64)
    directions = F.normalize(directions, dim=1)
    k = min(top_k, x.shape[0])
    sets = {
        "natural": [_top_k(phi[:, i], k) for i in chosen.tolist()],
        "random": [_top_k(phi @ v, k) for v in directions],
    }
    rows: Rows = []
    for kind, index_sets in sets.items():
        purity = [label_purity(y[idx.to(y.device)]) for idx in index_sets]
        similarity = [mean_pairwise_cosine(x[idx.to(x.device)]) for idx in index_sets]
        rows.append(
            {"layer": layer, "directions": kind, "purity": float(np.mean(purity)),
             "similarity": float(np.mean(similarity))}
        )  # fmt: skip
        if out_dir is not None:
            grid = torch.stack([x[idx.to(x.device)] for idx in index_sets])
            _save_grid(grid, Path(out_dir) / f"unit_analysis_{kind}.png")
    return rows


class UnitSettings(Strict):
    units: int = Field(8, ge=1, le=10_000)  # units drawn, and as many random directions
    top_k: int = Field(9, ge=2, le=10_000)  # images scored per direction
    layer: str | None = None  # a module name or "name:input"; None: the last hidden layer


def _run(ctx: MeasureContext, settings: UnitSettings) -> Rows:
    device = ctx.x_train.device
    return unit_analysis(
        ctx.model.module, ctx.data.x_test.to(device), ctx.data.y_test.to(device),
        layer=settings.layer, units=settings.units, top_k=settings.top_k, seed=ctx.seed,
        out_dir=ctx.files,
    )  # fmt: skip


def _metrics(rows: Rows) -> dict[str, float]:
    return {
        f"unit_analysis/{stat}_{r['directions']}": r[stat]
        for r in rows
        for stat in ("purity", "similarity")
    }


UNIT_ANALYSIS = MeasureDef(
    name="unit_analysis",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("layer", pa.string()),  # where the directions live
            ("directions", pa.string()),  # natural (single units) or random
            ("purity", pa.float64()),  # mean share of the top-k images with the modal label
            ("similarity", pa.float64()),  # mean pairwise cosine similarity of those images
        ]
    ),
    run=_run,
    settings=UnitSettings,
    needs="gradients",
    summary="Unit analysis: single units against random directions (§3)",
    metrics=_metrics,
)
