"""Lipschitz upper bounds per layer and for the whole network (section 4.3 of the paper).

The network bound is the product of per-layer bounds, each an upper bound on that layer's
Lipschitz constant in the L2 norm (biases never matter):

- Linear: the largest singular value of W.
- Conv2d: the paper's Fourier bound (:func:`conv_bound`). Convention: it is the *exact* operator
  norm of the *circular* (periodic) convolution on a grid of size (H + 2p, W + 2p), each side
  rounded up to a multiple of the stride. PyTorch's zero-padded convolution of an H x W input is
  that circular convolution applied to the zero-padded image embedded in the grid (no wrap-around
  can reach the image) and then restricted to the valid outputs; embedding and restriction have
  norm <= 1, so the bound holds for zero padding too. With padding 0 and H, W multiples of the
  stride the grid is the input itself and the bound is exact for the circular convolution of the
  input. Layers with ``padding_mode="circular"`` are bounded exactly on their own input grid.
- Activations: sigmoid 1/4, ReLU and tanh 1 (their derivatives' suprema).
- MaxPool: 1 for non-overlapping windows, sqrt(windows covering one pixel) if they overlap.
- Average pooling (incl. adaptive): exact, the largest singular value of the pooling matrix.
- BatchNorm (eval statistics): max |gamma / sqrt(running_var + eps)|.
- Flatten, Unflatten, Identity, Dropout (eval): 1.
- A torchvision residual block: bound(branch) + bound(shortcut), where the shortcut is 1 for the
  identity or the bound of its 1x1-conv + BatchNorm downsample; the block's inner layers are
  folded into that one factor (the block's closing ReLU is 1-Lipschitz).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn

from advlab.measures.registry import MeasureContext, MeasureDef, Rows
from advlab.runtime import eval_mode, model_device
from advlab.strict import NoSettings


@dataclass(frozen=True)
class LayerBound:
    """An upper bound on one layer's L2 Lipschitz constant; ``name`` is the module's path."""

    name: str
    kind: str
    bound: float


def linear_bound(weight: Tensor) -> float:
    """Largest singular value of a (out, in) weight matrix."""
    # float64 so a bound never comes out below the truth by float32 rounding.
    return float(torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


def conv_bound(
    weight: Tensor,
    input_hw: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    *,
    circular: bool = False,
) -> float:
    """The Fourier bound on a (D, C, kh, kw) convolution's operator norm (see module docstring).

    With (sh, sw) the stride and (M1, M2) the grid, the convolution in the frequency domain maps
    the C input spectra at the sh*sw frequencies that alias onto one output frequency eta to the D
    output spectra at eta, through A(eta), the D x (C sh sw) matrix of the kernels' 2-D DFTs on the
    grid at those aliased frequencies. Parseval then gives the norm sup_eta ||A(eta)||_2 /
    sqrt(sh sw) (the 1/(sh sw) of the aliasing sum, times sqrt(M1 M2 / M1' M2') = sqrt(sh sw)
    from the two grids' normalisations). ``circular=True`` bounds the circular convolution on the
    input grid itself (padding is then only a shift); H and W must be multiples of the stride.
    """
    if weight.ndim != 4:
        raise ValueError(f"weight: expected (D, C, kh, kw), got shape {tuple(weight.shape)}")
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    h, w = _pair(tuple(input_hw))
    if circular:
        if h % sh or w % sw:
            raise ValueError(f"circular: input {h}x{w} is not a multiple of the stride {sh}x{sw}")
        m1, m2 = h, w
    else:
        m1, m2 = -(-(h + 2 * ph) // sh) * sh, -(-(w + 2 * pw) // sw) * sw
    d, c, kh, kw = weight.shape
    kernel = weight.detach().to(torch.float64)
    # Kernel taps on the grid; a kernel larger than the grid wraps around (circular case only).
    grid = kernel.new_zeros(d, c, m1, m2)
    rows = torch.arange(kh, device=kernel.device) % m1
    cols = torch.arange(kw, device=kernel.device) % m2
    for a in range(kh):
        for b in range(kw):
            grid[:, :, rows[a], cols[b]] += kernel[:, :, a, b]
    # PyTorch convolves by cross-correlation, whose spectrum is the conjugate of this one; the
    # conjugate has the same singular values.
    spectrum = torch.fft.fft2(grid)  # (D, C, M1, M2)
    n1, n2 = m1 // sh, m2 // sw
    # Frequency xi = l * n + eta for alias l in [0, s): split each axis into (alias, eta).
    blocks = spectrum.reshape(d, c, sh, n1, sw, n2)
    # A real kernel has A(-eta) = conj(A(eta)) up to a column permutation (same singular
    # values), so half the output frequencies suffice.
    blocks = blocks[..., : n2 // 2 + 1].permute(3, 5, 0, 1, 2, 4).reshape(-1, d, c * sh * sw)
    return _largest_singular_value(blocks) / math.sqrt(sh * sw)


def _largest_singular_value(matrices: Tensor) -> float:
    """max over a batch of sigma_max, via the top eigenvalue of the smaller Gram matrix.

    Several times faster than batched SVD on CPU, and as accurate for the top singular value:
    float64 eigvalsh errs by ~eps * sigma_max^2 in sigma_max^2.
    """
    wide = matrices.shape[-2] <= matrices.shape[-1]
    gram = matrices @ matrices.mH if wide else matrices.mH @ matrices
    top = torch.linalg.eigvalsh(gram)[..., -1]
    return math.sqrt(max(float(top.max()), 0.0))


def _dense_kernel(conv: nn.Conv2d) -> Tensor:
    """The conv's kernel with groups expanded to block-diagonal form and dilation spelled out."""
    weight = conv.weight.detach()
    d, cg, kh, kw = weight.shape
    dh, dw = _pair(conv.dilation)
    if dh > 1 or dw > 1:
        dilated = weight.new_zeros(d, cg, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
        dilated[:, :, ::dh, ::dw] = weight
        weight, kh, kw = dilated, dilated.shape[2], dilated.shape[3]
    if conv.groups == 1:
        return weight
    dense = weight.new_zeros(d, cg * conv.groups, kh, kw)
    per_group = d // conv.groups
    for g in range(conv.groups):
        out = slice(g * per_group, (g + 1) * per_group)
        dense[out, g * cg : (g + 1) * cg] = weight[out]
    return dense


def _conv_layer_bound(conv: nn.Conv2d, input_shape: torch.Size) -> float:
    kernel = _dense_kernel(conv)
    hw = (int(input_shape[-2]), int(input_shape[-1]))
    if conv.padding_mode == "circular":
        return conv_bound(kernel, hw, conv.stride, conv.padding, circular=True)
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{conv}: padding_mode {conv.padding_mode!r} copies pixels, so the Fourier bound does "
            "not hold; use zeros or circular padding"
        )
    padding = conv.padding
    if isinstance(padding, str):  # "valid" or "same"
        kh, kw = kernel.shape[-2:]
        # "same" pads k - 1 in all, the larger half on one side: ceil covers both sides.
        padding = (0, 0) if padding == "valid" else (kh // 2, kw // 2)
    return conv_bound(kernel, hw, conv.stride, padding)


def _maxpool_bound(pool: nn.MaxPool2d) -> float:
    # |max a - max b| <= max |a - b|, so ||dy||^2 <= sum over windows of their ||dx||^2, which
    # counts each pixel once per window covering it.
    (kh, kw), (sh, sw), (dh, dw) = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.dilation)
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    cover = min(kh, math.ceil(span_h / sh)) * min(kw, math.ceil(span_w / sw))
    return math.sqrt(max(cover, 1))


def _linear_per_channel_bound(module: nn.Module, input_shape: torch.Size) -> float:
    """Exact norm of a parameter-free linear map acting on each channel alike (average pooling)."""
    h, w = int(input_shape[-2]), int(input_shape[-1])
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    matrix = module(basis).reshape(h * w, -1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _batchnorm_bound(bn: nn.modules.batchnorm._BatchNorm) -> float:
    if bn.running_var is None:
        raise ValueError(f"{bn}: keeps no running statistics, so its eval-mode map is unknown")
    scale = 1.0 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    return float(scale.abs().max())


_DROPOUT = nn.modules.dropout._DropoutNd  # every Dropout kind; the identity in eval mode
_ONE = (nn.Flatten, nn.Unflatten, nn.Identity, _DROPOUT, nn.ReLU, nn.Tanh)
_KINDS: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv2d: "conv2d",
    nn.Sigmoid: "sigmoid",
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.MaxPool2d: "maxpool",
    nn.AvgPool2d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.BatchNorm2d: "batchnorm",
    nn.BatchNorm1d: "batchnorm",
    nn.Flatten: "flatten",
    nn.Unflatten: "unflatten",
    nn.Identity: "identity",
    _DROPOUT: "dropout",
}


def _leaf_bound(module: nn.Module, input_shape: torch.Size) -> tuple[str, float]:
    """(kind, bound) of one leaf module seen with input of ``input_shape``."""
    kind = next((k for t, k in _KINDS.items() if isinstance(module, t)), None)
    if kind is None:
        raise ValueError(
            f"lipschitz_bounds: no bound for {type(module).__name__}; add one to "
            "advlab/measures/lipschitz.py before bounding this model"
        )
    if isinstance(module, nn.Linear):
        return kind, linear_bound(module.weight)
    if isinstance(module, nn.Conv2d):
        return kind, _conv_layer_bound(module, input_shape)
    if isinstance(module, nn.Sigmoid):
        return kind, 0.25
    if isinstance(module, nn.MaxPool2d):
        return kind, _maxpool_bound(module)
    if isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        return kind, _linear_per_channel_bound(module, input_shape)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return kind, _batchnorm_bound(module)
    assert isinstance(module, _ONE)
    return kind, 1.0


@dataclass(frozen=True)
class _Call:
    name: str
    module: nn.Module
    input_shape: torch.Size


def forward_calls(model: nn.Module, input_shape: tuple[int, int, int]) -> list[_Call]:
    """Every module call, in the order forward makes them, with its input's shape."""
    calls: list[_Call] = []
    handles = []
    for name, module in model.named_modules():

        def record(mod: nn.Module, args: tuple, name: str = name) -> None:
            calls.append(_Call(name, mod, args[0].shape))

        handles.append(module.register_forward_pre_hook(record))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    dummy = torch.zeros(1, *input_shape, device=model_device(model), dtype=dtype)
    try:
        # Eval mode: BatchNorm must use (and not update) its running statistics.
        with eval_mode(model), torch.no_grad():
            model(dummy)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _residual_bound(name: str, calls: list[_Call]) -> float:
    """bound(branch) + bound(shortcut) of the block called ``name``, from its inner calls."""
    branch, shortcut = 1.0, 1.0
    for call in calls:
        if not _inside(call.name, name) or list(call.module.children()):
            continue
        _, bound = _leaf_bound(call.module, call.input_shape)
        if _inside(call.name, f"{name}.downsample"):
            shortcut *= bound
        else:
            branch *= bound
    return branch + shortcut


def residual_blocks() -> tuple[type, ...]:
    """torchvision's residual block classes, if torchvision is loaded (else no model has them);
    importing it costs ~1.5 s per process, which fc-only sweeps need not pay."""
    resnet = sys.modules.get("torchvision.models.resnet")
    return (resnet.BasicBlock, resnet.Bottleneck) if resnet is not None else ()


def lipschitz_bounds(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerBound]:
    """Per-layer upper Lipschitz bounds in forward order (a module called twice counts twice)."""
    calls = forward_calls(model, tuple(int(s) for s in input_shape))
    bounds: list[LayerBound] = []
    block: str | None = None
    for call in calls:
        if block is not None and _inside(call.name, block):
            continue  # folded into the residual block's bound
        if isinstance(call.module, residual_blocks()):
            block = call.name
            bound = _residual_bound(call.name, calls)
            bounds.append(LayerBound(call.name, "residual", bound))
        elif not list(call.module.children()):
            kind, bound = _leaf_bound(call.module, call.input_shape)
            bounds.append(LayerBound(call.name, kind, bound))
    return bounds


def network_bound(bounds: list[LayerBound]) -> float:
    """Upper bound on the whole network's Lipschitz constant: the product of the layers'."""
    return math.prod(b.bound for b in bounds)


def lipschitz_rows(model: nn.Module, input_shape: tuple[int, int, int]) -> Rows:
    """One row per layer (its module path and kind) plus one for layer "network", the product.

    Layers whose bound is exactly 1 (flatten, relu, identity) change nothing and are left out.
    """
    bounds = lipschitz_bounds(model, input_shape)
    rows: Rows = [
        {"layer": b.name, "kind": b.kind, "bound": b.bound} for b in bounds if b.bound != 1.0
    ]
    rows.append({"layer": "network", "kind": "network", "bound": network_bound(bounds)})
    return rows


def _run(ctx: MeasureContext, settings: Any) -> Rows:
    return lipschitz_rows(ctx.model.module, ctx.data.input_shape)


def _metrics(rows: Rows) -> dict[str, float]:
    network = [r["bound"] for r in rows if r["layer"] == "network"]
    return {"lipschitz/upper_bound": network[0]} if network else {}


LIPSCHITZ = MeasureDef(
    name="lipschitz",
    scope="trial",
    schema=pa.schema(
        [
            ("trial_id", pa.string()),
            ("layer", pa.string()),  # the module's path, or "network" for the product
            ("kind", pa.string()),  # linear, conv2d, sigmoid, maxpool, residual, ...
            ("bound", pa.float64()),  # upper bound on the L2 Lipschitz constant
        ]
    ),
    run=_run,
    settings=NoSettings,
    needs="gradients",
    summary="Lipschitz upper bounds per layer and for the network (§4.3, Table 5)",
    report_by=("layer", "kind"),
    report_across=("layer", "kind"),  # the paper's Table 5: a row per model, a column per layer
    metrics=_metrics,
)
