"""Chunked model evaluation (advlab.runtime): how many rows a chunk holds, and that attacks run
in chunks end where whole-batch runs do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from attack_cases import RowByRow
from conftest import fit as _fit
from conftest import l2_distance as _l2
from conftest import predict_labels as _predict
from torch import Tensor, nn

from advlab.attacks import alma, ddn, fmn, lbfgs_attack, pgd
from advlab.attacks.lbfgs import PenaltyObjective, lbfgs_settings
from advlab.runtime import rows_per_grad_chunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_per_grad_chunk_counts_the_state_one_row_saves() -> None:
    # A linear layer saves its input (D floats per row) to form the weight's gradient; the
    # weight it saves is shared by all rows, so the two-row minus one-row difference is 4 D.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(1, 1, 8, 8)
    assert rows_per_grad_chunk(model, x, budget=4 * 64 * 10) == 10
    assert rows_per_grad_chunk(model, x, budget=1) == 1
    with torch.no_grad():  # the count does not depend on the caller's grad mode
        assert rows_per_grad_chunk(model, x, budget=4 * 64 * 10) == 10
    # A conv layer's activations grow with the row: 8 channels save far more than 2.
    wide, narrow = (
        nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * 64, 10))
        for c in (8, 2)
    )
    assert rows_per_grad_chunk(wide, x, budget=2**20) < rows_per_grad_chunk(narrow, x, budget=2**20)


@pytest.fixture(scope="module")
def small_conv(digits: tuple[Tensor, Tensor]) -> nn.Module:
    """A small conv net fitted once for the chunked-evaluation tests."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )
    return _fit(model, digits[0][:1000], digits[1][:1000], steps=100, lr=1e-2)


def test_chunked_evaluation_changes_nothing_but_round_off(
    digits: tuple[Tensor, Tensor], small_conv: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_conv
    x = digits[0][1200:1208]
    y = _predict(model, x)
    target = (y + 1) % 10
    whole = lbfgs_attack(model, x, y, target, loss="margin")
    # The objective evaluated 3 rows at a time gives the same values and gradients: exactly,
    # with the net evaluated row by row (RowByRow), since then chunking changes no arithmetic.
    # (Batched, the conv's backward sums in a batch-size-dependent order: gradients ~1e3 came
    # out up to 1.2e-4 = 1.7 u |J|^T|v| apart under the default, AVX2 and AVX-512 kernels.)
    settings = lbfgs_settings(None, {"loss": "margin"})
    rowwise = RowByRow(model)
    objective = PenaltyObjective(rowwise, x.flatten(1), y, target, (1, 8, 8), settings)
    assert objective.chunk >= len(x)  # this small net is never chunked at the default budget
    objective.c.fill_(0.5)
    z, rows = (x.flatten(1) + 0.1).clamp(0, 1), torch.arange(len(x))
    f_whole, g_whole = objective(z, rows)
    objective.chunk = 3
    f_parts, g_parts = objective(z, rows)
    assert torch.equal(f_parts, f_whole) and torch.equal(g_parts, g_whole)
    # ... and a whole attack run in chunks of 3 rows ends where the unchunked run does (up to
    # the round-off flips test_every_attack_is_batch_consistent allows).
    monkeypatch.setattr("advlab.runtime.GRAD_CHUNK_BYTES", 1)
    chunked = lbfgs_attack(model, x, y, target, loss="margin")
    assert torch.equal(chunked.success, whole.success) and bool(whole.success.all())
    torch.testing.assert_close(_l2(x, chunked), _l2(x, whole), rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y, t: ddn(m, x, y, t, steps=40),
        lambda m, x, y, t: fmn(m, x, y, t, steps=40),
        lambda m, x, y, t: fmn(m, x, y, None, norm="linf", steps=40),
        lambda m, x, y, t: pgd(m, x, y, 1.5, norm="l2", steps=10, restarts=2, target=t),
        lambda m, x, y, t: alma(m, x, y, t, steps=40),
    ],
    ids=["ddn", "fmn-l2", "fmn-linf", "pgd", "alma"],
)
def test_gradient_attacks_run_in_chunks_end_where_whole_runs_do(
    digits: tuple[Tensor, Tensor],
    small_conv: nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    attack: Callable[..., Any],
) -> None:
    # One row per chunk (the smallest budget) against the whole batch at once: the same
    # successes, the same points up to round-off.
    model = small_conv
    x = digits[0][1200:1210]
    y = _predict(model, x)
    whole = attack(model, x, y, (y + 1) % 10)
    monkeypatch.setattr("advlab.runtime.GRAD_CHUNK_BYTES", 1)
    chunked = attack(model, x, y, (y + 1) % 10)
    assert torch.equal(chunked.success, whole.success) and bool(whole.success.any())
    assert torch.equal(chunked.grad_evals, whole.grad_evals)
    torch.testing.assert_close(chunked.x_adv, whole.x_adv, rtol=0, atol=1e-4)


def test_predict_batches_hold_the_bytes_budget_and_change_no_label(
    digits: tuple[Tensor, Tensor], small_conv: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advlab import runtime

    x = digits[0][:300]
    whole = runtime.predict(small_conv, x, batch_size=len(x))
    # An FC model saves a few floats per row: its batches stay at PREDICT_BATCH.
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert runtime.predict_rows(linear, x) == runtime.PREDICT_BATCH
    # small_conv saves per row its input (64 floats), the conv's output (4 x 64, kept by the
    # ReLU) and the flattened activations (256): 576 floats, 2,304 bytes; a budget of 50 rows.
    monkeypatch.setattr(runtime, "PREDICT_BYTES", 50 * 4 * (64 + 256 + 256))
    monkeypatch.setattr(runtime, "_ROW_BYTES", runtime.weakref.WeakKeyDictionary())
    assert runtime.predict_rows(small_conv, x) == 50
    seen: list[int] = []
    hook = small_conv.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    try:
        assert torch.equal(runtime.predict(small_conv, x), whole)
    finally:
        hook.remove()
    assert seen == [50] * 6
