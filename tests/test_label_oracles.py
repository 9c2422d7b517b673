"""The fast label oracles decision-based attacks query (advlab.families.decision) at near ties:
1-NN's pruned votes, the RBF SVM's one-vs-one labels and a linear model's float64 argmax equal
scikit-learn's predict on points a hair either side of a decision boundary, and HopSkipJump is
the same through either path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC
from torch import nn

from advlab.attacks.registry import run_attack
from advlab.families.decision import torch_decision, torch_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# offsets either side of a tie: squared-distance or score gaps of about 1e-9 to 1e-3
OFFSETS = np.geomspace(1e-9, 1e-3, 64)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def near_ties(a: np.ndarray, b: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """128 points on the line through a and b, at +-OFFSETS from `middle`."""
    unit = (b - a) / np.linalg.norm(b - a)
    return middle + np.concatenate([OFFSETS, -OFFSETS])[:, None] * unit


def test_pruned_1nn_votes_equal_scikit_learn_at_near_ties(digits) -> None:
    x, y = digits
    train, labels = x[:700], y[:700]
    est = KNeighborsClassifier(n_neighbors=1).fit(train, labels)
    oracle = torch_labels(est, 10)
    blocks = []
    for i in range(10):  # a training point and its nearest of another class: equidistant
        other = np.flatnonzero(labels != labels[i])
        j = other[((train[other] - train[i]) ** 2).sum(1).argmin()]
        blocks.append(near_ties(train[i], train[j], (train[i] + train[j]) / 2))
    queries = torch.from_numpy(np.concatenate(blocks))  # float64: ties finer than float32's
    expected = est.predict(queries.numpy())
    assert len(set(expected)) > 2  # both sides of the ties
    got = oracle(queries.view(-1, 1, 8, 8)).argmax(1).numpy()
    assert np.array_equal(got, expected)
    # the pruned path itself answered them: every block of 128 was local
    near = torch.full((len(queries), 1), -1)
    left = oracle._local(queries, torch.arange(len(queries)), 128, near)
    assert len(left) == 0 and np.array_equal(labels[near[:, 0].numpy()], expected)


def boundary(est: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The point where predict changes on the segment from a to b, bisected to 1e-13."""
    low, high = 0.0, 1.0
    first = est.predict(a[None])[0]
    for _ in range(44):
        mid = (low + high) / 2
        if est.predict((a + mid * (b - a))[None])[0] == first:
            low = mid
        else:
            high = mid
    return a + (low + high) / 2 * (b - a)


def test_the_rbf_svm_labels_equal_scikit_learn_at_near_ties(digits) -> None:
    x, y = digits
    est = SVC(break_ties=True).fit(x[:600], y[:600])
    module = torch_decision(est, 10)
    pred = est.predict(x[600:700])
    starts = np.flatnonzero(pred[:-1] != pred[1:])[:8]  # neighbours predicted differently
    queries = np.concatenate([near_ties(x[600 + i], x[601 + i],
                                        boundary(est, x[600 + i], x[601 + i]))
                              for i in starts])  # fmt: skip
    expected = est.predict(queries)
    assert len(set(expected)) > 2
    images = torch.from_numpy(queries).view(-1, 1, 8, 8)
    assert np.array_equal(module.argmax_labels(images).numpy(), expected)
    assert np.array_equal(module(images).argmax(1).numpy(), expected)


def test_a_linear_models_float32_queries_get_its_float64_labels(digits) -> None:
    x, y = digits
    est = LogisticRegression(max_iter=2000).fit(x[:600], y[:600])
    module = torch_decision(est, 10)
    pred = est.predict(x[600:700])
    starts = np.flatnonzero(pred[:-1] != pred[1:])[:8]
    queries = np.concatenate([near_ties(x[600 + i], x[601 + i],
                                        boundary(est, x[600 + i], x[601 + i]))
                              for i in starts])  # fmt: skip
    images = torch.from_numpy(queries).float().view(-1, 1, 8, 8)  # HopSkipJump's probes' dtype
    expected = est.predict(images.flatten(1).double().numpy())
    assert len(set(expected)) > 2
    assert np.array_equal(module.argmax_labels(images).numpy(), expected)
    # forward's scores, rounded to float32, tie on some of these: the labels need float64
    assert not np.array_equal(module(images).argmax(1).numpy(), expected)


class Float64Forward(nn.Module):
    """A model's forward alone (no argmax_labels), its scores kept in float64 (forward
    returns the input's dtype, and float32 scores can tie where the float64 ones do not)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.double())


def test_hopskipjump_is_the_same_through_argmax_labels(digits) -> None:
    x, y = digits
    est = SVC(break_ties=True).fit(x[:600], y[:600])
    module = torch_decision(est, 10)
    xa = torch.from_numpy(x[700:702]).float().view(-1, 1, 8, 8)
    ya = torch.from_numpy(est.predict(x[700:702]))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    fast = run_attack("hsj", module, xa, ya, max_queries=200, generator=gen())
    slow = run_attack("hsj", Float64Forward(module), xa, ya, max_queries=200, generator=gen())
    assert fast.success.all() and (fast.grad_evals > 100).all()
    assert torch.equal(fast.x_adv, slow.x_adv) and torch.equal(fast.grad_evals, slow.grad_evals)
