"""The attack contract, for every registered attack (tests/attack_cases.py): the box, shapes and
recomputed success, batch independence, determinism, the model left untouched, misclassified
inputs left alone, zero budgets, target modes and argument checks; and the shared helpers of
advlab/attacks/base.py."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from attack_cases import (
    ALL_CASES,
    FIXED_BUDGET_CASES,
    MINIMIZATION_CASES,
    Case,
    RowByRow,
    wrong_targets,
)
from conftest import assert_attack_contract as _assert_contract
from conftest import l2_distance as _l2
from conftest import predict_labels as _predict
from torch import Tensor, nn

from advlab.attacks import (
    AttackError,
    alma,
    carlini_wagner,
    check_inputs,
    ddn,
    deepfool,
    fgsm,
    fmn,
    gaussian_noise,
    lbfgs_attack,
    pgd,
    random_wrong_targets,
    shrink_toward_input,
)
from advlab.measure import distortions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = [case.label for case in ALL_CASES]
RESULT_FIELDS = ("x_adv", "success", "adv_pred", "target", "grad_evals")


def _targets(y: Tensor, seed: int = 4) -> Tensor:
    return wrong_targets(y, seed)


# ----------------------------------------------------------------------------- shared helpers


def test_random_wrong_targets_never_hit_the_label_and_repeat_with_the_seed() -> None:
    y = torch.arange(10).repeat(50)
    t1 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    t2 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    t3 = random_wrong_targets(y, 10, torch.Generator().manual_seed(6))
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)
    assert not (t1 == y).any()
    assert t1.min() >= 0 and t1.max() <= 9
    # Every wrong class is reachable from every label (500 draws, 9 options each).
    assert all(len(set(t1[y == k].tolist())) >= 7 for k in range(10))


@pytest.mark.parametrize(
    ("x", "y", "target", "match"),
    [
        (torch.full((2, 1, 2, 2), 1.5), torch.tensor([0, 1]), None, "x: pixels must lie in"),
        (torch.full((2, 1, 2, 2), -0.1), torch.tensor([0, 1]), None, "x: pixels must lie in"),
        (torch.full((2, 1, 2, 2), torch.nan), torch.tensor([0, 1]), None, "x: contains NaN"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0.0, 1.0]), None, "y: expected an integer"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1, 2]), None, "y: expected shape"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.tensor([1, 1]), "target: equals"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.tensor([1]), "target: expected"),
    ],
)
def test_check_inputs_rejects(x: Tensor, y: Tensor, target: Tensor | None, match: str) -> None:
    with pytest.raises(AttackError, match=match):
        check_inputs(x, y, target)


def test_shrink_toward_input_keeps_success_and_never_grows(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1010], digits[1][1000:1010]
    far = fgsm(mlp, x, y, 0.5)
    shrunk = shrink_toward_input(mlp, x, far.x_adv, y, None, steps=20)
    with torch.no_grad():
        still = mlp(shrunk).argmax(1) != y
    assert torch.equal(still, far.success)
    assert (distortions(x, shrunk)["l2"] <= distortions(x, far.x_adv)["l2"] + 1e-6).all()
    assert (
        distortions(x, shrunk)["l2"][far.success] < distortions(x, far.x_adv)["l2"][far.success]
    ).all()
    assert shrunk.min() >= 0 and shrunk.max() <= 1


# ----------------------------------------------------------------------------- every attack


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_every_attack_keeps_the_contract(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    x, y = digits[0][1000:1012], digits[1][1000:1012]
    result = case.run(mlp, x, y, _targets(y), torch.Generator().manual_seed(0))
    _assert_contract(mlp, x, y, result)
    norm = case.norm or case.defn.default_norm
    if not case.minimization and norm in ("linf", "l2"):  # noise's budget is a stddev
        assert case.eps is not None
        assert (distortions(x, result.x_adv)[norm] <= case.eps * (1 + 1e-5) + 1e-6).all()
    if case.target == "tensor":
        assert torch.equal(result.target, _targets(y))
    if case.minimization:
        assert result.success.all(), case.label  # minimisation attacks reach every goal here
        # ... and an unsuccessful example would return x itself.


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_every_attack_is_batch_consistent(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # Row i of a batch equals the attack on x[i:i+1] alone, with explicit targets and seeded
    # generators (random starts and noise are keyed on each example's pixels, not its position).
    # Every attack but L-BFGS agrees to float round-off. L-BFGS's line-search and c-search
    # decisions are thresholds that a 1e-7 difference between batch sizes' matmuls can flip
    # (in float64 its CE runs agree to 1e-12), after which it stops at another point within its
    # tolerances: distances agree to ~0.5%, single pixels to a few hundredths (up to 0.055
    # measured with the margin loss's 10-iteration solves).
    x, y = digits[0][1100:1105], digits[1][1100:1105]
    target = _targets(y)
    batch = case.run(mlp, x, y, target, torch.Generator().manual_seed(7))
    d_batch = _l2(x, batch)
    # FMN's eps shrinks or grows on a threshold test too (adversarial by the margin or not),
    # so a round-off flip moves its result slightly: pixels by ~1e-4, distances by ~1e-4.
    # ALMA's momentum and RMSProp scaling carry a round-off difference forward from step to
    # step (~1e-5 after 60 steps; with the model evaluated row by row, rows agree exactly:
    # test_minimum_norm_attacks.py).
    loose = case.attack == "lbfgs"
    slack = case.attack in ("fmn", "fmn_linf", "alma")
    for i in range(len(x)):
        sl = slice(i, i + 1)
        alone = case.run(mlp, x[sl], y[sl], target[sl], torch.Generator().manual_seed(7))
        assert alone.success[0] == batch.success[i], (case.label, i)
        assert alone.target[0] == batch.target[i]
        assert alone.grad_evals[0] == batch.grad_evals[i] or loose
        atol = 1e-1 if loose else 1e-3 if slack else 1e-5
        torch.testing.assert_close(alone.x_adv[0], batch.x_adv[i], atol=atol, rtol=0)
        rtol = 1e-2 if loose else 1e-3 if slack else 1e-5
        torch.testing.assert_close(_l2(x[sl], alone)[0], d_batch[i], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_no_attack_lets_a_row_depend_on_its_batch_mates(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # The contract's "one example's result never depends on its batch-mates", exactly: with
    # the model evaluated row by row (RowByRow) the model's round-off is the same in any batch,
    # so a row alone and in the batch go through the same arithmetic unless the attack mixes
    # rows; the tolerances of the test above are the batched model's own round-off.
    model = RowByRow(mlp)
    x, y = digits[0][1100:1105], digits[1][1100:1105]
    target = _targets(y)
    batch = case.run(model, x, y, target, torch.Generator().manual_seed(7))
    for i in range(len(x)):
        sl = slice(i, i + 1)
        alone = case.run(model, x[sl], y[sl], target[sl], torch.Generator().manual_seed(7))
        for name in RESULT_FIELDS:
            assert torch.equal(getattr(alone, name)[0], getattr(batch, name)[i]), (name, i)


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_every_attack_repeats_with_the_same_seed(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # Seeds make runs deterministic on CPU: same inputs, same generator seed, same numbers. An
    # attack drawing from torch's global generator would differ here (it is moved in between).
    x, y = digits[0][1000:1006], digits[1][1000:1006]
    mode = "random" if "random" in case.defn.targets else None  # the generator draws targets
    first = case.run(mlp, x, y, y, torch.Generator().manual_seed(11), target=mode)
    torch.rand(7)
    again = case.run(mlp, x, y, y, torch.Generator().manual_seed(11), target=mode)
    for name in RESULT_FIELDS:
        assert torch.equal(getattr(first, name), getattr(again, name)), name


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_every_attack_leaves_the_model_untouched(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    before = [p.detach().clone() for p in mlp.parameters()]
    mlp.train()
    try:
        x, y = digits[0][:4], digits[1][:4]
        case.run(mlp, x, y, _targets(y), torch.Generator().manual_seed(0))
        assert mlp.training  # mode restored
        for p, p0 in zip(mlp.parameters(), before, strict=True):
            assert torch.equal(p, p0) and p.grad is None
    finally:
        mlp.eval()


@pytest.mark.parametrize("case", FIXED_BUDGET_CASES, ids=[c.label for c in FIXED_BUDGET_CASES])
def test_zero_budget_changes_nothing(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    x, y = digits[0][:20], digits[1][:20]
    result = case.run(mlp, x, y, (y + 1) % 10, torch.Generator().manual_seed(0), eps=0.0)
    assert torch.equal(result.x_adv, x)
    assert (result.grad_evals == 0).all()
    pred = _predict(mlp, x)
    expected = torch.where(result.target < 0, pred != y, pred == result.target)
    assert torch.equal(result.success, expected)


@pytest.mark.parametrize("case", MINIMIZATION_CASES, ids=[c.label for c in MINIMIZATION_CASES])
def test_minimisation_attacks_leave_misclassified_inputs_alone(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    x, y = digits[0][1000:], digits[1][1000:]
    wrong = (_predict(mlp, x) != y).nonzero().squeeze(1)[:3]
    assert len(wrong) > 0
    gen = torch.Generator().manual_seed(0)
    result = case.run(mlp, x[wrong], y[wrong], y[wrong], gen, target="untargeted")
    assert torch.equal(result.x_adv, x[wrong]) and result.success.all()
    if case.attack == "lbfgs":  # its search never starts for an input already adversarial
        assert (result.grad_evals == 0).all()


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_target_equal_to_label_and_inputs_outside_the_box_raise(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    x, y = digits[0][:2], digits[1][:2]
    gen = torch.Generator().manual_seed(0)
    targeted = "random" in case.defn.targets
    explicit = (y + 1) % 10 if targeted else None
    with pytest.raises(AttackError, match="x: pixels"):
        case.run(mlp, x * 255, y, explicit, gen, target=explicit)
    if not targeted:  # the noise control: untargeted only
        return
    with pytest.raises(AttackError, match="target: equals"):
        case.run(mlp, x, y, y.clone(), gen, target=y.clone())
    with pytest.raises(AttackError, match="out of range"):
        case.run(mlp, x, y, (y + 1) % 10 + 10, gen, target=(y + 1) % 10 + 10)


# ----------------------------------------------------------------------------- target modes


ALL_TARGET_CASES = [case for case in MINIMIZATION_CASES if "all" in case.defn.targets]


@pytest.mark.parametrize("case", ALL_TARGET_CASES, ids=[c.label for c in ALL_TARGET_CASES])
def test_all_targets_is_no_farther_than_any_single_target(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # "all" runs the targeted attack at every wrong class and keeps the closest success in the
    # attack's own norm, so it is never farther than any one of those targets alone.
    x, y = digits[0][1000:1006], digits[1][1000:1006]
    gen = torch.Generator().manual_seed(0)
    norm = "linf" if case.attack == "fmn_linf" else "l2"
    closest = case.run(mlp, x, y, y, gen, target="all")
    _assert_contract(mlp, x, y, closest)
    assert (closest.target == -1).all() and closest.success.all()
    d_closest = distortions(x, closest.x_adv)[norm]
    for offset in (1, 4, 7):
        single = case.run(mlp, x, y, y, gen, target=(y + offset) % 10)
        assert (d_closest <= distortions(x, single.x_adv)[norm] * (1 + 1e-3) + 1e-6).all()


TARGETED_CASES = [case for case in ALL_CASES if "random" in case.defn.targets]


@pytest.mark.parametrize("case", TARGETED_CASES, ids=[c.label for c in TARGETED_CASES])
def test_random_targets_come_from_the_generator_and_are_reached(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # "random" draws one wrong class per example from the generator before anything else, so
    # every attack that takes targets goes for the same classes under the same seed.
    x, y = digits[0][1000:1008], digits[1][1000:1008]
    result = case.run(mlp, x, y, y, torch.Generator().manual_seed(3), target="random")
    assert torch.equal(result.target, _targets(y, seed=3)) and not (result.target == y).any()
    if case.minimization:
        assert result.success.all()
    if case.attack == "lbfgs":  # L-BFGS keeps the paper's default: None means a random target
        by_default = case.run(mlp, x, y, y, torch.Generator().manual_seed(3), target=None)
        assert torch.equal(by_default.target, result.target)


# ----------------------------------------------------------------------------- bad arguments


def _x() -> tuple[Tensor, Tensor]:
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])


BAD_CALLS: list[tuple[str, Callable[[nn.Module], object], str]] = [
    ("fgsm eps<0", lambda m: fgsm(m, *_x(), -0.1), "eps"),
    ("fgsm eps nan", lambda m: fgsm(m, *_x(), float("nan")), "eps"),
    ("pgd eps<0", lambda m: pgd(m, *_x(), -1.0, norm="l2"), "eps"),
    ("pgd eps nan", lambda m: pgd(m, *_x(), float("nan")), "eps"),
    ("pgd norm", lambda m: pgd(m, *_x(), 0.1, norm="l1"), "norm"),
    ("pgd steps", lambda m: pgd(m, *_x(), 0.1, steps=0), "steps"),
    ("pgd restarts", lambda m: pgd(m, *_x(), 0.1, restarts=0), "restarts"),
    ("noise stddev<0", lambda m: gaussian_noise(m, *_x(), -0.1), "stddev"),
    ("noise stddev nan", lambda m: gaussian_noise(m, *_x(), float("nan")), "stddev"),
    ("deepfool overshoot", lambda m: deepfool(m, *_x(), overshoot=-1.0), "overshoot"),
    ("deepfool steps", lambda m: deepfool(m, *_x(), steps=0), "steps"),
    ("cw lr", lambda m: carlini_wagner(m, *_x(), lr=0.0), "lr"),
    ("cw kappa", lambda m: carlini_wagner(m, *_x(), kappa=float("nan")), "kappa"),
    ("lbfgs loss", lambda m: lbfgs_attack(m, *_x(), loss="hinge"), "loss"),
    ("lbfgs kappa", lambda m: lbfgs_attack(m, *_x(), kappa=-1.0), "kappa"),
    ("lbfgs candidates", lambda m: lbfgs_attack(m, *_x(), "all", candidates=0), "candidates"),
    ("target mode", lambda m: deepfool(m, *_x(), "nearest"), "target"),  # type: ignore[arg-type]
    ("target mode pgd", lambda m: pgd(m, *_x(), 0.1, target="any"), "target"),  # type: ignore[arg-type]
    ("ddn steps", lambda m: ddn(m, *_x(), steps=0), "steps"),
    ("ddn gamma", lambda m: ddn(m, *_x(), gamma=1.5), "gamma"),
    ("ddn init_norm", lambda m: ddn(m, *_x(), init_norm=0.0), "init_norm"),
    ("fmn norm", lambda m: fmn(m, *_x(), norm="l1"), "norm"),
    ("fmn alpha_init", lambda m: fmn(m, *_x(), alpha_init=float("nan")), "alpha_init"),
    ("fmn gamma_final", lambda m: fmn(m, *_x(), gamma_final=1.0), "gamma_final"),
    ("ddn target", lambda m: ddn(m, *_x(), torch.tensor([0, 1])), "target: equals"),
    ("fmn x", lambda m: fmn(m, _x()[0] * 3, _x()[1]), "x: pixels"),
    ("alma steps", lambda m: alma(m, *_x(), steps=0), "steps"),
    ("alma lr_reduction", lambda m: alma(m, *_x(), lr_reduction=2.0), "lr_reduction"),
    ("alma gamma", lambda m: alma(m, *_x(), gamma=0.5), "gamma"),
    ("alma rho", lambda m: alma(m, *_x(), rho=1.0), "^rho: not a setting of alma"),
    ("alma check_steps", lambda m: alma(m, *_x(), check_steps=float("inf")), "check_steps"),
    ("alma steps 2.5", lambda m: alma(m, *_x(), steps=2.5), "steps"),
]


@pytest.mark.parametrize(("name", "call", "match"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_arguments_raise(
    mlp: nn.Module, name: str, call: Callable[..., object], match: str
) -> None:
    with pytest.raises(AttackError, match=match) as info:
        call(mlp)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- model and device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_every_attack_runs_on_cuda_and_matches_cpu(
    mlp: nn.Module, digits: tuple[Tensor, Tensor], case: Case
) -> None:
    # Device follows the model: CPU inputs, a CUDA model -> CUDA results, same answers.
    x, y = digits[0][1000:1006], digits[1][1000:1006]
    target = _targets(y)
    gpu = copy.deepcopy(mlp).to("cuda").eval()
    on_cpu = case.run(mlp, x, y, target, torch.Generator().manual_seed(7))
    on_gpu = case.run(gpu, x, y, target, torch.Generator().manual_seed(7))
    assert on_gpu.x_adv.device.type == "cuda", case.label
    for name in ("success", "adv_pred", "target", "grad_evals"):
        assert getattr(on_gpu, name).device.type == "cuda", (case.label, name)
    assert (on_gpu.success.cpu() == on_cpu.success).float().mean() >= 0.8, case.label
    torch.testing.assert_close(
        _l2(x, on_cpu).mean(), _l2(x.cuda(), on_gpu).mean().cpu(), rtol=0.05, atol=1e-3
    )
