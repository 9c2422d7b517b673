"""A torch model as the chain of operations bound propagation understands.

:func:`compile_model` walks a model into a flat tuple of ops, each a float64 (by default) copy of
one layer: affine maps (:class:`Dense`, :class:`Conv`, :class:`AvgPool`, :class:`Scale` for
advlab's per-channel standardisation, :class:`Reshape`) and the nonlinear ones
(:class:`Activation` for ReLU, sigmoid and tanh; :class:`MaxPool`). Node 0 is the input, node
k + 1 the output of op k. Every op method takes (N, S, *shape) tensors: N examples, S rows each
(S = 1 for a forward pass, the specification rows for a backward one); the ops treat the
N * S rows alike, and per-example independence is the caller's (advlab.bounds.propagation).

:mod:`advlab.bounds.chain` builds the chain from a model and refuses, with a one-line
:class:`BoundError` naming the layer type and its module path, any model whose forward it
cannot show to be that chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab.models import Standardize

__all__ = [
    "Activation",
    "AvgPool",
    "BoundError",
    "Chain",
    "Conv",
    "Dense",
    "LinearOp",
    "MaxPool",
    "Reshape",
    "Scale",
]

SUPPORTED = (
    "Linear, Conv2d, ReLU, Sigmoid, Tanh, Flatten, Unflatten, AvgPool2d, MaxPool2d, Identity, "
    "Dropout (eval), in nn.Sequential, Normalized, SmallCNN or AutoencoderClassifier"
)


class BoundError(ValueError):
    """A model, or a layer of it, that bound propagation cannot bound soundly (one line)."""


def refusal(module: nn.Module, path: str, why: str) -> BoundError:
    """'bounds: cannot bound <type> at <module path>; <why>', one line."""
    where = path or "the top level"
    return BoundError(f"bounds: cannot bound {type(module).__name__} at {where}; {why}")


def flat_map(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``fn``, which maps (M, *in) to (M, *out), on the N * S rows of t (N, S, *in)."""
    n, s = t.shape[:2]
    out = fn(t.reshape(n * s, *t.shape[2:]))
    return out.reshape(n, s, *out.shape[1:])


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass
class Op:
    """One step of the chain; shapes are per example (no batch dimension)."""

    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class LinearOp(Op):
    """An affine map x -> W x + b. ``fan_in`` bounds the terms of one output's sum."""

    fan_in: int = 1

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def abs_forward(self, r: Tensor) -> Tensor:
        """|W| r: an interval's radius through the map (r >= 0)."""
        raise NotImplementedError

    def adjoint(self, a: Tensor) -> Tensor:
        """W^T a: the coefficients of a linear function of the output, on the input."""
        raise NotImplementedError

    def bias_dot(self, a: Tensor) -> Tensor:
        """<a, b> per row, (N, S)."""
        return a.new_zeros(a.shape[:2])


class Dense(LinearOp):
    def __init__(self, path: str, module: nn.Linear, in_shape: tuple[int, ...], **to) -> None:
        if in_shape != (module.in_features,):
            raise refusal(module, path, f"it acts on a {in_shape} input; flatten it first")
        super().__init__(path, in_shape, (module.out_features,))
        self.weight = module.weight.detach().to(**to)
        self.abs_weight = self.weight.abs()
        self.bias = torch.zeros(module.out_features, **to)
        if module.bias is not None:
            self.bias = module.bias.detach().to(**to)
        self.fan_in = module.in_features

    def forward(self, x: Tensor) -> Tensor:
        return flat_map(lambda t: F.linear(t, self.weight, self.bias), x)

    def abs_forward(self, r: Tensor) -> Tensor:
        return flat_map(lambda t: F.linear(t, self.abs_weight), r)

    def adjoint(self, a: Tensor) -> Tensor:
        return flat_map(lambda t: t @ self.weight, a)

    def bias_dot(self, a: Tensor) -> Tensor:
        return (a * self.bias).sum(-1)


def _conv_padding(conv: nn.Conv2d, path: str) -> tuple[int, int]:
    if isinstance(conv.padding, tuple) and not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    # "same": PyTorch pads dilation * (k - 1) in all, the odd one on the bottom/right side.
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        raise refusal(conv, path, "its 'same' padding is asymmetric; pad explicitly")
    return (totals[0] // 2, totals[1] // 2)


class Conv(LinearOp):
    def __init__(self, path: str, module: nn.Conv2d, in_shape: tuple[int, ...], **to) -> None:
        if module.padding_mode != "zeros":
            raise refusal(module, path, f"padding_mode {module.padding_mode!r}; use zeros")
        if len(in_shape) != 3:
            raise refusal(module, path, f"it acts on a {in_shape} input, not (C, H, W)")
        self.weight = module.weight.detach().to(**to)
        self.abs_weight = self.weight.abs()
        self.args = dict(
            stride=_pair(module.stride),
            padding=_conv_padding(module, path),
            dilation=_pair(module.dilation),
            groups=module.groups,
        )
        self.bias = torch.zeros(module.out_channels, **to)
        if module.bias is not None:
            self.bias = module.bias.detach().to(**to)
        out = F.conv2d(torch.zeros(1, *in_shape, **to), self.weight, None, **self.args)
        super().__init__(path, in_shape, tuple(out.shape[1:]))
        self.fan_in = math.prod(self.weight.shape[1:])
        groups = module.groups
        # (G, C_in / G * kh * kw, C_out / G): each group's kernel as the transpose of the
        # matrix that conv2d applies to unfold(x)'s columns.
        self.kernel_t = self.weight.reshape(groups, out.shape[1] // groups, -1).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return flat_map(lambda t: F.conv2d(t, self.weight, self.bias, **self.args), x)

    def abs_forward(self, r: Tensor) -> Tensor:
        return flat_map(lambda t: F.conv2d(t, self.abs_weight, None, **self.args), r)

    def adjoint(self, a: Tensor) -> Tensor:
        # conv2d(x) = W unfold(x) + b, so its transpose is fold(W^T a): one GEMM per group
        # and a col2im, much faster in float64 on CPU than conv_transpose2d's per-image loop.
        args, groups = self.args, self.args["groups"]
        kh, kw = self.weight.shape[-2:]

        def transpose(t: Tensor) -> Tensor:
            cols = t.reshape(len(t), groups, -1, t.shape[-2] * t.shape[-1])
            cols = torch.einsum("gmk,sgkl->sgml", self.kernel_t, cols)
            return F.fold(
                cols.reshape(len(t), -1, cols.shape[-1]), self.in_shape[1:], (kh, kw),
                args["dilation"], args["padding"], args["stride"],
            )  # fmt: skip

        return flat_map(transpose, a)

    def bias_dot(self, a: Tensor) -> Tensor:
        return (a * self.bias[:, None, None]).flatten(2).sum(-1)


class AvgPool(LinearOp):
    """Average pooling: a linear map with coefficients 1/divisor >= 0, so |W| = W."""

    def __init__(self, path: str, module: nn.AvgPool2d, in_shape: tuple[int, ...], **to) -> None:
        if len(in_shape) != 3:
            raise refusal(module, path, f"it acts on a {in_shape} input, not (C, H, W)")
        if module.divisor_override is not None and module.divisor_override <= 0:
            raise refusal(module, path, "its divisor_override is not positive")
        kernel = _pair(module.kernel_size)
        self.args = dict(
            kernel_size=kernel,
            stride=_pair(module.stride if module.stride is not None else kernel),
            padding=_pair(module.padding),
            ceil_mode=module.ceil_mode,
            count_include_pad=module.count_include_pad,
            divisor_override=module.divisor_override,
        )
        out = F.avg_pool2d(torch.zeros(1, *in_shape, **to), **self.args)
        super().__init__(path, in_shape, tuple(out.shape[1:]))
        self.fan_in = kernel[0] * kernel[1]

    def forward(self, x: Tensor) -> Tensor:
        return flat_map(lambda t: F.avg_pool2d(t, **self.args), x)

    abs_forward = forward

    def adjoint(self, a: Tensor) -> Tensor:
        a_ = self.args

        def transpose(t: Tensor) -> Tensor:
            # avg_pool2d_backward is the transpose of the pooling; it reads only the shape of
            # its input argument.
            shape = t.new_empty(len(t), *self.in_shape)
            return torch.ops.aten.avg_pool2d_backward(
                t, shape, a_["kernel_size"], a_["stride"], a_["padding"], a_["ceil_mode"],
                a_["count_include_pad"], a_["divisor_override"],
            )  # fmt: skip

        return flat_map(transpose, a)


class Scale(LinearOp):
    """advlab's Standardize: (x - mean) / std per channel, std > 0."""

    def __init__(self, path: str, module: Standardize, in_shape: tuple[int, ...], **to) -> None:
        mean, std = module.mean.detach().to(**to), module.std.detach().to(**to)
        if not bool((std > 0).all()):
            raise refusal(module, path, "a std is not positive")
        if len(in_shape) != 3 or in_shape[0] != len(std.flatten()):
            raise refusal(module, path, f"{len(std.flatten())} channels for a {in_shape} input")
        super().__init__(path, in_shape, in_shape)
        self.mean, self.std, self.shift = mean, std, mean / std
        self.fan_in = 2  # one subtraction, one division

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def abs_forward(self, r: Tensor) -> Tensor:
        return r / self.std

    def adjoint(self, a: Tensor) -> Tensor:
        return a / self.std

    def bias_dot(self, a: Tensor) -> Tensor:
        return -(a * self.shift).flatten(2).sum(-1)


class Reshape(LinearOp):
    """Flatten or Unflatten: the same numbers in another shape."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], *self.out_shape)

    abs_forward = forward

    def adjoint(self, a: Tensor) -> Tensor:
        return a.reshape(*a.shape[:2], *self.in_shape)


@dataclass
class Activation(Op):
    """An elementwise monotone activation: "relu", "sigmoid" or "tanh"."""

    kind: str = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[self.kind](x)


class MaxPool(Op):
    """Max pooling (windows through unfold, so any kernel, stride, padding and dilation)."""

    def __init__(self, path: str, module: nn.MaxPool2d, in_shape: tuple[int, ...], **to) -> None:
        if module.ceil_mode or module.return_indices or len(in_shape) != 3:
            why = "ceil_mode, return_indices and unbatched inputs are not supported"
            raise refusal(module, path, why)
        kernel = _pair(module.kernel_size)
        self.args = dict(
            kernel_size=kernel,
            stride=_pair(module.stride if module.stride is not None else kernel),
            padding=_pair(module.padding),
            dilation=_pair(module.dilation),
        )
        out = F.max_pool2d(torch.zeros(1, *in_shape, **to), **self.args)
        super().__init__(path, in_shape, tuple(out.shape[1:]))

    def forward(self, x: Tensor) -> Tensor:
        return flat_map(lambda t: F.max_pool2d(t, **self.args), x)

    def windows(self, t: Tensor) -> Tensor:
        """(M, C, H, W) -> (M, C, window, L): each output's window, padding as -inf."""
        m, c = t.shape[:2]
        ph, pw = self.args["padding"]
        padded = F.pad(t, (pw, pw, ph, ph), value=-math.inf)
        padded = padded.reshape(m * c, 1, *padded.shape[2:])
        a = self.args
        cols = F.unfold(padded, a["kernel_size"], a["dilation"], 0, a["stride"])
        return cols.reshape(m, c, cols.shape[1], cols.shape[2])

    def scatter(self, coef: Tensor, index: Tensor) -> Tensor:
        """Adjoint of picking input ``index`` of each window: coef (M, C, L) -> (M, C, H, W)."""
        m, c, length = coef.shape
        kh, kw = self.args["kernel_size"]
        ph, pw = self.args["padding"]
        cols = coef.new_zeros(m, c, kh * kw, length)
        cols = cols.scatter(2, index.unsqueeze(2), coef.unsqueeze(2))
        h, w = self.in_shape[1] + 2 * ph, self.in_shape[2] + 2 * pw
        full = F.fold(
            cols.reshape(m, c * kh * kw, length), (h, w), self.args["kernel_size"],
            self.args["dilation"], 0, self.args["stride"],
        )  # fmt: skip
        return full[:, :, ph : h - ph, pw : w - pw]


@dataclass(frozen=True)
class Chain:
    """The compiled model: its ops in forward order, on one device and dtype."""

    ops: tuple[Op, ...]
    in_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def num_outputs(self) -> int:
        return math.prod(self.ops[-1].out_shape) if self.ops else math.prod(self.in_shape)

    def node_shape(self, k: int) -> tuple[int, ...]:
        return self.in_shape if k == 0 else self.ops[k - 1].out_shape

    def forward(self, x: Tensor) -> Tensor:
        """The chain's output (N, *out) at x (N, *in)."""
        h = x.to(self.device, self.dtype).unsqueeze(1)
        for op in self.ops:
            h = op.forward(h)
        return h.squeeze(1)
