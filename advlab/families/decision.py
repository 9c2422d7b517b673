"""Torch versions of fitted scikit-learn decision functions, so gradient attacks run on them.

- Linear models (LogisticRegression, LinearSVC, anything with `coef_`/`intercept_` whose
  predict is the argmax of `X @ coef_.T + intercept_`): a `Sequential(Flatten, Linear)` in
  float64, the shape advlab.bounds.exact reads for its exact minima. Two classes: logits
  [0, decision], so class 1 wins exactly where scikit-learn's decision is > 0.
  `argmax_labels` is the float64 scores' argmax, for decision-based attacks.
- RBF SVC: its one-vs-one scores (`pairwise`, equal to `decision_function` with shape "ovo"),
  combined as scikit-learn's one-vs-rest output (votes plus squashed confidences, which is
  what `predict` takes the argmax of when `break_ties=True`). The votes are piecewise constant,
  so their gradient is taken through smooth votes (a sigmoid of each pairwise score): the value
  is scikit-learn's, the slope says which way the pairwise scores move the votes.
  `argmax_labels` gives decision-based attacks the predicted classes straight from the float64
  scores (forward rounds them to the input's dtype, where two classes' scores can tie).

- k nearest neighbours (uniform weights, Euclidean): `NeighbourVotes`, the votes of the k
  nearest training points, whose argmax (the smallest class among tied votes) is predict. It
  is a label oracle, not a decision function (the votes are piecewise constant): the model
  stays prediction-only, but decision-based attacks query it in batched float64 matrix
  products instead of one scikit-learn call per batch, each block of nearby queries against
  only the training points that can be nearest (`torch_labels`).

Every module computes in float64 and returns the input's dtype. A class the estimator never saw
(a subsample without it) gets the logit `ABSENT`, so it never wins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ABSENT = -1.0e9  # the logit of a class the estimator was not fitted on
SOFT_VOTE_SCALE = 1.0  # pairwise score units per unit of the smooth votes' sigmoid
KERNEL_BLOCK = 1 << 19  # float64 entries of one (queries, training points) block: 4 MiB
SMALL_BATCH = 256  # queries below which the RBF SVM's pairwise scores are one product
LOCAL_BLOCKS = (128, 16)  # queries per block of the neighbour votes (pruned around its centre)
LOCAL_CANDIDATES = 8  # training points per block and per neighbour ranked for a local block


class Float64Sequential(nn.Sequential):
    """A Sequential computed in its parameters' dtype (float64 as built) whatever the input's,
    returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        own = next(self.parameters()).dtype
        return super().forward(x.to(own)).to(x.dtype)


def torch_decision(estimator: Any, num_classes: int) -> nn.Module | None:
    """The estimator's decision function as a torch module of (B, C, H, W) -> (B, K) logits
    whose argmax is its predict; None when no faithful torch version exists (then the model
    stays prediction-only)."""
    classes = np.asarray(getattr(estimator, "classes_", []))
    if not _labels_are_indices(classes, num_classes):
        return None
    if _is_rbf_svc(estimator):
        return _rbf_module(estimator, classes, num_classes)
    if hasattr(estimator, "coef_") and hasattr(estimator, "intercept_"):
        return _linear_module(estimator, classes, num_classes)
    return None


def _labels_are_indices(classes: np.ndarray, num_classes: int) -> bool:
    if classes.size < 2 or not np.issubdtype(classes.dtype, np.integer):
        return False
    return bool(np.all(np.diff(classes) > 0) and classes[0] >= 0 and classes[-1] < num_classes)


def _linear_module(estimator: Any, classes: np.ndarray, num_classes: int) -> nn.Module:
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(estimator.intercept_, dtype=np.float64))
    if len(classes) == 2 and len(coef) == 1:  # one decision: class 1 where it is > 0
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, ABSENT)
    weight[classes], bias[classes] = coef, intercept
    layer = nn.Linear(coef.shape[1], num_classes, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return LinearDecision(nn.Flatten(), layer).requires_grad_(False)


class LinearDecision(Float64Sequential):
    """Flatten + Linear in float64: a linear model's scores; `argmax_labels` their float64
    argmax (forward rounds the scores to the input's dtype, where two classes can tie)."""

    def argmax_labels(self, x: Tensor) -> Tensor:
        layer = self[1]
        return layer(x.flatten(1).to(layer.weight.dtype)).argmax(1)


def _is_rbf_svc(estimator: Any) -> bool:
    from sklearn.svm import SVC

    return isinstance(estimator, SVC) and estimator.kernel == "rbf"


def _rbf_module(estimator: Any, classes: np.ndarray, num_classes: int) -> nn.Module | None:
    if len(classes) > 2 and not estimator.break_ties:
        return None  # its predict breaks vote ties by class order, no decision function does
    return RBFDecision(
        support=np.asarray(estimator.support_vectors_, dtype=np.float64),
        dual=np.asarray(estimator._dual_coef_, dtype=np.float64),  # libsvm's signs
        intercept=np.asarray(estimator._intercept_, dtype=np.float64),
        n_support=np.asarray(estimator.n_support_, dtype=np.int64),
        gamma=float(estimator._gamma),
        classes=classes,
        num_classes=num_classes,
    )


class RBFDecision(nn.Module):
    """A fitted RBF SVC: `pairwise(x)` its one-vs-one scores, `forward(x)` its predictions'
    scores (two classes: [0, decision]; more: scikit-learn's one-vs-rest output)."""

    def __init__(
        self,
        support: np.ndarray,
        dual: np.ndarray,
        intercept: np.ndarray,
        n_support: np.ndarray,
        gamma: float,
        classes: np.ndarray,
        num_classes: int,
    ) -> None:
        super().__init__()
        k = len(classes)
        starts = np.concatenate([[0], np.cumsum(n_support)])
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        # Pair (i, j)'s coefficients over every support vector (zero outside classes i, j):
        # libsvm's dual_coef_[j - 1] on class i's vectors and dual_coef_[i] on class j's.
        coef = np.zeros((len(pairs), len(support)))
        for p, (i, j) in enumerate(pairs):
            coef[p, starts[i] : starts[i + 1]] = dual[j - 1, starts[i] : starts[i + 1]]
            coef[p, starts[j] : starts[j + 1]] = dual[i, starts[j] : starts[j + 1]]
        self.register_buffer("support", torch.from_numpy(support))
        self.register_buffer("support_sq", self.support.square().sum(1))
        self.register_buffer("coef", torch.from_numpy(coef))
        self.register_buffer("intercept", torch.from_numpy(intercept))
        self.register_buffer("first", torch.tensor([i for i, _ in pairs], dtype=torch.int64))
        self.register_buffer("second", torch.tensor([j for _, j in pairs], dtype=torch.int64))
        self.register_buffer("classes", torch.from_numpy(classes.astype(np.int64)))
        self.gamma, self.k, self.num_classes = gamma, k, num_classes
        # Class c's vectors carry coefficients in the k - 1 pairs with c only: libsvm's
        # dual_coef_ rows times their kernel values (one small product per class) give those
        # pairs' terms, a fifth of the products of `coef` (k(k-1)/2 pairs over every vector)
        self.bounds = [int(v) for v in starts]
        first_term = [i * (k - 1) + j - 1 for i, j in pairs]  # pair (i, j) in class i's block
        second_term = [j * (k - 1) + i for i, j in pairs]  # and in class j's
        derived = {"dual": torch.from_numpy(np.ascontiguousarray(dual)),
                   "first_term": torch.tensor(first_term, dtype=torch.int64),
                   "second_term": torch.tensor(second_term, dtype=torch.int64)}  # fmt: skip
        for name, value in derived.items():  # not saved: the state dict stays as it was
            self.register_buffer(name, value, persistent=False)

    def pairwise(self, x: Tensor) -> Tensor:
        """(B, k(k-1)/2) in the buffers' dtype (float64 as built): > 0 where the pair's first
        class wins (libsvm's sign)."""
        flat = x.flatten(1).to(self.support.dtype)
        # in row chunks: a (rows, support) kernel block that stays in cache is several times
        # faster than one the size of a whole query batch
        rows = max(1, KERNEL_BLOCK // len(self.support))
        return torch.cat([self._pairwise_rows(part) for part in flat.split(rows)])

    def _pairwise_rows(self, flat: Tensor) -> Tensor:
        if flat.requires_grad:  # gradient attacks: the dense form, whose backward is faster
            sq = torch.addmm(self.support_sq, flat, self.support.T, alpha=-2.0)
            sq = (sq + (flat * flat).sum(1, keepdim=True)).clamp_min(0.0)
            return torch.addmm(self.intercept, torch.exp(-self.gamma * sq), self.coef.T)
        # transposed, (support, rows): each class's kernel values are contiguous rows, and
        # the per-class products are wide (several times faster than a (rows, pairs) one)
        sq = torch.addmm(self.support_sq[:, None], self.support, flat.T, alpha=-2.0)
        kernel = sq.add_((flat * flat).sum(1)).clamp_min_(0.0).mul_(-self.gamma).exp_()
        if len(flat) < SMALL_BATCH:  # one product beats k small ones (more so with threads)
            return torch.addmm(self.intercept, kernel.T, self.coef.T)
        b = self.bounds
        terms = torch.cat([self.dual[:, b[c] : b[c + 1]] @ kernel[b[c] : b[c + 1]]
                           for c in range(self.k)])  # fmt: skip
        return (terms[self.first_term] + terms[self.second_term]).T + self.intercept

    def argmax_labels(self, x: Tensor) -> Tensor:
        """(B,) the predicted classes: the argmax of `forward(x)`'s float64 scores (without
        the smooth votes, which only give the slope)."""
        scores = self._scores(self.pairwise(x), smooth=False)
        return self.classes[scores.argmax(1)]

    def forward(self, x: Tensor) -> Tensor:
        dec = self.pairwise(x)
        scores = self._scores(dec)
        out = torch.full((len(x), self.num_classes), ABSENT, dtype=dec.dtype, device=x.device)
        out[:, self.classes] = scores
        return out.to(x.dtype)

    def _scores(self, dec: Tensor, smooth: bool = True) -> Tensor:
        """(B, k) scores of the fitted classes from the pairwise ones (smooth: with the
        votes' slope; the values are the same)."""
        if self.k == 2:
            return torch.cat([torch.zeros_like(dec), -dec], dim=1)  # scikit-learn's sign
        return self._one_vs_rest(dec, smooth)

    def _one_vs_rest(self, dec: Tensor, smooth: bool = True) -> Tensor:
        """scikit-learn's `_ovr_decision_function(dec < 0, -dec, k)`, with the votes' slope
        taken from smooth votes (straight through: the value is the hard votes')."""
        b = len(dec)
        sums = dec.new_zeros(b, self.k)
        sums.index_add_(1, self.first, dec).index_add_(1, self.second, -dec)
        hard = dec.new_zeros(b, self.k)
        won = (dec >= 0).to(dec.dtype)
        hard.index_add_(1, self.first, won).index_add_(1, self.second, 1.0 - won)
        if not smooth:
            return hard + sums / (3 * (sums.abs() + 1))
        wins = torch.sigmoid(dec / SOFT_VOTE_SCALE)
        soft = dec.new_zeros(b, self.k)
        soft.index_add_(1, self.first, wins).index_add_(1, self.second, 1.0 - wins)
        votes = hard + (soft - soft.detach())
        return votes + sums / (3 * (sums.abs() + 1))


def torch_labels(estimator: Any, num_classes: int) -> nn.Module | None:
    """A torch module of (B, C, H, W) -> (B, K) scores whose argmax is the estimator's predict,
    for prediction-only estimators that have one (k nearest neighbours); None otherwise."""
    from sklearn.neighbors import KNeighborsClassifier

    classes = np.asarray(getattr(estimator, "classes_", []))
    if not isinstance(estimator, KNeighborsClassifier) or not _labels_are_indices(
        classes, num_classes
    ):
        return None
    if estimator.weights != "uniform" or estimator.effective_metric_ != "euclidean":
        return None
    if getattr(estimator, "outputs_2d_", False):
        return None
    return NeighbourVotes(
        np.asarray(estimator._fit_X, dtype=np.float64),
        np.asarray(estimator._y, dtype=np.int64),  # indices into classes_
        int(estimator.n_neighbors),
        classes,
        num_classes,
    )


class NeighbourVotes(nn.Module):
    """k nearest neighbours' votes per class (float64 distances, as scikit-learn's brute
    search); absent classes score ABSENT."""

    def __init__(
        self, train: np.ndarray, labels: np.ndarray, k: int, classes: np.ndarray, num_classes: int
    ) -> None:
        super().__init__()
        self.register_buffer("points", torch.from_numpy(train))
        self.register_buffer("points_sq", self.points.square().sum(1))
        self.points_max = float(self.points_sq.max().sqrt()) if len(train) else 0.0
        self.register_buffer("labels", torch.from_numpy(labels))
        self.register_buffer("classes", torch.from_numpy(classes.astype(np.int64)))
        self.k, self.num_classes = k, num_classes

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().flatten(1).to(self.points.dtype)
        near = self.nearest(flat)
        votes = flat.new_zeros(len(flat), len(self.classes))
        votes.scatter_add_(1, self.labels[near], torch.ones_like(near, dtype=flat.dtype))
        out = torch.full((len(x), self.num_classes), ABSENT, dtype=votes.dtype, device=x.device)
        out[:, self.classes] = votes
        return out.to(x.dtype)

    def nearest(self, flat: Tensor) -> Tensor:
        """(n, k) indices of the k nearest training points of queries `flat` (n, D) in the
        points' dtype. A decision-based attack asks in runs of queries close together (probes
        around one point), so blocks of consecutive queries are first tried against only the
        training points that can be nearest to one of them (`_local`: blocks of 128, then the
        rows of the blocks that failed in blocks of 16, e.g. a block that straddles two
        examples' probes); the rest are compared with every training point."""
        near = torch.empty(len(flat), self.k, dtype=torch.int64, device=flat.device)
        todo = torch.arange(len(flat), device=flat.device)
        for block in LOCAL_BLOCKS:
            todo = self._local(flat, todo, block, near)
        rows = max(1, KERNEL_BLOCK // len(self.points))
        for part in todo.split(rows):
            sq = torch.addmm(self.points_sq, flat[part], self.points.T, alpha=-2.0)
            near[part] = sq.topk(self.k, dim=1, largest=False).indices
        return near

    def _local(self, flat: Tensor, todo: Tensor, block: int, near: Tensor) -> Tensor:
        """Fill `near` for the whole blocks of `block` consecutive rows of `todo` whose
        possible neighbours are few; return the rows left (failed blocks and the tail).

        By the triangle inequality only the training points within (k-th nearest distance
        + 2 r) of a block's centre can be among the k nearest of a query within r of it. The
        centre's distances come from a matrix product, so the bound gets their round-off:
        |a - b| <= sqrt(|a^2 - b^2|) and the squares are off by (2D + 10) u (|c| + |p|)^2 at
        most (u the unit round-off). A block is local when its LOCAL_CANDIDATES * (k + 1)
        points nearest the centre hold every point within the bound; the k nearest of each
        of its queries are then ranked among those alone."""
        whole = len(todo) // block * block
        m = min(len(self.points), LOCAL_CANDIDATES + LOCAL_CANDIDATES * self.k)
        if whole == 0 or m >= len(self.points):
            return todo
        rows = todo[:whole].view(-1, block)
        groups = flat[rows]  # (g, block, D)
        centre = groups.mean(1)
        radius = (groups - centre[:, None]).norm(dim=2).amax(1)
        centre_sq = centre.square().sum(1, keepdim=True)
        sq = torch.addmm(self.points_sq + centre_sq, centre, self.points.T, alpha=-2.0)
        close = sq.topk(m, dim=1, largest=False)  # sorted: the k-th nearest is among them
        reach = close.values.clamp_min(0.0).sqrt()  # (g, m) distances from the centre
        unit = torch.finfo(flat.dtype).eps / 2
        slack = ((2 * flat.shape[1] + 10) * unit) ** 0.5 * (centre_sq.sqrt() + self.points_max)
        bound = reach[:, self.k - 1] + 2 * radius * (1 + 1e-9) + 2 * slack.squeeze(1) + 1e-12
        local = reach[:, -1] > bound  # every point within the bound is a candidate
        cand = close.indices[local]  # (l, m)
        dist = torch.baddbmm(self.points_sq[cand][:, None, :], groups[local],
                             self.points[cand].transpose(1, 2), alpha=-2.0)  # fmt: skip
        best = dist.topk(self.k, dim=2, largest=False).indices  # (l, block, k) into cand
        near[rows[local].flatten()] = cand.gather(1, best.flatten(1)).view(-1, self.k)
        return torch.cat([rows[~local].flatten(), todo[whole:]])
