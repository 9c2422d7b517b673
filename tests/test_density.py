"""Density (advlab.measures.density): kNN and PCA distances against brute force, and the rows
of one attack run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advlab.measures.density import density_rows, knn_distance, pca_error

# Everything here is small; on a shared 2-core box, OpenMP threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_knn_distance_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    train, x = torch.rand(40, 1, 3, 3, generator=gen), torch.rand(11, 1, 3, 3, generator=gen)
    a, b = x.flatten(1).double().numpy(), train.flatten(1).double().numpy()
    dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    expected = np.sort(dist, axis=1)[:, :5].mean(axis=1)
    for chunk in (1024, 7, 3):  # chunks smaller than k too
        got = knn_distance(train, x, k=5, chunk=chunk).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(knn_distance(train, train[:3], k=1).abs().max()) < 1e-3  # itself is nearest


def test_pca_error_is_distance_to_training_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(50, 2, generator=gen) @ torch.eye(2, 6)  # training data in the x1-x2 plane
    inside = torch.tensor([[1.0, -2.0, 0, 0, 0, 0]])
    outside = torch.tensor([[1.0, -2.0, 3.0, 4.0, 0, 0]])
    errors = pca_error(plane, torch.cat([inside, outside]), components=2)
    assert errors.tolist() == pytest.approx([0.0, 5.0], abs=1e-6)


def test_density_rows_inputs_noise_and_determinism() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 4, 4, generator=gen)
    clean = 0.25 + 0.5 * torch.rand(8, 1, 4, 4, generator=gen)
    adversarial = {
        0.1: (clean + 0.1 * torch.randn(8, 1, 4, 4, generator=gen).sign()).clamp(0, 1),
        0.2: clean.clone(),  # a zero perturbation: its matched noise is zero too
    }
    rows = density_rows(train, clean, adversarial, attack="fgsm", k=3, seed=1)
    assert [(r["budget"], r["inputs"]) for r in rows] == [
        (None, "clean"), (0.1, "adversarial"), (0.1, "noise"), (0.2, "adversarial"),
        (0.2, "noise"),
    ]  # fmt: skip
    assert all(r["pca_error"] is None for r in rows)
    values = [r["knn_distance"] for r in rows]
    expected_clean = float(knn_distance(train, clean, k=3).mean())
    assert values[0] == pytest.approx(expected_clean)
    assert values[3] == values[4] == pytest.approx(expected_clean)
    assert values[2] != values[0]
    assert rows == density_rows(train, clean, adversarial, attack="fgsm", k=3, seed=1)
    # Each budget's noise is drawn on its own: a run without budget 0.2 changes no other row.
    alone = density_rows(train, clean, {0.1: adversarial[0.1]}, attack="fgsm", k=3, seed=1)
    assert alone == rows[:3]
    other = density_rows(train, clean, {0.1: adversarial[0.1]}, attack="pgd", k=3, seed=1)
    assert other[2]["knn_distance"] != rows[2]["knn_distance"]  # another attack: other noise
    with_pca = density_rows(train, clean, adversarial, attack="fgsm", k=3, seed=1,
                            pca_components=4)  # fmt: skip
    assert all(r["pca_error"] is not None and r["pca_error"] >= 0 for r in with_pca)
    with pytest.raises(ValueError, match="one per clean example"):
        density_rows(train, clean, {0.1: clean[:3]}, attack="bad")
