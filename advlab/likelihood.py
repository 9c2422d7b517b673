"""An explicit density model of images: a small Gaussian VAE and bounds on log p(x) in bits/dim.

The model (Kingma and Welling 2014): z ~ N(0, I) of `latent` units; x | z ~ N(g(z), diag(s(z)^2))
with a scale per pixel; q(z | x) = N(m(x), diag(v(x))). (g, log s) and (m, log v) are MLPs with
one `hidden` layer (ReLU), or linear maps when hidden = 0: then with log s constant (its weights
zero) the model is factor analysis (probabilistic PCA when every s is equal), whose log p(x) is
exact in closed form, and the bounds below are tight once q is the exact posterior (Lucas et al.
2019).

Two lower bounds on log p(x) from K samples z_k ~ q(z | x), w_k = p(x, z_k) / q(z_k | x):
the ELBO mean_k log w_k, and the importance-weighted bound log mean_k w_k (Burda et al. 2016),
which is tighter and tends to log p(x) as K grows.

Pixels are 256 levels (k / 255). Uniform dequantisation: a model is trained on, and every input
scored at, y = (255 x + u) / 256 with u ~ U[0, 1)^D, a point inside the level's cell
[k/256, (k+1)/256)^D, so for an image of levels, -E log2 p(y) / D + 8 bounds its discrete code
length per pixel from above (Theis et al. 2016). Inputs off the levels (adversarial, noisy) are
mapped the same way, so every row is a density under one model at comparable points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LEVELS = 256
# log s is clipped here for numerical safety: the smallest s a pixel's dequantised values allow
# is the width of its cell over sqrt(12), log(1 / (256 sqrt 12)) = -6.8, well inside.
LOG_SCALE = (-9.0, 2.0)
_LOG_2PI = math.log(2 * math.pi)


def dequantize(x: Tensor, generator: torch.Generator) -> Tensor:
    """y = ((LEVELS - 1) x + u) / LEVELS, u ~ U[0, 1) drawn on the CPU (same on any device)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return ((LEVELS - 1) * x + u) / LEVELS


def bits_per_dim(log_density: Tensor, dims: int) -> Tensor:
    """-log p(y) / (D ln 2) + log2(LEVELS): the bits per pixel of the level holding y."""
    return -log_density / (dims * math.log(2)) + math.log2(LEVELS)


def _gaussian_log_pdf(x: Tensor, mean: Tensor, log_sd: Tensor) -> Tensor:
    """Sum over the last axis of log N(x; mean, exp(log_sd)^2)."""
    return (-0.5 * ((x - mean) / log_sd.exp()).pow(2) - log_sd - 0.5 * _LOG_2PI).sum(-1)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(inputs, outputs)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class DensityVAE(nn.Module):
    """A Gaussian VAE over flattened inputs of `dims` values (see the module docstring)."""

    def __init__(self, dims: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.dims, self.latent = dims, latent
        self.encoder = _mlp(dims, hidden, 2 * latent)  # mean and log variance of q(z | x)
        self.decoder = _mlp(latent, hidden, 2 * dims)  # mean and log scale of p(x | z)
        last = self.decoder if isinstance(self.decoder, nn.Linear) else self.decoder[-1]
        with torch.no_grad():
            last.bias[dims:] = -2.0  # scales start near 0.1 of the [0, 1] range, not 1

    def posterior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log standard deviation) of q(z | y), each (B, latent)."""
        mean, log_var = self.encoder(y.flatten(1)).chunk(2, dim=-1)
        return mean, 0.5 * log_var

    def log_weights(self, y: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """(K, B) log p(y, z_k) - log q(z_k | y) for K samples z_k ~ q(z | y)."""
        flat = y.flatten(1)
        mean, log_sd = self.posterior(flat)
        noise = torch.randn((samples, *mean.shape), generator=generator, dtype=mean.dtype)
        z = mean + log_sd.exp() * noise.to(mean.device)
        mean_x, log_scale = self.decoder(z).chunk(2, dim=-1)
        log_px = _gaussian_log_pdf(flat, mean_x, log_scale.clamp(*LOG_SCALE))
        log_pz = _gaussian_log_pdf(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = _gaussian_log_pdf(z, mean, log_sd)
        return log_px + log_pz - log_qz

    def exact_log_density(self, y: Tensor) -> Tensor:
        """(B,) log p(y) in closed form for a linear decoder (hidden = 0) whose scales do not
        depend on z: y ~ N(b, W W^T + diag(s^2))."""
        linear = self.decoder
        if not isinstance(linear, nn.Linear) or bool(linear.weight[self.dims :].any()):
            raise ValueError("exact_log_density: only a linear decoder with fixed scales has one")
        w, b = linear.weight[: self.dims], linear.bias[: self.dims]
        scale = linear.bias[self.dims :].clamp(*LOG_SCALE).exp()
        cov = w @ w.T + torch.diag(scale.pow(2))
        return torch.distributions.MultivariateNormal(b, cov).log_prob(y.flatten(1))


@dataclass(frozen=True)
class Bounds:
    elbo: Tensor  # (B,) mean_k log w_k
    iwae: Tensor  # (B,) log mean_k w_k


@torch.no_grad()
def bounds(
    model: DensityVAE, y: Tensor, samples: int, generator: torch.Generator, chunk: int = 256
) -> Bounds:
    """Both lower bounds on log p(y) per example, from `samples` importance samples each."""
    elbo, iwae = [], []
    for part in y.split(chunk):
        log_w = model.log_weights(part, samples, generator)
        elbo.append(log_w.mean(0))
        iwae.append(log_w.logsumexp(0) - math.log(samples))
    if not elbo:
        empty = y.new_zeros(0)
        return Bounds(empty, empty)
    return Bounds(torch.cat(elbo), torch.cat(iwae))


def train_density(
    model: DensityVAE,
    data: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    dequantized: bool = True,
) -> list[float]:
    """Maximise the one-sample ELBO with Adam; returns the mean negative ELBO (nats per example)
    per epoch. With `dequantized`, data are levels in [0, 1], jittered afresh every epoch;
    without, they are used as they are (continuous data)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        y = dequantize(data, generator) if dequantized else data
        order = torch.randperm(len(y), generator=generator).to(y.device)
        total = 0.0
        for idx in order.split(batch_size):
            loss = -model.log_weights(y[idx], 1, generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    model.eval()
    return losses


def fit_density(
    x_train: Tensor, *, latent: int, hidden: int, epochs: int, batch_size: int, lr: float, seed: int
) -> DensityVAE:
    """A DensityVAE fitted to images of levels in [0, 1]; the seed fixes weights and order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DensityVAE(int(x_train[0].numel()), latent, hidden).to(x_train.device)
    generator = torch.Generator().manual_seed(seed)
    train_density(
        model, x_train.flatten(1), epochs=epochs, batch_size=batch_size, lr=lr, generator=generator
    )
    return model
