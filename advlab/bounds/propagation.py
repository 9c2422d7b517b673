"""Certified lower bounds on margins by bound propagation: IBP, CROWN and alpha-CROWN.

The input set of example n is its Linf or L2 ball of radius eps[n] intersected with the box
[0, 1]. For a specification matrix C (N, S, K) the methods return lower bounds on C z(x) over the
set, where z are the logits; for margins C's rows are e_y - e_j, j != y.

- "ibp" (Gowal et al. 2018): intervals forward through every layer; the trailing affine layers
  are folded into C first (exact), and C then meets the last nonlinear layer's interval.
- "crown" (Zhang et al. 2018): backward linear bound propagation with per-neuron linear
  relaxations (advlab.bounds.relax). Every nonlinear layer's input bounds come from a backward
  pass of their own (rows +e_i and -e_i), intersected with the interval step from the node
  before, so they are never looser than one IBP step; behind an activation the interval step
  alone (exact per neuron given the activation's input bounds).
- "crown-ibp" (Zhang et al. 2020): the nonlinear layers' input bounds by interval steps alone
  (IBP's), then one CROWN backward pass for the specification, and the larger of that bound
  and IBP's (both hold). About IBP's cost plus one backward pass: what makes conv nets on
  28x28 inputs affordable on a CPU, where CROWN's per-neuron passes are not.
- "alpha-crown" (Xu et al. 2021): CROWN with the lower slopes of unstable ReLUs free in
  [0, 1], one per neuron and per row of every bound that uses them (the final specification's
  rows and each intermediate node's +e_i/-e_i rows), optimised together by projected Adam
  ascent on the final lower bound, starting from CROWN's slopes. Intermediate bounds are
  recomputed with their slopes at every step and intersected with CROWN's. Every iterate is a
  valid bound, so the best per row is kept, and it is never below CROWN's.

Cost per example: IBP one forward pass; CROWN one backward pass per intermediate neuron (two
rows each) through the layers before it, so about (neurons) x (weights) multiply-adds; alpha-
CROWN (steps + 1) CROWN passes with gradients, about 3 (steps + 1) CROWN's time, and slopes of
(rows) x (ReLUs before them) per node in memory.

Concretisation: min of A x + c over the set. Linf: the set is the box [max(0, x - eps),
min(1, x + eps)], where the minimum is exact per coordinate. L2: the minimum over the ball alone
is A x0 - eps ||A||_2 (the dual norm), over that same box it is the box formula; the
intersection lies in both sets, so each is a lower bound and the larger one is returned.

Everything runs without directed rounding, in float64 by default: a bound is valid up to
float64 round-off (about 1e-16 of the magnitudes summed). Bounds are for the model in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advlab.bounds.chain import compile_model
from advlab.bounds.layers import Activation, Chain, LinearOp, MaxPool
from advlab.bounds.relax import (
    MaxPoolRelaxation,
    Relaxation,
    activation_relaxation,
    maxpool_relaxation,
)

__all__ = [
    "ALPHA_LR",
    "ALPHA_STEPS",
    "METHODS",
    "NORMS",
    "InputSet",
    "backward_neurons",
    "certified",
    "input_set",
    "margin_bounds",
    "margin_spec",
    "spec_bounds",
]

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
NORMS = ("linf", "l2")
ALPHA_STEPS = 20  # Adam steps of alpha-CROWN
ALPHA_LR = 0.1  # its step size on slopes in [0, 1]
# Elements of the coefficient tensor per example in one backward pass; intermediate bounds of a
# wide layer run in chunks of rows under it. Fixed per example, so chunks never depend on N.
ROW_BUDGET = 2**20


@dataclass(frozen=True)
class InputSet:
    """Ball of radius eps (N,) around center (N, *in) in ``norm``, within the per-coordinate
    bounds lower/upper = clamp(center -/+ eps, 0, 1) that contain its intersection with the box."""

    center: Tensor
    eps: Tensor
    norm: str
    lower: Tensor
    upper: Tensor

    def row(self, i: int) -> InputSet:
        """Example i alone, in fresh tensors (so no kernel sees another alignment)."""
        pick = [t[i : i + 1].clone() for t in (self.center, self.eps, self.lower, self.upper)]
        return InputSet(pick[0], pick[1], self.norm, pick[2], pick[3])


def input_set(chain: Chain, x: Tensor, eps: float | Tensor, norm: str) -> InputSet:
    """Checked and moved to the chain's device and dtype; ValueError (one line) otherwise."""
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")
    x = x.detach().to(chain.device, chain.dtype)
    if tuple(x.shape[1:]) != chain.in_shape:
        raise ValueError(f"x: shape {tuple(x.shape)} does not fit inputs of {chain.in_shape}")
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("x: every value must lie in the box [0, 1]")
    eps = torch.as_tensor(eps).detach().to(chain.device, chain.dtype)
    eps = eps.expand(len(x)) if eps.ndim == 0 else eps
    if eps.shape != (len(x),) or not bool((torch.isfinite(eps) & (eps >= 0)).all()):
        raise ValueError(f"eps: give one finite radius >= 0, or one per example ({len(x)})")
    radius = eps.view(-1, *[1] * (x.ndim - 1))
    return InputSet(x, eps, norm, (x - radius).clamp(0, 1), (x + radius).clamp(0, 1))


def concretize(a: Tensor, const: Tensor, s: InputSet) -> Tensor:
    """min over the set of a x + const, for a (N, S, *in): (N, S). See the module docstring."""
    a = a.flatten(2)
    low, up = s.lower.flatten(1).unsqueeze(1), s.upper.flatten(1).unsqueeze(1)
    box = (a.clamp(min=0) * low + a.clamp(max=0) * up).sum(-1)
    if s.norm == "linf":
        return box + const
    ball = (a * s.center.flatten(1).unsqueeze(1)).sum(-1) - s.eps.unsqueeze(1) * a.norm(dim=-1)
    return torch.maximum(box, ball) + const


def interval_concretize(a: Tensor, const: Tensor, low: Tensor, up: Tensor) -> Tensor:
    """min of a h + const over the interval low <= h <= up (N, *shape): (N, S)."""
    a = a.flatten(2)
    low, up = low.flatten(1).unsqueeze(1), up.flatten(1).unsqueeze(1)
    return (a.clamp(min=0) * low + a.clamp(max=0) * up).sum(-1) + const


def interval_step(op: object, low: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """One IBP step: an affine map by centre and radius (|W| r), the rest by monotonicity."""
    low, up = low.unsqueeze(1), up.unsqueeze(1)
    if isinstance(op, LinearOp):
        center, radius = op.forward((low + up) / 2), op.abs_forward((up - low) / 2)
        low, up = center - radius, center + radius
    else:  # activations and max pooling are monotone in each input
        low, up = op.forward(low), op.forward(up)
    return low.squeeze(1), up.squeeze(1)


Alphas = dict[int, Tensor]  # per ReLU op index: lower slopes (N, rows, *its shape)


@dataclass
class Relaxed:
    """Per node k feeding a nonlinear op k: its bounds (l, u) and the op's relaxation."""

    bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    relax: dict[int, Relaxation | MaxPoolRelaxation] = field(default_factory=dict)

    def add(self, op: object, k: int, low: Tensor, up: Tensor) -> None:
        self.bounds[k] = (low, up)
        if isinstance(op, MaxPool):
            self.relax[k] = maxpool_relaxation(op, low, up)
        else:
            assert isinstance(op, Activation)
            self.relax[k] = activation_relaxation(op.kind, low, up)


def _activation_back(r: Relaxation, a: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor]:
    """a f(z) >= a (line)(z), the lower line where a >= 0 and the upper one where a < 0."""
    lower_slope = r.lower_slope.unsqueeze(1)
    if alpha is not None:
        lower_slope = torch.where(r.unstable.unsqueeze(1), alpha, lower_slope)
    pos = a >= 0
    new = a * torch.where(pos, lower_slope, r.upper_slope.unsqueeze(1))
    icpt = torch.where(pos, r.lower_icpt.unsqueeze(1), r.upper_icpt.unsqueeze(1))
    return new, (a * icpt).flatten(2).sum(-1)


def _maxpool_back(op: MaxPool, r: MaxPoolRelaxation, a: Tensor) -> tuple[Tensor, Tensor]:
    """a y >= a x_i* where a >= 0 or x_i* dominates, else >= a * (largest upper bound)."""
    n, s = a.shape[:2]
    a = a.flatten(3)  # (N, S, C, L)
    dominant, upper = r.dominant.unsqueeze(1), r.upper.unsqueeze(1)
    picked = torch.where((a >= 0) | dominant, a, torch.zeros_like(a))
    const = torch.where((a < 0) & ~dominant, a * upper, torch.zeros_like(a)).flatten(2).sum(-1)
    index = r.index.unsqueeze(1).expand(a.shape).reshape(n * s, *a.shape[2:])
    new = op.scatter(picked.reshape(n * s, *a.shape[2:]), index)
    return new.reshape(n, s, *op.in_shape), const


def backward(
    chain: Chain,
    relaxed: Relaxed,
    node: int,
    a: Tensor,
    alphas: Alphas | None = None,
    const: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(A, c) with a z_node + const >= A x + c on the set, for a (N, S, *shape of node)."""
    const = a.new_zeros(a.shape[:2]) if const is None else const
    for k in range(node - 1, -1, -1):
        op = chain.ops[k]
        if isinstance(op, LinearOp):
            const = const + op.bias_dot(a)
            a = op.adjoint(a)
            continue
        relax = relaxed.relax[k]
        if isinstance(relax, MaxPoolRelaxation):
            a, extra = _maxpool_back(op, relax, a)
        else:
            a, extra = _activation_back(relax, a, None if alphas is None else alphas.get(k))
        const = const + extra
    return a, const


def _backward_node_bounds(
    chain: Chain, relaxed: Relaxed, s: InputSet, node: int, alphas: Alphas | None = None
) -> tuple[Tensor, Tensor]:
    """CROWN bounds of node ``node`` from rows +e_i (lower) and -e_i (-upper), in chunks;
    ``alphas`` (N, 2 * width, *shape) per ReLU: lower slopes per row, as in alpha-CROWN."""
    shape = chain.node_shape(node)
    width = math.prod(shape)
    widest = max(math.prod(chain.node_shape(k)) for k in range(node + 1))
    chunk = max(1, ROW_BUDGET // widest)
    n = len(s.center)
    rows = torch.arange(2 * width, device=chain.device)
    parts = []
    for start in range(0, 2 * width, chunk):
        idx = rows[start : start + chunk]
        eye = torch.zeros(len(idx), width, dtype=chain.dtype, device=chain.device)
        eye[torch.arange(len(idx)), idx % width] = torch.where(idx < width, 1.0, -1.0).to(eye)
        a, const = eye.reshape(1, len(idx), *shape), None
        first = chain.ops[node - 1]
        if isinstance(first, LinearOp):  # the same for every example: once, then expanded
            a, const = first.adjoint(a), first.bias_dot(a).expand(n, -1)
        a = a.expand(n, *a.shape[1:])
        begin = node - 1 if const is not None else node
        part = None if alphas is None else {k: v[:, idx] for k, v in alphas.items()}
        parts.append(concretize(*backward(chain, relaxed, begin, a, part, const), s))
    bounds = torch.cat(parts, dim=1)
    return bounds[:, :width].reshape(n, *shape), -bounds[:, width:].reshape(n, *shape)


def backward_nodes(chain: Chain) -> list[int]:
    """Nodes whose bounds CROWN computes by a backward pass of their own: inputs of nonlinear
    ops, except the input itself and outputs of activations (see crown_relaxed)."""
    return [
        k
        for k, op in enumerate(chain.ops)
        if not isinstance(op, LinearOp) and k > 0 and not isinstance(chain.ops[k - 1], Activation)
    ]


def backward_neurons(chain: Chain) -> int:
    """Neurons CROWN and alpha-CROWN bound by backward passes of their own: their cost."""
    return sum(math.prod(chain.node_shape(k)) for k in backward_nodes(chain))


def crown_relaxed(
    chain: Chain,
    s: InputSet,
    alphas: dict[int, Alphas] | None = None,
    floor: Relaxed | None = None,
    intermediate: bool = True,
) -> Relaxed:
    """Bounds and relaxations of every node that feeds a nonlinear op (module docstring).

    alpha-CROWN passes per-node ReLU slopes (``alphas[node]``) and CROWN's own result as
    ``floor``: every bound there is valid, so the tighter of the two is taken.
    """
    relaxed = Relaxed()
    backward_at = set(backward_nodes(chain)) if intermediate else set()  # crown-ibp: none
    low, up = s.lower, s.upper
    for k, op in enumerate(chain.ops):
        if not isinstance(op, LinearOp):
            # Behind an elementwise monotone activation, f([l, u]) = [f(l), f(u)] is already
            # the exact range given its input's bounds: a backward pass could not beat it.
            if k in backward_at:
                node_alphas = None if alphas is None else alphas.get(k)
                low, up = _intersect(
                    low, up, *_backward_node_bounds(chain, relaxed, s, k, node_alphas)
                )
            if floor is not None:
                low, up = _intersect(low, up, *floor.bounds[k])
            relaxed.add(op, k, low, up)
        low, up = interval_step(op, low, up)
    return relaxed


def _intersect(low: Tensor, up: Tensor, low2: Tensor, up2: Tensor) -> tuple[Tensor, Tensor]:
    """Both enclose the true range; if round-off crosses the bounds, keep an interval."""
    low = torch.maximum(low, low2)
    return low, torch.maximum(torch.minimum(up, up2), low)


def _ibp(chain: Chain, s: InputSet, spec: Tensor) -> Tensor:
    intervals = [(s.lower, s.upper)]
    for op in chain.ops:
        intervals.append(interval_step(op, *intervals[-1]))
    a, const, k = spec, spec.new_zeros(spec.shape[:2]), len(chain.ops)
    while k > 0 and isinstance(chain.ops[k - 1], LinearOp):  # exact: fold into the spec
        const = const + chain.ops[k - 1].bias_dot(a)
        a = chain.ops[k - 1].adjoint(a)
        k -= 1
    if k == 0:  # the whole model is affine
        return concretize(a, const, s)
    return interval_concretize(a, const, *intervals[k])


@torch.no_grad()
def _adam_ascent(params: list[Tensor], grads: list[Tensor | None], state: dict, lr: float) -> None:
    """One projected Adam step up the bound, elementwise (so rows never mix)."""
    state["t"] = t = state.get("t", 0) + 1
    for i, (alpha, grad) in enumerate(zip(params, grads, strict=True)):
        if grad is None:  # slopes of neurons the bound does not reach
            continue
        m, v = state.get(i, (torch.zeros_like(grad), torch.zeros_like(grad)))
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * (grad * grad)
        state[i] = (m, v)
        step = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        alpha.add_(lr * step).clamp_(0, 1)


def _initial_slopes(crown: Relaxed, before: int, rows: int) -> Alphas:
    """CROWN's lower slopes of the ReLUs before op ``before`` with unstable neurons, one copy
    per row: (N, rows, *shape), leaves that require grad."""
    return {
        k: r.lower_slope.unsqueeze(1).expand(-1, rows, *r.lower_slope.shape[1:]).clone()
        .requires_grad_(True)
        for k, r in crown.relax.items()
        if k < before and isinstance(r, Relaxation) and r.unstable is not None
        and bool(r.unstable.any())
    }  # fmt: skip


def _alpha_crown(
    chain: Chain, crown: Relaxed, s: InputSet, spec: Tensor, start: Tensor, steps: int,
    lr: float, stop_when_positive: bool,
) -> Tensor:  # fmt: skip
    """The best bound over Adam iterates from CROWN's slopes; never below ``start`` (CROWN's).

    Slopes are optimised for the final bound and for every intermediate node's bounds (their
    own slopes per row, Xu et al. 2021), all by the final bound's gradient. Rows only add up in
    the objective, so each row's slopes follow their own gradient.
    """
    final = _initial_slopes(crown, len(chain.ops), spec.shape[1])
    inner = {
        j: _initial_slopes(crown, j, 2 * math.prod(chain.node_shape(j)))
        for j in backward_nodes(chain)
    }
    inner = {j: a for j, a in inner.items() if a}
    params = [*final.values(), *(a for node in inner.values() for a in node.values())]
    best, state = start.clone(), {}
    for i in range(steps + 1 if params else 0):
        if stop_when_positive and bool((best > 0).all()):
            break
        with torch.enable_grad():
            relaxed = crown_relaxed(chain, s, inner, crown) if inner else crown
            bound = concretize(*backward(chain, relaxed, len(chain.ops), spec, final), s)
            total = bound.sum()  # rows add up, so each alpha's gradient is its own row's
        best = torch.fmax(best, bound.detach())  # fmax: a NaN iterate can never win
        if i == steps:
            break
        grads = torch.autograd.grad(total, params, allow_unused=True)
        _adam_ascent(params, list(grads), state, lr)
    return best


def _as_chain(model: nn.Module | Chain, x: Tensor) -> Chain:
    return model if isinstance(model, Chain) else compile_model(model, tuple(x.shape[1:]))


@torch.no_grad()
def spec_bounds(
    model: nn.Module | Chain,
    x: Tensor,
    spec: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    method: str = "crown",
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    stop_when_positive: bool = False,
) -> Tensor:
    """Lower bounds (N, S) on spec @ logits over each example's set (module docstring).

    ``spec`` is (N, S, K) or (S, K) for all; ``eps`` a radius or one per example (N,);
    ``steps``/``lr`` tune alpha-CROWN, which with ``stop_when_positive`` stops once every
    bound of an example is positive (enough to certify). Results are on the chain's device,
    in its dtype; on CPU each example's are bitwise independent of its batch-mates.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps: {steps} must be >= 0 and lr: {lr} > 0")
    chain = _as_chain(model, x)
    s = input_set(chain, x, eps, norm)
    spec = spec.detach().to(chain.device, chain.dtype)
    spec = spec.expand(len(x), *spec.shape) if spec.ndim == 2 else spec
    if spec.shape[0] != len(x) or spec.shape[2] != chain.num_outputs:
        raise ValueError(f"spec: shape {tuple(spec.shape)} does not fit {len(x)} examples")
    args = (method, steps, lr, stop_when_positive)
    if not one_at_a_time(chain):
        return _bounds(chain, s, spec, *args)
    rows = [_bounds(chain, s.row(i), spec[i : i + 1].clone(), *args) for i in range(len(x))]
    return torch.cat(rows) if rows else spec.new_zeros(spec.shape[:2])


def one_at_a_time(chain: Chain) -> bool:
    """On CPU, bound one example at a time: BLAS and vectorised kernels pick blockings,
    summation orders, and vector or scalar code paths for exp and tanh by tensor size and
    position, so an example computed beside others would be rounded differently than alone.
    One at a time, each example's bounds are bitwise the same in any batch, at any thread
    count. On a GPU the whole batch goes at once (then only up to round-off)."""
    return chain.device.type == "cpu"


def _bounds(
    chain: Chain, s: InputSet, spec: Tensor, method: str, steps: int, lr: float, stop: bool
) -> Tensor:
    if method == "ibp":
        return _ibp(chain, s, spec)
    relaxed = crown_relaxed(chain, s, intermediate=method != "crown-ibp")
    bound = concretize(*backward(chain, relaxed, len(chain.ops), spec), s)
    if method == "crown-ibp":
        return torch.maximum(bound, _ibp(chain, s, spec))
    if method == "crown":
        return bound
    return _alpha_crown(chain, relaxed, s, spec, bound, steps, lr, stop)


def margin_spec(y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(spec (N, K-1, K) with rows e_y - e_j, the classes j (N, K-1)), j over the K-1 non-labels."""
    n = len(y)
    classes = torch.arange(num_classes, device=y.device).expand(n, num_classes)
    others = classes[classes != y.unsqueeze(1)].view(n, num_classes - 1)
    eye = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    return eye[y].unsqueeze(1) - eye[others], others


def margin_bounds(
    model: nn.Module | Chain,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    method: str = "crown",
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    stop_when_positive: bool = False,
) -> Tensor:
    """Lower bounds (N, K) on z_y - z_j over each example's set; column y is +inf, so
    ``margin_bounds(...).min(1).values > 0`` says certified. ``y`` (N,) holds the labels."""
    chain = _as_chain(model, x)
    k = chain.num_outputs
    y = torch.as_tensor(y).to(chain.device)
    if y.shape != (len(x),) or bool(((y < 0) | (y >= k)).any()):
        raise ValueError(f"y: give one label in [0, {k}) per example")
    spec, others = margin_spec(y, k)
    bounds = spec_bounds(
        chain, x, spec, eps, norm=norm, method=method, steps=steps, lr=lr,
        stop_when_positive=stop_when_positive,
    )  # fmt: skip
    full = torch.full((len(y), k), math.inf, dtype=bounds.dtype, device=bounds.device)
    return full.scatter(1, others, bounds)


def certified(
    model: nn.Module | Chain,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    method: str = "crown",
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
) -> Tensor:
    """(N,) bool: every margin's lower bound is > 0, so no point of the set is misclassified."""
    bounds = margin_bounds(
        model, x, y, eps, norm=norm, method=method, steps=steps, lr=lr, stop_when_positive=True
    )
    return (bounds > 0).all(dim=1)
