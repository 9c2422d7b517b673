"""HopSkipJump (Chen, Jordan & Wainwright 2020): a decision-based minimum-norm attack, L2 or Linf.

It needs only the model's predicted class, so it attacks any classifier, a random forest or
k nearest neighbours as well as a net. Per example: a random uniform image the model already
misclassifies, searched to the boundary, is the start (the closest of `starts` of them); then,
each iteration, a binary search to the decision boundary
between the input and the current point, a Monte-Carlo estimate of the boundary's normal from
the signs of `n_t = min(init_evals * sqrt(t), max_evals)` random probes, and a geometric step
search along it (halving from dist / sqrt(t) until the point is adversarial again). The closest
boundary point any binary search found is returned; an input the model already misclassifies
is returned as it is (one query).

Batched over examples with per-example state: every example draws its random numbers from its
own stream (seeded by the generator and its pixels) and spends its own queries, so its result
does not depend on its batch-mates. `grad_evals` counts model queries (one per image the model
classifies, the start's search included); no example ever spends more than `max_queries`.
Untargeted only (a targeted start needs an image of the target class, which attacks are not
given). A model with an `argmax_labels(x)` method (the torch versions of linear models and the
RBF SVM) is asked that instead of `forward(x).argmax(1)`. On a CPU the probes are drawn, classified
and summed a few examples at a time (PROBE_PIXELS), which keeps them in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.attacks.base import (
    AttackResult,
    Settings,
    check_norm,
    eval_mode,
    example_generators,
    finish,
    merged_settings,
    prepare,
)

PROBE_PIXELS = 1 << 19  # probe pixels per model call on a CPU (2 MB in float32: in cache)


class HopSkipJumpSettings(Settings):
    max_queries: int = Field(10_000, ge=10)  # model queries per example, all phases together
    steps: int = Field(100, ge=1)  # iterations at most (the query budget usually ends first)
    init_evals: int = Field(100, ge=1)  # probes of the first gradient estimate
    max_evals: int = Field(1000, ge=1)  # probes of a gradient estimate at most
    gamma: float = Field(1.0, gt=0)  # binary-search precision: theta = gamma / d^1.5 (L2), / d^2
    init_tries: int = Field(100, ge=1)  # random uniform images tried per start
    starts: int = Field(5, ge=1)  # random starts, each searched to the boundary; the closest wins
    max_halvings: int = Field(25, ge=1)  # of the step size, per step search
    query_batch: int = Field(32_768, ge=1)  # images per model call (memory, not results)


@dataclass
class _State:
    """The batch's flattened inputs, labels, points and per-example budgets."""

    model: nn.Module
    x: Tensor  # (B, D)
    y: Tensor
    shape: tuple[int, ...]
    norm: str
    theta: float
    cap: int  # max_queries
    batch: int
    point: Tensor  # (B, D) the current adversarial point
    queries: Tensor  # (B,) int64
    best: Tensor  # (B, D) the closest adversarial boundary point so far
    best_dist: Tensor  # (B,) its distance (inf: none)

    def adversarial(self, z: Tensor, rows: Tensor) -> Tensor:
        """(n,) bool for images z (n, D) of examples `rows`; one query each."""
        out = []
        # a model may offer its argmax directly, faster (advlab.families.decision.RBFDecision)
        labels = getattr(self.model, "argmax_labels", None)
        with torch.no_grad():
            for start in range(0, len(z), self.batch):
                part = z[start : start + self.batch].view(-1, *self.shape)
                out.append(labels(part) if callable(labels) else self.model(part).argmax(1))
        pred = torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=z.device)
        self.queries.index_add_(0, rows, torch.ones_like(rows))
        return pred != self.y[rows]

    def distance(self, d: Tensor) -> Tensor:
        return d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)

    def keep_best(self, rows: Tensor) -> None:
        dist = self.distance(self.point[rows] - self.x[rows])
        better = dist < self.best_dist[rows]
        self.best_dist[rows] = torch.where(better, dist, self.best_dist[rows])
        self.best[rows] = torch.where(better[:, None], self.point[rows], self.best[rows])


def hopskipjump(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Any = None,
    settings: HopSkipJumpSettings | None = None,
    *,
    norm: str = "l2",
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> AttackResult:
    """Untargeted HopSkipJump minimising `norm` ("l2" or "linf"); see the module docstring."""
    s = merged_settings(HopSkipJumpSettings, settings, overrides, "hopskipjump")
    check_norm(norm)
    x, y, _, _ = prepare(model, x, y, target, num_classes=num_classes, generator=generator,
                         default="untargeted", allowed=("untargeted",))  # fmt: skip
    gens = example_generators(x, generator)
    flat = x.flatten(1)
    d = flat.shape[1]
    theta = s.gamma / (d * math.sqrt(d)) if norm == "l2" else s.gamma / (d * d)
    state = _State(model, flat, y, tuple(x.shape[1:]), norm, theta, s.max_queries,
                   s.query_batch, flat.clone(), torch.zeros(len(x), dtype=torch.int64,
                   device=x.device), flat.clone(), torch.full((len(x),), math.inf,
                   dtype=flat.dtype, device=x.device))  # fmt: skip
    with eval_mode(model):
        every = torch.arange(len(x), device=x.device)
        already = state.adversarial(flat, every)  # misclassified as given: distance 0
        state.best_dist[already] = 0.0
        started = torch.zeros_like(already)
        for _ in range(s.starts):  # the closest of several random starts' boundary points
            found = _random_start(state, gens, s, ~already)
            rows = found.nonzero().flatten()
            _binary_search(state, rows)
            state.keep_best(rows)
            started |= found
        state.point[started] = state.best[started]
        _iterate(state, gens, s, started)
        found = torch.isfinite(state.best_dist)
        x_adv = torch.where(found[:, None], state.best, flat).view_as(x)
        return finish(model, x_adv, y, None, state.queries)


def _reserve(state: _State, s: HopSkipJumpSettings) -> int:
    """Queries an iteration needs besides its probes: one binary search and one step search."""
    return _search_steps(state.theta) + s.max_halvings + 2


def _search_steps(theta: float) -> int:
    return math.ceil(math.log2(1.0 / theta)) + 1


def _random_start(
    state: _State, gens: list[torch.Generator], s: HopSkipJumpSettings, todo: Tensor
) -> Tensor:
    """(B,) bool: examples of `todo` for which a uniform random image is misclassified (it
    becomes the point); each example tries until it finds one, `init_tries` times at most."""
    found = torch.zeros(len(state.x), dtype=torch.bool, device=state.x.device)
    for _ in range(s.init_tries):
        budget = state.queries + _reserve(state, s) < state.cap
        rows = (todo & ~found & budget).nonzero().flatten()
        if not len(rows):
            break
        draws = torch.stack([torch.rand(state.x.shape[1], generator=gens[int(i)]) for i in rows])
        draws = draws.to(state.x)
        adv = state.adversarial(draws, rows)
        state.point[rows[adv]] = draws[adv]
        found[rows[adv]] = True
    return found


def _blend(x: Tensor, point: Tensor, a: Tensor, norm: str) -> Tensor:
    """L2: the segment x + a (point - x); Linf: point projected onto the ball of radius a."""
    if norm == "l2":
        return x + a[:, None] * (point - x)
    return torch.minimum(torch.maximum(point, x - a[:, None]), x + a[:, None])


def _binary_search(state: _State, rows: Tensor) -> None:
    """Move the points of `rows` onto the boundary between each input and its point."""
    if not len(rows):
        return
    x, point = state.x[rows], state.point[rows]
    if state.norm == "l2":
        high = torch.ones(len(rows), dtype=x.dtype, device=x.device)
        threshold = torch.full_like(high, state.theta)
    else:
        high = (point - x).abs().amax(1)
        threshold = torch.minimum(high * state.theta, torch.full_like(high, state.theta))
    low = torch.zeros_like(high)
    for _ in range(_search_steps(state.theta)):
        open_ = (high - low > threshold).nonzero().flatten()
        if not len(open_):
            break
        mid = (high[open_] + low[open_]) / 2
        z = _blend(x[open_], point[open_], mid, state.norm)
        adv = state.adversarial(z, rows[open_])
        high[open_] = torch.where(adv, mid, high[open_])
        low[open_] = torch.where(adv, low[open_], mid)
    state.point[rows] = _blend(x, point, high, state.norm)


def _iterate(
    state: _State, gens: list[torch.Generator], s: HopSkipJumpSettings, started: Tensor
) -> None:
    """The HopSkipJump iterations, each example until its steps or its queries run out."""
    d = state.x.shape[1]
    for t in range(1, s.steps + 1):
        left = state.cap - state.queries - _reserve(state, s)
        rows = (started & (left >= 2)).nonzero().flatten()
        if not len(rows):
            return
        dist = state.distance(state.point[rows] - state.x[rows])
        scale = math.sqrt(d) if state.norm == "l2" else d
        delta = torch.full_like(dist, 0.1) if t == 1 else scale * state.theta * dist
        wanted = min(int(s.init_evals * math.sqrt(t)), s.max_evals)
        probes = left[rows].clamp(max=wanted)
        direction = _gradient_estimate(state, gens, rows, delta, probes)
        if state.norm == "linf":
            direction = direction.sign()
        _step_search(state, rows, direction, dist / math.sqrt(t), s.max_halvings)
        _binary_search(state, rows)
        state.keep_best(rows)


def _gradient_estimate(
    state: _State, gens: list[torch.Generator], rows: Tensor, delta: Tensor, probes: Tensor
) -> Tensor:
    """(n, D) unit estimates of the boundary's normal at the points of `rows` (pointing into
    the adversarial side): sign-weighted means of random unit probes of radius delta."""
    counts = probes.tolist()
    parts = [
        _probe_sums(state, gens, rows[g], delta[g], counts[g.start])
        for g in _probe_groups(counts, state.x.shape[1], state.x.device)
    ]
    grad = torch.cat(parts)
    return grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _probe_groups(counts: list[int], d: int, device: torch.device) -> list[slice]:
    """Runs of consecutive examples with the same count of probes (examples short of queries
    have fewer) and, on a CPU, at most PROBE_PIXELS probe pixels together (one example at
    least): their probes then stay in cache through the model's call and the sums."""
    limit = max(1, PROBE_PIXELS // d) if device.type == "cpu" else math.inf
    groups, start, total = [], 0, 0
    for i, k in enumerate(counts):
        if i > start and (k != counts[start] or total + k > limit):
            groups.append(slice(start, i))
            start, total = i, 0
        total += k
    groups.append(slice(start, len(counts)))
    return groups


def _probe_sums(
    state: _State, gens: list[torch.Generator], rows: Tensor, delta: Tensor, k: int
) -> Tensor:
    """(n, D) unnormalised estimates for `rows`, k probes each (see _gradient_estimate)."""
    n, d = len(rows), state.x.shape[1]
    z = torch.empty(n, k, d)
    for j, i in enumerate(rows.tolist()):  # each example's probes from its own stream
        torch.randn(k, d, generator=gens[i], out=z[j])
    z = z.to(state.x)
    point = state.point[rows]
    # z = point + delta * u / |u|, clipped to the box, in place: the probes are most of the
    # attack's memory traffic, so each is written once and read by the model and one product
    z.mul_(delta[:, None, None] / z.norm(dim=2, keepdim=True).clamp_min(1e-12))
    z.add_(point[:, None]).clamp_(0.0, 1.0)
    adv = state.adversarial(z.view(n * k, d), rows.repeat_interleave(k))
    sign = adv.view(n, k).to(z.dtype) * 2 - 1
    # per example: the signs less their mean (a baseline), unless all fell on one side. The
    # estimate sum_i w_i (z_i - point) / delta (the probes the box let through) is normalised,
    # so it is sum_i w_i z_i - (sum_i w_i) point
    mean = sign.mean(1)
    weight = sign - torch.where(mean.abs() == 1, torch.zeros_like(mean), mean)[:, None]
    return torch.bmm(weight[:, None], z).squeeze(1) - weight.sum(1, keepdim=True) * point


def _step_search(
    state: _State, rows: Tensor, direction: Tensor, eps: Tensor, halvings: int
) -> None:
    """From each point, along its direction, the longest of eps, eps/2, ... that stays
    adversarial; a row that finds none keeps its point."""
    todo = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    for _ in range(halvings):
        open_ = todo.nonzero().flatten()
        if not len(open_):
            return
        z = (state.point[rows[open_]] + eps[open_, None] * direction[open_]).clamp(0.0, 1.0)
        adv = state.adversarial(z, rows[open_])
        state.point[rows[open_[adv]]] = z[adv]
        todo[open_[adv]] = False
        eps[open_] = eps[open_] / 2
