"""Shared fixtures: small sweep files and one local Ray instance for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.optimize import fmin_l_bfgs_b, minimize
from sklearn.datasets import load_digits
from torch import Tensor, nn

from advlab.attacks import AttackResult
from advlab.measure import distortions

# Nothing in the tests may reach W&B's servers or a stale Ray cluster.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def tiny_sweep(**overrides: Any) -> dict[str, Any]:
    """A sweep on the embedded digits that trains and attacks in about a second per trial."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "dataset": {"name": "digits"},
        "grid": {"model": ["fc10", "fc16-10"], "weight_decay": [1.0e-4]},
        "subset": "fraction:0.5",
        "seed": 0,
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.05, 0.1],
        "attack_examples": 12,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 20, "search_steps": 6}],
        "resources": {"cpu": 1},
        "wandb": {"mode": "offline", "project": "advlab-tests"},
        "transfer": {"controls": ["constant", "knn"]},
    }
    raw.update(overrides)
    return raw


SWEEPS = Path(__file__).parent.parent / "sweeps"


def cifar_like() -> Any:
    """sweeps/cifar_like.py, the writer of the RGB data set cifar_like.yaml reads (a script
    beside the sweep files, not a package module)."""
    import importlib.util

    found = importlib.util.spec_from_file_location("cifar_like", SWEEPS / "cifar_like.py")
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def sweep_files() -> list[Path]:
    """Every sweep file of the repository, the data of those that read generated data written
    first (sweeps/cifar_like.py: deterministic, 18 MB, under the gitignored sweeps/data/)."""
    module = cifar_like()
    if not module.DEFAULT.is_file():
        module.write()
    return sorted(SWEEPS.glob("*.yaml"))


@pytest.fixture
def write_sweep(tmp_path: Path):
    """Write a sweep dict to a YAML file under tmp_path, storage inside tmp_path too."""

    def write(raw: dict[str, Any], name: str = "sweep.yaml") -> Path:
        raw = {"storage": str(tmp_path / "results"), **raw}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: a second OpenMP thread only adds contention on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        configure_logging=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


# --- small trained models on the full 8x8 digits, shared by the attack tests ---------------


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.tensor(data.target, dtype=torch.int64)


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> nn.Module:
    """Full-batch Adam on cross-entropy; returns the model in eval mode with no grads left."""
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def mlp(digits: tuple[Tensor, Tensor]) -> nn.Module:
    """A 64-32-10 sigmoid net in the spirit of the paper's FC nets (test accuracy ~0.94)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))
    x, y = digits
    return fit(model, x[:1000], y[:1000], steps=200, lr=1e-2)


@pytest.fixture(scope="module")
def linear10(digits: tuple[Tensor, Tensor]) -> nn.Sequential:
    """Softmax regression on the pixels (the paper's FC10)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = digits
    return fit(model, x[:500], y[:500], steps=100, lr=0.05)  # type: ignore[return-value]


def predict_labels(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def l2_distance(x: Tensor, result: AttackResult) -> Tensor:
    return distortions(x, result.x_adv)["l2"]


def exact_linear_distance_slsqp(
    lin: nn.Linear, x0: np.ndarray, target: int, lead: float = 0.0
) -> float:
    """min ||r||_2 s.t. the target logit is >= every other + lead at x0 + r, 0 <= x0 + r <= 1
    (SLSQP on the primal QP): the known answer for a linear model."""
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    others = [j for j in range(len(b)) if j != target]
    a = w[target] - w[others]  # (K-1, D): rows of the half-space constraints a.(x0+r) + c >= 0
    c = b[target] - b[others] - lead
    res = minimize(
        lambda r: r @ r,
        np.zeros_like(x0),
        jac=lambda r: 2 * r,
        constraints=[{"type": "ineq", "fun": lambda r: a @ (x0 + r) + c, "jac": lambda r: a}],
        bounds=list(zip(-x0, 1 - x0, strict=True)),
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    return float(np.sqrt(res.fun))


def assert_attack_contract(model: nn.Module, x: Tensor, y: Tensor, result: AttackResult) -> None:
    """Box, shapes, dtypes and success recomputed from the model."""
    b = len(x)
    assert result.x_adv.shape == x.shape
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    for field in (result.success, result.adv_pred, result.target, result.grad_evals):
        assert field.shape == (b,)
    assert result.success.dtype == torch.bool
    assert result.adv_pred.dtype == result.target.dtype == result.grad_evals.dtype == torch.int64
    pred = predict_labels(model, result.x_adv)
    assert torch.equal(result.adv_pred, pred)
    expected = torch.where(result.target < 0, pred != y, pred == result.target)
    assert torch.equal(result.success, expected)
    assert not (result.target == y).any()
    assert (result.grad_evals >= 0).all()


def exact_linear_distance(lin: nn.Linear, x0: np.ndarray, target: int) -> float:
    """min ||r||_2 s.t. the target logit is >= every other at x0 + r, 0 <= x0 + r <= 1.

    Solved through its dual: for multipliers lam >= 0 of the constraints A (x0 + r) + c >= 0,
    the box minimiser is z(lam) = clip(x0 + A' lam / 2, 0, 1) and q(lam) = ||z - x0||^2 -
    lam . (A z + c) is concave and differentiable with gradient -(A z + c); strong duality holds
    (a convex QP), so max q is the squared distance. L-BFGS-B on K-1 variables.
    """
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    others = [j for j in range(len(b)) if j != target]
    a = w[target] - w[others]
    c = b[target] - b[others]

    def neg_dual(lam: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.clip(x0 + a.T @ lam / 2, 0.0, 1.0)
        slack = a @ z + c
        return -float((z - x0) @ (z - x0) - lam @ slack), slack

    _, value, info = fmin_l_bfgs_b(
        neg_dual, np.zeros(len(others)), bounds=[(0, None)] * len(others), pgtol=1e-12, factr=10
    )
    assert info["warnflag"] == 0, info
    return float(np.sqrt(max(-value, 0.0)))


def exact_untargeted_distance(lin: nn.Linear, x0: np.ndarray, label: int) -> float:
    """The minimum over wrong classes of `exact_linear_distance`, pruned by a lower bound.

    Each target's distance is at least its farthest single half-space (box ignored); targets are
    solved in order of that bound and skipped once it exceeds the best found.
    """
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    bounds = []
    for t in range(len(b)):
        if t == label:
            continue
        a = w[t] - np.delete(w, t, axis=0)
        c = b[t] - np.delete(b, t)
        bounds.append((max(0.0, float(np.max(-(a @ x0 + c) / np.linalg.norm(a, axis=1)))), t))
    best = np.inf
    for bound, t in sorted(bounds):
        if bound >= best:
            break
        best = min(best, exact_linear_distance(lin, x0, t))
    return best
