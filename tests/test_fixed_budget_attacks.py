"""FGSM and PGD (Linf and L2): closed forms, the eps-ball, targets, restarts and batching."""

from __future__ import annotations

import pytest
import torch
from attack_cases import wrong_targets as _targets
from conftest import assert_attack_contract as _assert_contract
from conftest import predict_labels as _predict
from torch import Tensor, nn

from advlab.attacks import AttackError, fgsm, pgd
from advlab.measure import distortions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fgsm_invariants(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][1000:1050], digits[1][1000:1050]
    result = fgsm(mlp, x, y, eps=0.1)
    _assert_contract(mlp, x, y, result)
    assert (distortions(x, result.x_adv)["linf"] <= 0.1 + 1e-6).all()
    assert (result.target == -1).all() and (result.grad_evals == 1).all()
    assert result.success.float().mean() > 1 - (_predict(mlp, x) == y).float().mean()


def test_fgsm_matches_closed_form_on_a_linear_model() -> None:
    # Two classes, logits W x + b: grad_x CE(label 0) = (p1) (w1 - w0), so the step is
    # eps * sign(w1 - w0) wherever the pixel is not clipped.
    torch.manual_seed(1)
    lin = nn.Linear(4, 2)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([[[[0.0, 0.5, 1.0, 0.97]]]])
    y = torch.tensor([0])
    expected = (x.flatten() + 0.05 * (lin.weight[1] - lin.weight[0]).sign()).clamp(0, 1)
    result = fgsm(model, x, y, eps=0.05)
    torch.testing.assert_close(result.x_adv.flatten(), expected.detach())


def test_fgsm_eps_zero_is_the_identity(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:20], digits[1][:20]
    result = fgsm(mlp, x, y, eps=0.0)
    assert torch.equal(result.x_adv, x)
    assert torch.equal(result.success, _predict(mlp, x) != y)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_fgsm_rejects_bad_eps(mlp: nn.Module, digits: tuple[Tensor, Tensor], eps: float) -> None:
    with pytest.raises(AttackError, match="eps"):
        fgsm(mlp, digits[0][:2], digits[1][:2], eps=eps)


def test_fgsm_rejects_inputs_outside_the_box(mlp: nn.Module) -> None:
    with pytest.raises(AttackError, match="x: pixels must lie in"):
        fgsm(mlp, torch.full((2, 1, 8, 8), 2.0), torch.tensor([0, 1]), eps=0.1)


def test_fgsm_batch_consistency(mlp: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:12], digits[1][:12]
    batch = fgsm(mlp, x, y, eps=0.2)
    for i in range(len(x)):
        alone = fgsm(mlp, x[i : i + 1], y[i : i + 1], eps=0.2)
        torch.testing.assert_close(alone.x_adv[0], batch.x_adv[i])
        assert alone.success[0] == batch.success[i]


def test_pgd_stays_in_the_ball_and_beats_fgsm(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1050], digits[1][1000:1050]
    result = pgd(mlp, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    _assert_contract(mlp, x, y, result)
    assert (distortions(x, result.x_adv)["linf"] <= 0.1 + 1e-6).all()
    assert (result.grad_evals >= 1).all() and (result.grad_evals <= 20).all()
    assert result.success.sum() >= fgsm(mlp, x, y, eps=0.1).success.sum()
    again = pgd(mlp, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x_adv, result.x_adv)


def test_targeted_pgd_reaches_the_target_and_beats_targeted_fgsm(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1040], digits[1][1000:1040]
    t = _targets(y)
    p = pgd(mlp, x, y, 0.3, steps=20, target=t, generator=torch.Generator().manual_seed(0))
    f = fgsm(mlp, x, y, 0.3, target=t)
    _assert_contract(mlp, x, y, p)
    assert torch.equal(p.target, t) and torch.equal(f.target, t)
    assert p.success.sum() >= f.success.sum() and p.success.float().mean() > 0.5


def test_pgd_l2_random_start_lies_in_the_ball_and_restarts_only_help(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1040], digits[1][1000:1040]
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    one_step = pgd(mlp, x, y, 0.4, norm="l2", steps=1, step_size=0.0, generator=gen())
    d = distortions(x, one_step.x_adv)
    assert (d["l2"] <= 0.4 + 1e-5).all() and (d["l2"] > 0).all()  # moved, but only inside
    once = pgd(mlp, x, y, 0.4, norm="l2", steps=5, generator=gen())
    thrice = pgd(mlp, x, y, 0.4, norm="l2", steps=5, restarts=3, generator=gen())
    assert (thrice.success | ~once.success).all()  # the first restart is shared
    assert (thrice.grad_evals >= once.grad_evals).all()
    assert thrice.success.sum() >= once.success.sum()


def test_pgd_l2_beats_pgd_linf_at_the_same_l2_cost(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    # Sanity of the L2 step: with a budget of 1.0 in L2 it fools more than Linf PGD whose
    # ball (8x8 pixels, eps 0.125) has the same L2 radius.
    x, y = digits[0][1000:1060], digits[1][1000:1060]
    l2 = pgd(mlp, x, y, 1.0, norm="l2", steps=20, generator=torch.Generator().manual_seed(0))
    linf = pgd(mlp, x, y, 0.125, steps=20, generator=torch.Generator().manual_seed(0))
    assert (distortions(x, l2.x_adv)["l2"] <= 1.0 + 1e-5).all()
    assert l2.success.sum() >= linf.success.sum()
