"""Where a model runs and how it is asked for predictions: the one home of both.

Training, attacks, the trial and the transfer stage all predict through `predict`, so eval mode,
batching and device moves behave the same everywhere.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from advlab.measure import fraction

PREDICT_BATCH = 4096
# What one predict batch's rows may save for backward (rows x the per-row state autograd would
# keep: every activation of a forward, summed). Measured on RobustBench's PreActResNet-18 at
# 32x32 (6.8 MB per row): 4,096-row batches peaked at 7.0 GB, 128-row ones at 1.15 GB, in the
# same time; FC nets save a few kB per row and keep PREDICT_BATCH.
PREDICT_BYTES = 512 * 2**20
_ROW_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def pick_device(requested: str) -> torch.device:
    """`auto` is the GPU when one is visible; asking for cuda without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no GPU is visible; use device: auto or cpu")
    return torch.device(requested)


def model_device(model: nn.Module) -> torch.device:
    """The device the model lives on (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int | None = None) -> Tensor:
    """(N,) int64 predicted classes, in eval mode and in batches, on the model's device;
    batches of `predict_rows` rows unless `batch_size` is given."""
    device = model_device(model)
    if len(x) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    batch_size = batch_size or predict_rows(model, x)
    with eval_mode(model):
        parts = [
            model(x[i : i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts)


def predict_rows(model: nn.Module, x: Tensor) -> int:
    """Rows per predict batch of x: PREDICT_BYTES over the state one row saves, at most
    PREDICT_BATCH. Measured once per model and row shape: an architecture's activations do not
    change with its weights."""
    if len(x) <= 1:
        return PREDICT_BATCH
    shape = tuple(x.shape[1:])
    known = _ROW_BYTES.setdefault(model, {})
    if shape not in known:
        known[shape] = _row_bytes(model, x[:1].to(model_device(model)))
    return int(min(PREDICT_BATCH, max(1, PREDICT_BYTES // max(known[shape], 1))))


def error_rate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of x the model misclassifies; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    return fraction(predict(model, x) != y.to(model_device(model)))


# Bytes of autograd state per gradient evaluation chunk. On a conv net the activations saved
# for backward are rows x channels x H x W: at 1,800 rows the benchmark CNN's saved state is
# hundreds of MB, which leaves the caches and page-faults on every allocation, and 128-row
# chunks evaluate the same rows 1.8x faster. FC nets save a few kB per row: thousands per chunk.
GRAD_CHUNK_BYTES = 32 * 2**20


def rows_per_grad_chunk(model: nn.Module, example: Tensor, budget: int | None = None) -> int:
    """How many rows of `example`'s shape one input-gradient evaluation should take at most:
    `budget` bytes (GRAD_CHUNK_BYTES when None) over the autograd state one row saves.

    Measured, not guessed from the layer types: the bytes autograd saves for backward on two
    rows minus those on one (the weights it saves are shared, the activations are per row).
    """
    budget = GRAD_CHUNK_BYTES if budget is None else budget
    return max(1, budget // max(_row_bytes(model, example), 1))


def _row_bytes(model: nn.Module, example: Tensor) -> int:
    """The bytes autograd saves for backward on two rows of `example` minus those on one."""
    per_row = [_saved_bytes(model, example.expand(k, *example.shape[1:])) for k in (1, 2)]
    return per_row[1] - per_row[0]


def chunk_rows(model: nn.Module, x: Tensor) -> int:
    """rows_per_grad_chunk for a batch x (any length, empty included)."""
    return rows_per_grad_chunk(model, x[:1]) if len(x) else 1


def _saved_bytes(model: nn.Module, x: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    leaf = x.detach().clone().requires_grad_(True)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with eval_mode(model), torch.enable_grad(), hooks:  # under no_grad nothing would be saved
        model(leaf)
    return total


# A per-row objective for input_gradient: (leaf rows, their slice of the batch) ->
# (objective (B,) to differentiate, tensors (B, ...) to return alongside, detached).
RowObjective = Callable[[Tensor, slice], tuple[Tensor, tuple[Tensor, ...]]]


def input_gradient(
    objective: RowObjective, z: Tensor, chunk: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """d sum(objective) / dz per row, and the objective's other outputs, `chunk` rows at a time.

    Rows never interact (each row's objective depends on its own input), so the chunks give the
    whole batch's gradient up to round-off; `chunk` comes from rows_per_grad_chunk.
    """
    if len(z) <= chunk:
        return _gradient(objective, z, slice(0, len(z)))
    grad, parts = torch.empty_like(z), []
    for start in range(0, len(z), chunk):
        rows = slice(start, start + chunk)
        grad[rows], extra = _gradient(objective, z[rows], rows)
        parts.append(extra)
    return grad, tuple(torch.cat(column) for column in zip(*parts, strict=True))


def _gradient(objective: RowObjective, z: Tensor, rows: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
    leaf = z.detach().requires_grad_(True)  # z's storage, off the caller's graph
    value, extra = objective(leaf, rows)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return grad, tuple(t.detach() for t in extra)
