"""The paper's noise controls: the Gaussian noise attack, noise added to a batch, perturbations
rescaled to an rms, matched noise."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attack_contract as _assert_contract
from torch import Tensor, nn

from advlab.attacks.noise import add_noise, amplify, gaussian_noise, matched_noise
from advlab.measure import distortions


def test_gaussian_noise_is_a_weak_control_with_the_given_spread(
    mlp: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits[0][1000:1100], digits[1][1000:1100]
    result = gaussian_noise(mlp, x, y, 0.1, generator=torch.Generator().manual_seed(0))
    _assert_contract(mlp, x, y, result)
    assert (result.target == -1).all() and (result.grad_evals == 0).all()
    rms = distortions(x, result.x_adv)["rms"]
    # Clipping at 0 and 1 only removes noise: rms <= 0.1 on average, and not much less here.
    assert 0.05 < rms.mean() < 0.1
    again = gaussian_noise(mlp, x, y, 0.1, generator=torch.Generator().manual_seed(0))
    other = gaussian_noise(mlp, x, y, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.x_adv, result.x_adv) and not torch.equal(other.x_adv, result.x_adv)
    # The paper's point: at a similar distortion DeepFool fools every example, noise few.
    assert result.success.float().mean() < 0.3


def test_amplify_reaches_the_requested_rms_inside_the_box() -> None:
    torch.manual_seed(0)
    clean = torch.rand(50, 64)
    adversarial = (clean + 0.02 * torch.randn(50, 64)).clamp(0, 1)
    for rms in (0.05, 0.1, 0.2):
        out = amplify(clean, adversarial, rms)
        assert out.min() >= 0 and out.max() <= 1
        achieved = (out - clean).pow(2).mean(1).sqrt()
        torch.testing.assert_close(achieved, torch.full((50,), rms), rtol=1e-4, atol=1e-5)
        if rms == 0.05:  # little clipping: the direction of each perturbation is kept
            cosine = torch.nn.functional.cosine_similarity(out - clean, adversarial - clean)
            assert (cosine > 0.95).all()


def test_amplify_saturates_when_the_box_forbids_the_rms() -> None:
    clean = torch.zeros(1, 4)
    adversarial = torch.tensor([[0.01, 0.0, 0.0, 0.0]])  # one pixel can move to 1 at most
    out = amplify(clean, adversarial, rms=0.9)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # rms 0.5, the most possible


def test_gaussian_noise_has_each_examples_stddev() -> None:
    clean = torch.full((2, 20000), 0.5)
    noisy = add_noise(clean, torch.tensor([0.05, 0.1]), torch.Generator().manual_seed(0))
    std = (noisy - clean).std(1)
    torch.testing.assert_close(std, torch.tensor([0.05, 0.1]), rtol=0.02, atol=0)


def test_matched_noise_has_each_perturbations_rms() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.full((5, 1, 6, 6), 0.5)
    scales = torch.tensor([0.0, 0.01, 0.02, 0.04, 0.05]).reshape(5, 1, 1, 1)
    adv = clean + scales * torch.randn(5, 1, 6, 6, generator=gen).sign()
    rms = distortions(clean, adv)["rms"]
    noise = matched_noise(clean, rms, torch.Generator().manual_seed(0))
    torch.testing.assert_close(distortions(clean, noise)["rms"], scales.flatten())
    assert not torch.equal(noise[1:] - clean[1:], adv[1:] - clean[1:])  # a different direction


def test_amplify_works_on_image_shaped_batches() -> None:
    torch.manual_seed(0)
    clean = torch.rand(4, 1, 5, 5)
    adversarial = (clean + 0.01 * torch.randn(4, 1, 5, 5)).clamp(0, 1)
    out = amplify(clean, adversarial, torch.tensor([0.02, 0.04, 0.06, 0.08]))
    assert out.shape == clean.shape
    torch.testing.assert_close(
        distortions(clean, out)["rms"], torch.tensor([0.02, 0.04, 0.06, 0.08]), rtol=1e-4, atol=1e-5
    )


def test_transfer_amplifies_perturbations_upward_only() -> None:
    # The paper's Table 4 magnifies distortions to a stddev; a perturbation already larger
    # keeps its size (shrinking it would make the "amplified" row transfer less).
    import numpy as np
    import pandas as pd
    from conftest import tiny_sweep

    from advlab.sources import attacked_split
    from advlab.sweepfile import parse_sweep
    from advlab.transfer import source_sets

    spec = parse_sweep(tiny_sweep(grid={})).trials[0]
    images, labels = attacked_split(spec.dataset, spec.attack_split)
    clean = images[:2].flatten(1).double()
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    small = (clean + 0.02 * delta).clamp(0, 1)
    large = (clean + 0.30 * delta).clamp(0, 1)
    x_adv = torch.stack([small[0], large[1]]).float()
    rms = (x_adv.double() - clean).pow(2).mean(1).sqrt()
    rows = pd.DataFrame({
        "attack": "a", "budget": np.nan, "example": [0, 1], "dataset_index": [0, 1],
        "x_adv": list(x_adv.numpy()), "label": labels[:2].numpy(), "success": True,
        "dist_rms": rms.numpy(),
    })  # fmt: skip
    from advlab.sweep_settings import TransferSpec

    settings = TransferSpec(noise=False, amplify_rms=[0.1])
    (adversarial, amplified) = source_sets("t", spec, rows, settings, gen)
    assert adversarial.kind == "adversarial" and amplified.kind == "amplified"
    got = (torch.from_numpy(amplified.x).double() - clean).pow(2).mean(1).sqrt()
    assert rms[0] < 0.1 < rms[1]
    assert got[0].item() == pytest.approx(0.1, rel=1e-4)  # enlarged to the target
    assert torch.allclose(torch.from_numpy(amplified.x[1]), x_adv[1], atol=1e-6)  # kept
