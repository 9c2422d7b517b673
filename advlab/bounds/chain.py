"""compile_model: a torch model -> :class:`~advlab.bounds.layers.Chain`, or a one-line BoundError.

How a model that is not a plain chain is caught, in three steps:

1. Structure: every module on the path must run a ``forward`` defined by a class we know (found
   along its MRO, and not overridden on the instance): nn.Sequential, advlab's Normalized,
   SmallCNN and AutoencoderClassifier as containers, whose forwards are known compositions of
   their children; the supported layers as leaves. A subclass with its own forward, a residual
   block or a custom module is refused here, named with its module path.
2. Trace: a forward of a float64 copy of the model, with a pre-hook on every module, must call
   exactly the chain's leaves, each once, in chain order (by identity, so a layer reused twice
   in a Sequential is fine).
3. Values: on random inputs in [0, 1] that copy's output must equal the chain's within 4x the
   derived round-off bound of either computation (:func:`roundoff_bound`), which catches hooks
   that change values. A real difference is of the order of the values themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from advlab.bounds.layers import (
    SUPPORTED,
    Activation,
    AvgPool,
    BoundError,
    Chain,
    Conv,
    Dense,
    LinearOp,
    MaxPool,
    Op,
    Reshape,
    Scale,
    refusal,
)
from advlab.models import AutoencoderClassifier, Normalized, SmallCNN, Standardize
from advlab.runtime import eval_mode, model_device

__all__ = ["compile_model", "roundoff_bound"]

Children = Callable[[nn.Module], list[tuple[str, nn.Module]]]

# Containers whose forward applies these children in this order and nothing else.
_CONTAINERS: dict[type[nn.Module], Children] = {
    nn.Sequential: lambda m: list(m.named_children()),
    Normalized: lambda m: [("standardize", m.standardize), ("inner", m.inner)],
    SmallCNN: lambda m: [("features", m.features), ("head", m.head)],
    # The decoder only serves reconstruction; forward is classifier(encoder(x)).
    AutoencoderClassifier: lambda m: [("encoder", m.encoder), ("classifier", m.classifier)],
}
_IDENTITIES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
_LEAVES = (
    nn.Linear, nn.Conv2d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Flatten, nn.Unflatten, nn.AvgPool2d,
    nn.MaxPool2d, Standardize, *_IDENTITIES,
)  # fmt: skip
_HINTS = {
    nn.BatchNorm1d: "fold its eval statistics into the layer before it first",
    nn.BatchNorm2d: "fold its eval statistics into the layer before it first",
}


def _forward_class(module: nn.Module) -> type | None:
    """The class whose forward this module runs; None if the instance overrides it."""
    if "forward" in vars(module):
        return None
    return next(c for c in type(module).__mro__ if "forward" in vars(c))


def _why_not(module: nn.Module, cls: type | None) -> str:
    if cls is None:
        return "its forward is replaced on the instance"
    hint = next((h for t, h in _HINTS.items() if isinstance(module, t)), None)
    if hint:
        return hint
    if isinstance(module, tuple(_CONTAINERS) + _LEAVES):
        return f"its forward ({cls.__name__}.forward) is not the plain one"
    kind = "container (not a plain chain)" if list(module.children()) else "layer"
    return f"an unsupported {kind}; bounds are propagated through {SUPPORTED} only"


def leaves(module: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    """The model's leaf layers in forward order, with their module paths; BoundError if the
    forward of some module on the way is not known to be a plain chain of them."""
    cls = _forward_class(module)
    if cls in _CONTAINERS:
        found = []
        for name, child in _CONTAINERS[cls](module):
            found += leaves(child, f"{path}.{name}" if path else name)
        return found
    if cls in _LEAVES:
        return [(path, module)]
    raise refusal(module, path, _why_not(module, cls))


def _reshape_op(path: str, module: nn.Module, shape: tuple[int, ...], to: dict) -> Reshape:
    out = module(torch.zeros(2, *shape, **to))
    if out.shape[0] != 2:
        raise refusal(module, path, "it reshapes the batch dimension")
    return Reshape(path, shape, tuple(out.shape[1:]))


def _make_op(path: str, module: nn.Module, shape: tuple[int, ...], to: dict) -> Op | None:
    kinds = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    builders: dict[type, type] = {
        nn.Linear: Dense, nn.Conv2d: Conv, nn.AvgPool2d: AvgPool, nn.MaxPool2d: MaxPool,
        Standardize: Scale,
    }  # fmt: skip
    for base, builder in builders.items():
        if isinstance(module, base):
            return builder(path, module, shape, **to)
    for base, kind in kinds.items():
        if isinstance(module, base):
            return Activation(path, shape, shape, kind)
    if isinstance(module, nn.Flatten | nn.Unflatten):
        return _reshape_op(path, module, shape, to)
    return None  # Identity and Dropout: the identity in eval mode


def roundoff_bound(chain: Chain, x: Tensor) -> Tensor:
    """A bound (N, *out) on |computed - exact| of the chain's output at x in its dtype.

    Per affine op, gamma_n (|W| |h| + |b|) with gamma_n = n u / (1 - n u) and n = fan-in + 2
    (the sum, the bias; any summation order, FMA or not) plus |W| times the error coming in;
    ReLU and max pooling are exact and 1-Lipschitz; sigmoid (Lipschitz 1/4) and tanh (1) add
    8 ulps of their value for the library's exp and tanh.
    """
    u = torch.finfo(chain.dtype).eps / 2
    h = x.to(chain.device, chain.dtype).unsqueeze(1)
    err = torch.zeros_like(h)
    for op in chain.ops:
        if isinstance(op, LinearOp):
            n = op.fan_in + 2
            bias = op.forward(torch.zeros_like(h)).abs()
            err = op.abs_forward(err) + n * u / (1 - n * u) * (op.abs_forward(h.abs()) + bias)
        elif isinstance(op, MaxPool):
            err = op.forward(err)
        elif isinstance(op, Activation) and op.kind != "relu":
            lip = 0.25 if op.kind == "sigmoid" else 1.0
            err = lip * err + 8 * u * op.forward(h).abs()
        h = op.forward(h)
    return err.squeeze(1)


def _check_against_model(model: nn.Module, chain: Chain, checks: int = 3) -> None:
    """Steps 2 and 3 of the module docstring, on a copy of the model in the chain's dtype."""
    try:
        twin = copy.deepcopy(model).to(device=chain.device, dtype=chain.dtype)
    except Exception as err:  # a module that cannot be copied cannot be checked
        raise refusal(model, "", f"it cannot be copied to check its forward ({err})") from None
    expected = [id(m) for _, m in leaves(twin)]
    calls: list[int] = []
    containers = tuple(_CONTAINERS)
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: calls.append(id(mod)))
        for m in twin.modules()
        if not (isinstance(m, containers) and _forward_class(m) in _CONTAINERS)
    ]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(checks, *chain.in_shape, generator=gen, dtype=chain.dtype).to(chain.device)
    try:
        with eval_mode(twin), torch.no_grad():
            out = twin(x)
    finally:
        for hook in hooks:
            hook.remove()
    if calls != expected:
        raise refusal(model, "", "its forward does not call its layers once each, in order")
    gap = (out.reshape(checks, -1) - chain.forward(x).reshape(checks, -1)).abs()
    if bool((gap > 4 * roundoff_bound(chain, x).reshape(checks, -1)).any()):
        worst = float(gap.max())
        raise refusal(model, "", f"its output differs from its layers' chain by {worst:.3g}")


def compile_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Chain:
    """The model (in eval mode: Dropout is the identity) as a Chain for inputs of
    ``input_shape`` (C, H, W), its weights copied to ``dtype`` on ``device`` (the model's by
    default). BoundError, one line naming the layer and its path, for what cannot be bounded."""
    if not isinstance(model, nn.Module):
        raise BoundError(f"bounds: expected a torch module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else model_device(model)
    to = {"dtype": dtype, "device": device}
    shape = tuple(int(s) for s in input_shape)
    ops: list[Op] = []
    for path, module in leaves(model):
        op = _make_op(path, module, shape, to)
        if op is not None:
            ops.append(op)
            shape = op.out_shape
    if len(shape) != 1:
        raise refusal(model, "", f"its output per example has shape {shape}, not (classes,)")
    chain = Chain(tuple(ops), tuple(int(s) for s in input_shape), dtype, device)
    _check_against_model(model, chain)
    return chain
