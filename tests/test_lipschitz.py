"""Lipschitz bounds (advlab.measures.lipschitz) against explicit matrices and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from advlab.measures.lipschitz import (
    LIPSCHITZ,
    conv_bound,
    linear_bound,
    lipschitz_bounds,
    lipschitz_rows,
    network_bound,
)
from advlab.models import build_model

# --------------------------------------------------------------------------- helpers


# Everything here is small; on a shared 2-core box, OpenMP threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sigma_max(matrix: Tensor) -> float:
    return float(np.linalg.svd(matrix.detach().double().numpy(), compute_uv=False)[0])


def conv_matrix(
    weight: Tensor, hw: tuple[int, int], stride: tuple[int, int], padding: int, circular: bool
) -> Tensor:
    """The convolution as an explicit (outputs x inputs) matrix: column j is conv(e_j).

    Circular: pad k - 1 periodically in all, so the output covers the whole grid / stride.
    """
    c, (h, w) = weight.shape[1], hw
    basis = torch.eye(c * h * w, dtype=torch.float64).reshape(-1, c, h, w)
    if circular:
        kh, kw = weight.shape[-2:]
        pads = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
        out = F.conv2d(F.pad(basis, pads, mode="circular"), weight.double(), stride=stride)
    else:
        out = F.conv2d(basis, weight.double(), stride=stride, padding=padding)
    return out.reshape(c * h * w, -1).T


def worst_ratio(model: nn.Module, shape: tuple[int, ...], steps: int = 60) -> float:
    """max ||f(x+r) - f(x)|| / ||r|| over random r and r found by Adam ascent on the ratio."""
    gen = torch.Generator().manual_seed(0)
    model.eval()
    x = torch.rand(16, *shape, generator=gen)

    def ratio(r: Tensor) -> Tensor:
        diff = (model(x + r) - model(x)).flatten(1).norm(dim=1)
        return diff / r.flatten(1).norm(dim=1)

    with torch.no_grad():
        best = max(
            float(ratio(s * torch.randn(16, *shape, generator=gen)).max()) for s in (1e-3, 1)
        )
    r = (0.1 * torch.randn(16, *shape, generator=gen)).requires_grad_()
    opt = torch.optim.Adam([r], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        values = ratio(r)
        best = max(best, float(values.max().detach()))
        (-values.sum()).backward()
        opt.step()
    return best


# --------------------------------------------------------------------------- linear and conv


def test_linear_bound_is_largest_singular_value() -> None:
    assert linear_bound(torch.diag(torch.tensor([3.0, -5.0, 2.0]))) == pytest.approx(5.0)
    w = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    assert linear_bound(w) == pytest.approx(sigma_max(w), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_bound_equals_circular_convolution_norm(stride: int) -> None:
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(stride))
    exact = sigma_max(conv_matrix(w, (6, 6), (stride, stride), 0, circular=True))
    # padding 0 on a grid the stride divides: the grid is the input itself
    assert conv_bound(w, (6, 6), stride, 0) == pytest.approx(exact, rel=1e-9)
    # circular padding only shifts the output, so any padding gives the same norm
    assert conv_bound(w, (6, 6), stride, 1, circular=True) == pytest.approx(exact, rel=1e-9)


def test_conv_bound_rectangular_kernel_grid_and_stride() -> None:
    w = torch.randn(4, 2, 3, 2, generator=torch.Generator().manual_seed(5))
    exact = sigma_max(conv_matrix(w, (6, 4), (2, 1), 0, circular=True))
    assert conv_bound(w, (6, 4), (2, 1), 0) == pytest.approx(exact, rel=1e-9)
    odd = sigma_max(conv_matrix(w, (5, 7), (1, 1), 0, circular=True))  # odd grid: half spectrum
    assert conv_bound(w, (5, 7), 1, 0) == pytest.approx(odd, rel=1e-9)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])
def test_conv_bound_upper_bounds_zero_padded_convolution(
    stride: int, padding: int, hw: tuple[int, int]
) -> None:
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    zero_padded = sigma_max(conv_matrix(w, hw, (stride, stride), padding, circular=False))
    assert conv_bound(w, hw, stride, padding) >= zero_padded * (1 - 1e-9)


def test_conv_bound_1x1_strided_is_channel_matrix_norm() -> None:
    # Aliasing check by hand: a 1x1 conv of stride 2 keeps a quarter of the pixels, each mixed
    # by the same D x C matrix, so its norm is that matrix's.
    w = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    assert conv_bound(w, (8, 8), 2, 0) == pytest.approx(sigma_max(w[:, :, 0, 0]), rel=1e-9)


# --------------------------------------------------------------------------- whole networks


def test_sigmoid_net_bound_is_product_of_singular_values_and_quarters() -> None:
    torch.manual_seed(0)
    model = build_model("fc12-9-4", (1, 4, 4), 4)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    expected = math.prod(sigma_max(m.weight) for m in linears) * 0.25**2
    bounds = lipschitz_bounds(model, (1, 4, 4))
    assert [b.kind for b in bounds] == [
        "flatten", "linear", "sigmoid", "linear", "sigmoid", "linear"
    ]  # fmt: skip
    assert network_bound(bounds) == pytest.approx(expected, rel=1e-6)
    relu = build_model("fc12-9-4", (1, 4, 4), 4, activation="relu")
    relu_expected = math.prod(sigma_max(m.weight) for m in relu if isinstance(m, nn.Linear))
    assert network_bound(lipschitz_bounds(relu, (1, 4, 4))) == pytest.approx(relu_expected)


@pytest.mark.parametrize(
    ("name", "shape"), [("fc16-12-10", (1, 8, 8)), ("ae20-10", (1, 8, 8)), ("cnn", (1, 8, 8))]
)
def test_network_bound_exceeds_every_observed_ratio(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    bound = network_bound(lipschitz_bounds(model, shape))
    assert 0 < worst_ratio(model, shape) <= bound


def test_bound_is_tight_for_linear_models() -> None:
    # With no nonlinearity the product is the operator norm itself, which ascent approaches.
    torch.manual_seed(0)
    fc10 = build_model("fc10", (1, 4, 4), 10)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"))
    for model, shape in ((fc10, (1, 4, 4)), (conv, (2, 6, 6))):
        bound = network_bound(lipschitz_bounds(model, shape))
        assert 0.98 * bound <= worst_ratio(model, shape, steps=150) <= bound * (1 + 1e-6)


def test_ae_bounds_follow_the_classifier_path_not_the_decoder() -> None:
    model = build_model("ae6-3", (1, 4, 4), 3)
    names = [b.name for b in lipschitz_bounds(model, (1, 4, 4))]
    assert names == ["encoder.0", "encoder.1", "encoder.2", "classifier"]


def test_residual_block_and_batchnorm_bounds() -> None:
    torch.manual_seed(0)
    block = BasicBlock(
        2, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(2, 4, 1, stride=2), nn.BatchNorm2d(4))
    )
    model = nn.Sequential(block, BasicBlock(4, 4))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 2)
    running_var = block.bn1.running_var.clone()
    bounds = lipschitz_bounds(model, (2, 6, 6))
    assert model.training and torch.equal(block.bn1.running_var, running_var)  # left untouched

    def bn_bound(bn: nn.BatchNorm2d) -> float:
        return float((bn.weight / (bn.running_var + bn.eps).sqrt()).abs().max().detach())

    branch = conv_bound(block.conv1.weight, (6, 6), 2, 1) * bn_bound(block.bn1)
    branch *= conv_bound(block.conv2.weight, (3, 3), 1, 1) * bn_bound(block.bn2)
    shortcut = conv_bound(block.downsample[0].weight, (6, 6), 2, 0) * bn_bound(block.downsample[1])
    assert [(b.name, b.kind) for b in bounds] == [("0", "residual"), ("1", "residual")]
    assert bounds[0].bound == pytest.approx(branch + shortcut)
    assert bounds[1].bound > 1.0  # identity shortcut adds exactly 1 to the branch
    assert worst_ratio(model, (2, 6, 6), steps=30) <= network_bound(bounds)


def test_pooling_bounds() -> None:
    bounds = lipschitz_bounds(
        nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2), nn.AdaptiveAvgPool2d(1)),
        (1, 12, 12),
    )
    # Non-overlapping max: 1; 3x3 windows at stride 2 cover a pixel up to 2x2 times: sqrt(4);
    # global average of a 2x2 map: norm 1/sqrt(4).
    assert [b.bound for b in bounds] == pytest.approx([1.0, 2.0, 0.5])


def test_lipschitz_rows_shape() -> None:
    torch.manual_seed(0)
    rows = lipschitz_rows(build_model("fc8-3", (1, 4, 4), 3), (1, 4, 4))
    assert all(set(r) == {"layer", "kind", "bound"} for r in rows)
    # Flatten (index 0) has bound 1 and is left out; each row names its module and kind.
    assert [(r["layer"], r["kind"]) for r in rows] == [
        ("1", "linear"), ("2", "sigmoid"), ("3", "linear"), ("network", "network"),
    ]  # fmt: skip
    assert rows[-1]["bound"] == pytest.approx(math.prod(r["bound"] for r in rows[:-1]))
    assert rows[1]["bound"] == 0.25  # the sigmoid's
    assert LIPSCHITZ.metrics(rows) == {"lipschitz/upper_bound": rows[-1]["bound"]}


def test_resnet18_bounds_cover_every_block() -> None:
    torch.manual_seed(0)
    bounds = lipschitz_bounds(build_model("resnet18", (3, 4, 4), 10), (3, 4, 4))
    assert [b.name for b in bounds if b.kind == "residual"] == [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    assert bounds[-1].name == "fc" and all(b.bound > 0 for b in bounds)
