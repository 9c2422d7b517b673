"""Bound propagation (advlab.bounds): soundness against sampling and PGD on every supported layer
kind, exactness on affine models, IBP <= CROWN <= alpha-CROWN, certified radii against attacks
and known answers, refusals, and batch independence.

Round-off allowance (``slack``): every bound, and every margin we compare it with, is a float64
sum of products evaluated in some order; each differs from its exact value by at most
gamma_n * (sum of the magnitudes of its terms), gamma_n = n u / (1 - n u), u = 2^-53, for
n = the number of terms along its longest chain. We take n = the sum of fan-ins along the
chain plus 16 per layer (the relaxation arithmetic), and bound the terms' magnitudes by M, the
model's output on all-ones inputs (x <= 1) with every weight and bias replaced by its absolute
value and every activation by |z| + |f(0)| (>= |f(z)| for ReLU, sigmoid and tanh, each
1-Lipschitz). A margin has two logits, and we compare two computations: slack = 2 * 2 gamma_n M.
On these models that is about 1e-12; observed differences are 1e-16 to 1e-14.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import fit
from torch import Tensor, nn

from advlab.attacks.ddn import ddn
from advlab.bounds import (
    BoundError,
    Chain,
    certified,
    certified_radius,
    compile_model,
    margin_bounds,
)
from advlab.bounds.layers import Activation, LinearOp, MaxPool
from advlab.bounds.propagation import interval_step
from advlab.bounds.relax import activation_relaxation, maxpool_relaxation
from advlab.data import load_dataset
from advlab.models import AutoencoderClassifier, Normalized, SmallCNN, Standardize, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 8, 8)
U = 2.0**-53
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


# --------------------------------------------------------------------------- helpers


def slack(chain: Chain) -> float:
    """The round-off allowance of the module docstring, for this model."""
    m = torch.ones(1, 1, *chain.in_shape, dtype=torch.float64)
    n = 0
    for op in chain.ops:
        if isinstance(op, LinearOp):
            m = op.abs_forward(m) + op.forward(torch.zeros_like(m)).abs()
            n += op.fan_in
        elif isinstance(op, MaxPool):
            m = op.forward(m)
        elif isinstance(op, Activation):
            m = m + (0.5 if op.kind == "sigmoid" else 0.0)
        n += 16
    return 4 * n * U / (1 - n * U) * float(m.max())


def twin64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def margins(model64: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """z_y - z_j (N, K), +inf at j = y (as margin_bounds)."""
    z = model64(x.double())
    out = z.gather(1, y[:, None]) - z
    return out.scatter(1, y[:, None], math.inf)


def project(x: Tensor, z: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Into the ball (then the box: clamping moves no point farther from x, which is in it)."""
    r = eps.view(-1, *[1] * (x.ndim - 1))
    if norm == "linf":
        z = torch.maximum(torch.minimum(z, x + r), x - r)
    else:
        d = (z - x).flatten(1)
        scale = (eps / d.norm(dim=1).clamp_min(1e-300)).clamp(max=1)
        z = x + (d * scale[:, None]).view_as(x)
    return z.clamp(0, 1)


def random_points(x: Tensor, eps: Tensor, norm: str, count: int, gen: torch.Generator) -> Tensor:
    """(count, N, ...) points of each set: uniform, and (Linf) corners of the ball."""
    pts = []
    for i in range(count):
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
        if norm == "linf" and i % 2:
            noise = noise.sign()
        elif norm == "l2":
            noise = noise / noise.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
            noise = noise * torch.rand(len(x), generator=gen, dtype=x.dtype).view(-1, 1, 1, 1)
        pts.append(project(x, x + eps.view(-1, 1, 1, 1) * noise, eps, norm))
    return torch.stack(pts)


def smallest_margins(
    model64: nn.Module, x: Tensor, y: Tensor, eps: Tensor, norm: str, steps: int = 30
) -> Tensor:
    """(N, K): the smallest z_y - z_j seen at random points and along projected descent on
    z_y - z_j from a random start, one run per (example, j); inf at j = y."""
    gen = torch.Generator().manual_seed(1)
    x, n, k = x.double(), len(x), int(model64(x[:1].double()).shape[1])
    best = torch.full((n, k), math.inf, dtype=torch.float64)
    for p in random_points(x, eps, norm, 16, gen):
        best = torch.minimum(best, margins(model64, p, y).detach())
    xs, ys, es = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0), eps.repeat_interleave(k)
    js = torch.arange(k).repeat(n)
    z = random_points(xs, es, norm, 1, gen)[0]
    step = (2.5 * es / steps).view(-1, 1, 1, 1)
    found = torch.full((n * k,), math.inf, dtype=torch.float64)
    for _ in range(steps + 1):
        z = z.detach().requires_grad_(True)
        logits = model64(z)
        m = logits.gather(1, ys[:, None]).squeeze(1) - logits.gather(1, js[:, None]).squeeze(1)
        found = torch.minimum(found, m.detach())
        (g,) = torch.autograd.grad(m.sum(), z)
        if norm == "linf":
            g = g.sign()
        else:
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, 1, 1, 1)
        z = project(xs, z.detach() - step * g, es, norm)
    found = found.view(n, k).scatter(1, y[:, None], math.inf)
    return torch.minimum(best, found)


def _conv_pool() -> nn.Module:
    """Strides, padding, dilation, average and (overlapping, padded, dilated) max pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1, padding=1, dilation=2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6 * 2 * 2, 16),
        nn.Sigmoid(),
        nn.Identity(),
        nn.Linear(16, 10),
    )


def _conv_maxpool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=1),
        nn.Conv2d(5, 8, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


MODELS = {
    "mlp-relu": lambda: build_model("fc24-16-10", SHAPE, 10, activation="relu"),
    "mlp-sigmoid": lambda: build_model("fc24-16-10", SHAPE, 10, activation="sigmoid"),
    "mlp-tanh": lambda: build_model("fc24-16-10", SHAPE, 10, activation="tanh"),
    "conv-pool": _conv_pool,
    "conv-maxpool": _conv_maxpool,
    "normalized": lambda: Normalized(_conv_maxpool(), [0.3], [0.4]),
    "smallcnn": lambda: SmallCNN(SHAPE, 10),
    "autoencoder": lambda: AutoencoderClassifier(SHAPE, 12, 10, activation="sigmoid"),
}


def random_model(name: str) -> nn.Module:
    torch.manual_seed(sorted(MODELS).index(name))
    model = MODELS[name]()
    with torch.no_grad():  # larger weights: more unstable and saturated units at small eps
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


@pytest.fixture(scope="module")
def digits_points() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_dataset("digits")
    return data.x_train, data.y_train, data.x_test, data.y_test


@pytest.fixture(scope="module")
def trained_mlp(digits_points: tuple[Tensor, ...]) -> nn.Module:
    """fc64-32-10 ReLU on the digits (test accuracy ~0.96)."""
    x, y = digits_points[:2]
    torch.manual_seed(0)
    model = build_model("fc64-32-10", SHAPE, 10, activation="relu")
    return fit(model, x, y, steps=150, lr=1e-2)


def correct_points(model: nn.Module, points: tuple[Tensor, ...], n: int) -> tuple[Tensor, Tensor]:
    x, y = points[2], points[3]
    with torch.no_grad():
        right = model(x).argmax(1) == y
    return x[right][:n], y[right][:n]


# --------------------------------------------------------------------------- relaxations


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "tanh"])
def test_relaxation_lines_enclose_the_activation(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4000, generator=gen, dtype=torch.float64) * 4 for _ in range(2))
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    hi[:500] = lo[:500]  # points
    hi[500:1000] = lo[500:1000] + 1e-12  # narrower than the chord can be trusted
    lo[1000:1500], hi[1000:1500] = -hi[1000:1500].abs() - 1e-3, hi[1000:1500].abs() + 1e-3
    r = activation_relaxation(kind, lo, hi)
    f = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[kind]
    for t in [0.0, 1.0, *torch.rand(30, generator=gen).tolist()]:
        z = lo + t * (hi - lo)
        below = r.lower_slope * z + r.lower_icpt
        above = r.upper_slope * z + r.upper_icpt
        # Each side is 2 float64 operations plus f's few ulps; 16 u of their magnitudes.
        tol = 16 * U * ((r.lower_slope * z).abs() + (r.upper_slope * z).abs() + 2)
        assert bool((below <= f(z) + tol).all()) and bool((f(z) <= above + tol).all())
    # Points are exact, and ReLU's stable neurons are the identity or zero.
    pt = slice(0, 500)
    assert torch.allclose(r.lower_slope[pt] * lo[pt] + r.lower_icpt[pt], f(lo[pt]), 0, 1e-15)
    assert torch.allclose(r.upper_slope[pt] * lo[pt] + r.upper_icpt[pt], f(lo[pt]), 0, 1e-15)


def test_maxpool_relaxation_encloses_the_max() -> None:
    """y >= the picked input everywhere, y <= the largest upper bound, y == the picked input
    where it dominates; on close, overlapping intervals (where dominance is a near thing)."""
    op = MaxPool("pool", nn.MaxPool2d(3, stride=2, padding=1), (2, 6, 6), dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    lo = torch.randn(200, 2, 6, 6, generator=gen, dtype=torch.float64) * 0.3
    hi = lo + torch.rand(lo.shape, generator=gen, dtype=torch.float64) * 0.2
    hi[:20] = lo[:20]  # points
    r = maxpool_relaxation(op, lo, hi)
    assert 0.2 < float(r.dominant.double().mean()) < 0.9  # both cases, often
    for _ in range(50):
        x = lo + torch.rand(lo.shape, generator=gen, dtype=torch.float64) * (hi - lo)
        y = op.forward(x.unsqueeze(1)).squeeze(1).flatten(2)  # (N, C, L)
        picked = op.windows(x).gather(2, r.index.unsqueeze(2)).squeeze(2)
        assert bool((y >= picked).all() and (y <= r.upper).all())
        assert torch.equal(y[r.dominant], picked[r.dominant])


LAYERS = {
    "linear": (lambda: nn.Linear(12, 5), (12,)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 7, 7)),
    "avgpool": (lambda: nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (2, 7, 7)),
    "standardize": (lambda: Standardize([0.2, 0.7], [0.5, 2.0]), (2, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_affine_layer_gets_its_exact_range(name: str) -> None:
    """IBP through one affine layer is exact: W c + b -/+ |W| r, with W its explicit matrix;
    and the chain's transpose of it is W^T."""
    torch.manual_seed(9)
    make, shape = LAYERS[name]
    layer = make().double().eval()
    chain = compile_model(nn.Sequential(layer, nn.Flatten()), shape)
    op = chain.ops[0]
    gen = torch.Generator().manual_seed(9)
    c = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    r = 0.1 * torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    w = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *shape)).flatten(), c[0])
    w = w.reshape(-1, math.prod(shape))
    center = layer(c).flatten(1)
    spread = r.flatten(1) @ w.abs().T
    low, up = interval_step(op, c - r, c + r)
    tol = slack(chain)
    assert torch.allclose(low.flatten(1), center - spread, rtol=0, atol=tol)
    assert torch.allclose(up.flatten(1), center + spread, rtol=0, atol=tol)
    a = torch.randn(3, 4, *op.out_shape, generator=gen, dtype=torch.float64)
    assert torch.allclose(op.adjoint(a).flatten(2), a.flatten(2) @ w, rtol=0, atol=tol)


# --------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounds_hold_at_sampled_and_attacked_points(name: str, norm: str) -> None:
    model = random_model(name)
    chain, model64 = compile_model(model, SHAPE), twin64(model)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, *SHAPE, generator=gen, dtype=torch.float64)
    x[0, 0, :2] = 0.0  # on the box's faces: the box must cut the ball
    y = model64(x).argmax(1)
    eps = torch.tensor([0.02, 0.05, 0.1] if norm == "linf" else [0.1, 0.3, 0.6])
    if name == "smallcnn":  # ~1 s per bound and example: two examples
        x, y, eps = x[:2], y[:2], eps[:2]
    seen = smallest_margins(model64, x, y, eps.double(), norm)
    tol = slack(chain)
    # Few alpha-CROWN steps with a long stride: any slopes in [0, 1] must give sound bounds,
    # and SmallCNN's slopes for every intermediate node cost ~1 s per step and example.
    alpha = {"steps": 1 if name == "smallcnn" else 5, "lr": 0.5}
    for method in METHODS:
        lb = margin_bounds(chain, x, y, eps, norm=norm, method=method, **alpha)
        finite = torch.isfinite(seen)
        gap = (seen - lb)[finite]
        assert float(gap.min()) >= -tol, (method, float(gap.min()), tol)


def test_bounds_hold_on_a_trained_mlp(trained_mlp: nn.Module, digits_points) -> None:
    """Where the bounds are near zero, so descent on the margins tests them closely."""
    x, y = correct_points(trained_mlp, digits_points, 6)
    chain, model64 = compile_model(trained_mlp, SHAPE), twin64(trained_mlp)
    tol = slack(chain)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        radius = torch.full((len(x),), eps, dtype=torch.float64)
        seen = smallest_margins(model64, x.double(), y, radius, norm)
        for method in METHODS:
            lb = margin_bounds(chain, x, y, eps, norm=norm, method=method)
            assert float((seen - lb)[torch.isfinite(seen)].min()) >= -tol, (norm, method)


# --------------------------------------------------------------------------- tightness


def _affine_models() -> dict[str, nn.Module]:
    torch.manual_seed(3)
    conv = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.AvgPool2d(2, ceil_mode=True, padding=1),
        nn.Conv2d(4, 4, 2, groups=2), nn.Flatten(), nn.Linear(4 * 2 * 2, 10),
    )  # fmt: skip
    return {
        "linear": nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
        "normalized-conv-avgpool": Normalized(conv, [0.5], [0.25]),
    }


@pytest.mark.parametrize("name", ["linear", "normalized-conv-avgpool"])
def test_affine_models_get_the_exact_minimum(name: str) -> None:
    """For an affine model z = J x + c every method's bound is the exact minimum margin:
    Linf: sum over pixels of min(a_i (lo_i - x_i), a_i (hi_i - x_i)) over the box ball ∩ [0,1];
    L2 with the ball inside the box: m(x) - eps ||a||_2."""
    model = _affine_models()[name].eval()
    chain, model64 = compile_model(model, SHAPE), twin64(model)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, *SHAPE, generator=gen, dtype=torch.float64)
    y = model64(x).argmax(1)
    jac = torch.autograd.functional.jacobian(lambda v: model64(v.view(1, *SHAPE))[0], x[0])
    jac = jac.reshape(10, -1)
    a = (jac[y].unsqueeze(1) - jac.unsqueeze(0)).flatten(2)  # (N, K, D): gradients of margins
    eps = torch.tensor([0.01, 0.03, 0.1, 0.3], dtype=torch.float64)
    lo = (x - eps.view(-1, 1, 1, 1)).clamp(0, 1) - x
    hi = (x + eps.view(-1, 1, 1, 1)).clamp(0, 1) - x
    lo, hi = lo.flatten(1).unsqueeze(1), hi.flatten(1).unsqueeze(1)
    exact_linf = margins(model64, x, y) + torch.minimum(a * lo, a * hi).sum(-1)
    inner = 0.5 + 0.1 * (x - 0.5)  # in [0.45, 0.55]: L2 balls of radius <= 0.09 stay inside
    exact_l2 = margins(model64, inner, y) - 0.3 * eps[:, None] * a.norm(dim=-1)
    tol = slack(chain)
    for method in METHODS:
        lb = margin_bounds(chain, x, y, eps, norm="linf", method=method)
        assert torch.allclose(lb, exact_linf, rtol=0, atol=tol), method
        lb = margin_bounds(chain, inner, y, 0.3 * eps, norm="l2", method=method)
        assert torch.allclose(lb, exact_l2, rtol=0, atol=tol), method


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounds_at_radius_zero_are_the_margins(name: str) -> None:
    model = random_model(name)
    chain, model64 = compile_model(model, SHAPE), twin64(model)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 3, 7])  # any labels: margins of either sign
    if name == "smallcnn":  # ~0.4 s per bound and example: two examples
        x, y = x[:2], y[:2]
    exact, tol = margins(model64, x, y), slack(chain)
    for norm in ("linf", "l2"):
        for method in METHODS:
            lb = margin_bounds(chain, x, y, 0.0, norm=norm, method=method, steps=2)
            assert torch.allclose(lb, exact, rtol=0, atol=tol), (norm, method)


def test_ibp_below_crown_ibp_below_crown_below_alpha_crown(
    trained_mlp: nn.Module, digits_points
) -> None:
    """At radii where CROWN's bounds are near zero (so many ReLUs are unstable)."""
    x, y = correct_points(trained_mlp, digits_points, 20)
    chain = compile_model(trained_mlp, SHAPE)
    tol = slack(chain)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        ibp, crown_ibp, crown, alpha = (
            margin_bounds(chain, x, y, eps, norm=norm, method=m, steps=10) for m in METHODS
        )
        ibp, crown_ibp, crown, alpha = (
            b[torch.isfinite(b)] for b in (ibp, crown_ibp, crown, alpha)
        )
        assert bool((crown_ibp >= ibp).all()), norm  # the larger of its bound and IBP's
        assert float((crown_ibp <= crown + tol).double().mean()) >= 0.9, norm
        assert float((ibp <= crown + tol).double().mean()) >= 0.9, norm
        assert bool((alpha >= crown).all()), norm  # alpha-CROWN keeps CROWN's bound at worst
        assert float((alpha > crown + tol).double().mean()) >= 0.25, norm


# --------------------------------------------------------------------------- radius


def test_linear_two_class_radius_is_the_distance_to_the_hyperplane() -> None:
    """Ball inside the box: L2 radius |m| / ||a||_2, Linf radius |m| / ||a||_1."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double().eval()
    a = (model[1].weight[0] - model[1].weight[1]).detach()
    c = float((model[1].bias[0] - model[1].bias[1]).detach())
    # Points near the centre, each moved along a to L2 distance `target` from the hyperplane,
    # and well inside the box (all coordinates within 0.45 of 0.5 by more than the radius).
    gen = torch.Generator().manual_seed(6)
    x = 0.5 + 0.05 * torch.rand(5, 64, generator=gen, dtype=torch.float64)
    target = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.3], dtype=torch.float64)
    x = x - ((x @ a + c - target * a.norm()) / a.norm() ** 2)[:, None] * a
    x = x.view(5, *SHAPE)
    y = torch.zeros(5, dtype=torch.int64)
    m = x.flatten(1) @ a + c
    chain = compile_model(model, SHAPE)
    for norm, dual in (("l2", a.norm()), ("linf", a.abs().sum())):
        true = m / dual
        reach = true.view(-1, 1, 1, 1)
        assert bool(((x - reach > 0) & (x + reach < 1)).all())  # the box stays inactive
        for method in METHODS:
            r = certified_radius(chain, x, y, norm=norm, method=method, rtol=1e-4)
            assert bool((r.lower <= true).all() and (true <= r.upper).all()), (norm, method)
            assert bool((r.upper - r.lower <= 1e-4 * r.upper).all()), (norm, method)


def test_no_attack_beats_a_certified_radius(trained_mlp: nn.Module, digits_points) -> None:
    x, y = correct_points(trained_mlp, digits_points, 6)
    chain, model64 = compile_model(trained_mlp, SHAPE), twin64(trained_mlp)
    tol, alpha = slack(chain), {"method": "alpha-crown", "steps": 5}
    for norm in ("linf", "l2"):
        r = certified_radius(chain, x, y, norm=norm, rtol=1e-2, **alpha)
        assert bool((r.lower > 0).all() and (r.upper > r.lower).all())
        assert bool((r.upper - r.lower <= 1e-2 * r.upper).all())
        assert bool(certified(chain, x, y, r.lower, norm=norm, **alpha).all())
        assert not bool(certified(chain, x, y, r.upper, norm=norm, **alpha).any())
        seen = smallest_margins(model64, x.double(), y, r.lower.double(), norm, steps=50)
        assert float(seen.min()) > -tol, norm
    # A minimum-norm attack (DDN, float32 model): every point adversarial for the float64
    # model lies beyond the L2 radius.
    found = ddn(trained_mlp, x, y, steps=100)
    adversarial = margins(model64, found.x_adv.double(), y).min(1).values < 0
    dist = (found.x_adv.double() - x.double()).flatten(1).norm(dim=1)
    assert int(adversarial.sum()) >= 5
    assert bool((dist[adversarial] > r.lower[adversarial]).all())
    # The attack's distortion as the bracket's upper end (inf where it found nothing).
    top = torch.where(adversarial, dist, torch.inf)
    r = certified_radius(chain, x, y, norm="l2", rtol=1e-2, upper=top, method="crown")
    assert bool((r.upper[adversarial] <= dist[adversarial]).all())
    assert bool((r.upper - r.lower <= 1e-2 * r.upper).all())


def test_misclassified_examples_get_radius_zero(trained_mlp: nn.Module, digits_points) -> None:
    x, y = correct_points(trained_mlp, digits_points, 3)
    wrong = (y + 1) % 10
    r = certified_radius(trained_mlp, x, torch.cat([y[:1], wrong[1:]]), method="crown")
    assert r.lower[0] > 0 and bool((r.lower[1:] == 0).all() and (r.upper[1:] == 0).all())


# --------------------------------------------------------------------------- refusals


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class Square(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * x


class Doubled(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def _cnn_with_batchnorm() -> nn.Module:
    model = SmallCNN(SHAPE, 10)
    model.features[1] = nn.BatchNorm2d(32)
    return model


def _call_last_layer(model: nn.Module, args: tuple) -> None:
    model[3](args[0].new_zeros(1, 16))


def _hooked(change: bool) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    if change:
        model[3].register_forward_hook(lambda mod, args, out: out * 1.001)
    else:  # calls a layer out of order (of the model it runs in), changing nothing
        model.register_forward_pre_hook(_call_last_layer)
    return model


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "BatchNorm2d at 1; fold"),
        (_cnn_with_batchnorm, "BatchNorm2d at features.1"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Residual()), "Residual at 2"),
        (lambda: Normalized(nn.Sequential(nn.Flatten(), Square()), [0], [1]), "Square at inner.1"),
        (lambda: Doubled(nn.Flatten(), nn.Linear(64, 10)), "Doubled at the top level"),
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect", padding=1)), "reflect"),
        (lambda: nn.Sequential(nn.Flatten(), nn.ELU()), "ELU at 1"),
        (lambda: _hooked(change=True), "differs from its layers' chain"),
        (lambda: _hooked(change=False), "does not call its layers once each"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(make, expected: str) -> None:
    with pytest.raises(BoundError) as err:
        compile_model(make(), SHAPE)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


# --------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-sigmoid", "conv-pool", "normalized"])
def test_an_examples_bounds_do_not_depend_on_its_batch(name: str) -> None:
    """Exact: every product with weights runs per example (advlab.bounds.layers.per_example),
    the rest elementwise or as per-row sums."""
    chain = compile_model(random_model(name), SHAPE)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(5, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (5,), generator=gen)
    eps = torch.tensor([0.0, 0.01, 0.03, 0.06, 0.1])
    order = torch.tensor([3, 0, 4, 2, 1])
    for norm in ("linf", "l2"):
        for method in METHODS:
            kw = {"norm": norm, "method": method, "steps": 2}
            batch = margin_bounds(chain, x, y, eps, **kw)
            shuffled = margin_bounds(chain, x[order], y[order], eps[order], **kw)
            alone = torch.cat(
                [
                    margin_bounds(chain, x[i : i + 1], y[i : i + 1], eps[i : i + 1], **kw)
                    for i in range(5)
                ]
            )
            assert torch.equal(batch, alone) and torch.equal(batch[order], shuffled), (norm, method)
    radius = certified_radius(chain, x, y, method="crown", rtol=1e-2)
    alone = [
        certified_radius(chain, x[i : i + 1], y[i : i + 1], method="crown", rtol=1e-2)
        for i in range(5)
    ]
    assert torch.equal(radius.lower, torch.cat([r.lower for r in alone]))
    assert torch.equal(radius.upper, torch.cat([r.upper for r in alone]))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"eps": -0.1}, "eps: give one finite radius >= 0"),
        ({"eps": torch.tensor([0.1, 0.2])}, "eps: give one finite radius >= 0"),
        ({"x": torch.full((3, *SHAPE), 1.5)}, "x: every value must lie in the box"),
        ({"y": torch.tensor([0, 1, 10])}, "y: give one label in [0, 10)"),
        ({"norm": "l1"}, "norm: 'l1' is not one of linf, l2"),
        ({"method": "milp"}, "method: 'milp' is not one of ibp, crown-ibp, crown, alpha-crown"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(change: dict, expected: str) -> None:
    args = {"x": torch.rand(3, *SHAPE), "y": torch.tensor([0, 1, 2]), "eps": 0.1}
    args |= {k: v for k, v in change.items() if k in args}
    options = {k: v for k, v in change.items() if k not in args}
    with pytest.raises(ValueError, match=r"^[^\n]*$") as err:
        margin_bounds(random_model("mlp-relu"), args["x"], args["y"], args["eps"], **options)
    assert expected in str(err.value)


@pytest.mark.parametrize("name", ["mlp-sigmoid", "conv-pool", "normalized"])
def test_the_batched_path_gives_the_same_bounds(name: str, monkeypatch) -> None:
    """The path a GPU takes (the whole batch at once), here on CPU: the same bounds up to
    round-off. alpha-CROWN's Adam may follow round-off-sized gradients apart, so it is only
    held to its guarantee, never below CROWN."""
    chain = compile_model(random_model(name), SHAPE)
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(4, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1])
    tol = slack(chain)
    for norm in ("linf", "l2"):
        alone = {m: margin_bounds(chain, x, y, eps, norm=norm, method=m, steps=3) for m in METHODS}
        with monkeypatch.context() as patch:
            patch.setattr("advlab.bounds.propagation.one_at_a_time", lambda chain: False)
            batch = {
                m: margin_bounds(chain, x, y, eps, norm=norm, method=m, steps=3) for m in METHODS
            }
        for m in ("ibp", "crown"):
            assert torch.allclose(batch[m], alone[m], rtol=0, atol=tol), (norm, m)
        assert bool((batch["alpha-crown"] >= batch["crown"]).all()), norm
