"""Certified lower bounds on margins and certified radii by bound propagation (IBP, CROWN,
alpha-CROWN) for chains of Linear, Conv2d, pooling and ReLU/sigmoid/tanh layers.

    chain = compile_model(model, (1, 8, 8))           # once per model; BoundError if unsupported
    lb = margin_bounds(chain, x, y, eps, norm="linf", method="crown")   # (N, K), inf at y
    ok = certified(chain, x, y, eps)                  # (N,) bool
    r = certified_radius(chain, x, y, norm="l2", method="alpha-crown")  # r.lower, r.upper

Exact minima (closed forms for linear models, MILP/MIQP for small ReLU nets, each solve in a
worker process) live in advlab.bounds.exact, imported on demand: its solvers are heavy.
"""

from advlab.bounds.chain import compile_model
from advlab.bounds.layers import SUPPORTED, BoundError, Chain
from advlab.bounds.propagation import (
    ALPHA_LR,
    ALPHA_STEPS,
    METHODS,
    NORMS,
    certified,
    margin_bounds,
    margin_spec,
    spec_bounds,
)
from advlab.bounds.radius import CertifiedRadius, certified_radius, farthest_corner

__all__ = [
    "ALPHA_LR",
    "ALPHA_STEPS",
    "METHODS",
    "NORMS",
    "SUPPORTED",
    "BoundError",
    "CertifiedRadius",
    "Chain",
    "certified",
    "certified_radius",
    "compile_model",
    "farthest_corner",
    "margin_bounds",
    "margin_spec",
    "spec_bounds",
]
