"""The density model (advlab.likelihood): bounds against the exact log p(x) of probabilistic PCA,
bits per dimension and dequantisation by hand."""

from __future__ import annotations

import math

import pytest
import torch

from advlab.likelihood import DensityVAE, bits_per_dim, bounds, dequantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ppca(d: int = 5, latent: int = 2, sigma: float = 0.3) -> DensityVAE:
    """A linear VAE set by hand to a probabilistic PCA model (orthogonal W columns) and its
    exact posterior: M = W^T W + s^2 I is diagonal, q(z|x) = N(M^-1 W^T (x - b), s^2 M^-1)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, latent, generator=gen, dtype=torch.float64))
    w = q * torch.tensor([2.0, 0.7], dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    model = DensityVAE(d, latent, hidden=0).double()
    m = w.T @ w + sigma**2 * torch.eye(latent, dtype=torch.float64)
    assert torch.allclose(m, torch.diag(torch.diagonal(m)))
    with torch.no_grad():
        model.decoder.weight.copy_(torch.cat([w, torch.zeros_like(w)]))
        model.decoder.bias.copy_(torch.cat([b, torch.full_like(b, math.log(sigma))]))
        mean_map = torch.linalg.solve(m, w.T)
        model.encoder.weight.copy_(torch.cat([mean_map, torch.zeros_like(mean_map)]))
        log_var = torch.log(sigma**2 / torch.diagonal(m))
        model.encoder.bias.copy_(torch.cat([-mean_map @ b, log_var]))
    return model


def test_bounds_equal_exact_log_density_at_the_exact_posterior() -> None:
    model = _ppca()
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.exact_log_density(x)
    w, b = model.decoder.weight[:5], model.decoder.bias[:5]
    cov = w @ w.T + 0.09 * torch.eye(5, dtype=torch.float64)
    by_hand = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    torch.testing.assert_close(exact, by_hand)
    # Every importance weight equals p(x) when q is the posterior: no sampling error at all.
    found = bounds(model, x, samples=7, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(found.elbo, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(found.iwae, exact, rtol=0, atol=1e-10)


def test_bounds_are_below_log_density_and_iwae_is_tighter() -> None:
    """Away from the optimum the ELBO's gap is KL(q || p(z|x)), known in closed form here."""
    model = _ppca()
    with torch.no_grad():
        model.encoder.bias[2:] += 1.0  # posterior variances e times too large
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        exact = model.exact_log_density(x)
    few = bounds(model, x, samples=1000, generator=torch.Generator().manual_seed(3))
    # KL(q || p(z|x)) per latent unit for a variance ratio e: (e - 1 - 1) / 2 = 0.359 nats.
    gap = 2 * (math.e - 2) / 2
    assert float((exact - few.elbo).mean()) == pytest.approx(gap, rel=0.05)
    assert bool((few.elbo < exact).all()) and bool((few.iwae > few.elbo).all())
    # IWAE is below log p(x) in expectation, its bias about Var(w/p) / 2K = 0.67 / 2000 here,
    # under its sampling error: 3 standard errors of the mean over 40 points are 0.012 nats.
    assert -0.015 < float((exact - few.iwae).mean()) < 0.03


def test_bits_per_dim_and_dequantisation_by_hand() -> None:
    # A uniform density on [0, 1]^D (log p = 0) gives every level 1/256: 8 bits per pixel.
    assert float(bits_per_dim(torch.tensor(0.0), 784)) == 8.0
    # log p(y) = -D ln 2 means density 2^-D: one bit more.
    assert float(bits_per_dim(torch.tensor(-10 * math.log(2)), 10)) == pytest.approx(9.0)
    levels = torch.arange(256, dtype=torch.float64) / 255
    y = dequantize(levels.repeat(20), torch.Generator().manual_seed(0)).view(20, 256)
    k = torch.arange(256, dtype=torch.float64)
    assert bool((y >= k / 256).all()) and bool((y < (k + 1) / 256).all())  # inside its cell


def test_density_model_is_fitted_once_per_training_set_and_a_damaged_file_refits(
    tmp_path,
) -> None:
    from advlab.measures import likelihood as measure

    settings = measure.LikelihoodSettings(latent=2, hidden=0, epochs=1, max_train=30)
    x = torch.rand(40, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    first = measure.density_model(x, settings, seed=1, folder=str(tmp_path))
    (saved,) = tmp_path.glob("density-*.pt")
    measure._FITTED.clear()  # another worker: it reads the file instead of fitting again
    again = measure.density_model(x, settings, seed=1, folder=str(tmp_path))
    assert again is not first
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert measure.density_model(x, settings, seed=2, folder=str(tmp_path)) is not again
    assert len(list(tmp_path.glob("density-*.pt"))) == 2  # another seed: another model
    saved.write_bytes(b"truncated")
    measure._FITTED.clear()
    refit = measure.density_model(x, settings, seed=1, folder=str(tmp_path))
    for a, b in zip(first.state_dict().values(), refit.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same seed fits the same model
