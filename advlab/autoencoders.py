"""Classifiers on unsupervised features: a softmax on the code of a one-hidden-layer autoencoder.

Four kinds, named like the paper's AE400-10 (advlab.models parses the names):

- ``ae<h>-<K>``: plain autoencoder, pretrained on mean squared reconstruction error;
- ``dae<h>-<K>``: denoising (Vincent et al. 2008): reconstructs x from a corrupted copy;
- ``cae<h>-<K>``: contractive (Rifai et al. 2011): adds ``contraction * ||J_f(x)||_F^2``, the
  encoder Jacobian's squared Frobenius norm, in closed form for a one-layer encoder;
- ``vae<h>-<K>``: variational (Kingma and Welling 2014): an h-unit hidden layer, a ``latent``-unit
  Gaussian code, a Bernoulli decoder; the classifier reads the encoder mean.

Every kind's forward is ``classifier(encoder(x))``; the decoder (and the VAE's variance head)
serve pretraining only (advlab.train.pretrain_autoencoder calls :meth:`pretraining_loss`), then
the whole classifier is fine-tuned. Settings (``model_args``) are one Strict model per kind.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.strict import NoSettings, Strict

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def activation_layer(activation: str) -> nn.Module:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: {activation!r} is not supported; use {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]()


class AutoencoderClassifier(nn.Module):
    """Softmax classifier on the code of a one-hidden-layer autoencoder (the paper's AE400-10).

    encoder: Linear(D, h) + activation (sigmoid by default); decoder: Linear(h, D) + sigmoid, so a
    reconstruction is a valid image in [0, 1]; classifier: Linear(h, K) on the code. The paper does
    not say which autoencoder it used; pretraining is :meth:`pretraining_loss` (mean squared
    error), fine-tuning train.py's cross-entropy.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        code_size: int,
        num_classes: int,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.activation = activation
        d = math.prod(input_shape)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(d, code_size), activation_layer(activation)
        )
        self.decoder = nn.Sequential(
            nn.Linear(code_size, d), nn.Sigmoid(), nn.Unflatten(1, self.input_shape)
        )
        self.classifier = nn.Linear(code_size, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        """The code the classifier reads (B, h)."""
        return self.encoder(x)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the code back to an image (B, C, H, W) in [0, 1]."""
        return self.decoder(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x))

    def pretraining_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.reconstruct(x), x)

    def decay_weights(self) -> list[nn.Parameter]:
        # The decoder only serves reconstruction pretraining and is not part of the classifier
        # the paper attacks and regularises, so its weights take no classification weight decay.
        encoder = [m.weight for m in self.encoder if isinstance(m, nn.Linear)]
        return [*encoder, self.classifier.weight]


def _normal(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the CPU from the trial's generator (same on any device)."""
    return torch.randn(like.shape, generator=generator).to(like)


class DenoisingSettings(Strict):
    corruption: Literal["gaussian", "mask"] = "gaussian"
    # gaussian: the noise's standard deviation (the corrupted image is clipped to [0, 1]);
    # mask: the fraction of pixels set to 0 (Vincent et al.'s masking noise)
    noise: float = Field(0.3, gt=0, lt=1)


class DenoisingAutoencoder(AutoencoderClassifier):
    """Pretrained to reconstruct x from a corrupted copy of it (Vincent et al. 2008)."""

    def __init__(self, *args: object, settings: DenoisingSettings, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.settings = settings

    def corrupt(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.settings.corruption == "mask":
            keep = torch.rand(x.shape, generator=generator).to(x) >= self.settings.noise
            return x * keep
        return (x + self.settings.noise * _normal(x, generator)).clamp(0, 1)

    def pretraining_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.decoder(self.encoder(self.corrupt(x, generator))), x)


class ContractiveSettings(Strict):
    # weight of ||J||_F^2 (per example, mean over the batch) beside the per-pixel mean squared
    # reconstruction error
    contraction: float = Field(0.01, ge=0, le=1e6)


# d activation / d pre-activation, written with the activation's output h where it can be.
_SLOPES = {
    "sigmoid": lambda a, h: h * (1 - h),
    "tanh": lambda a, h: 1 - h * h,
    "relu": lambda a, h: (a > 0).to(h.dtype),
}


class ContractiveAutoencoder(AutoencoderClassifier):
    """Pretrained with the encoder Jacobian's squared Frobenius norm as penalty (Rifai et al.)."""

    def __init__(self, *args: object, settings: ContractiveSettings, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.settings = settings

    def jacobian_norm_sq(self, x: Tensor) -> Tensor:
        """(B,) ||d code / d x||_F^2 in closed form: h = s(Wx + b) has J = diag(s'(a)) W, so
        ||J||_F^2 = sum_j s'(a_j)^2 ||W_j||^2 (one matrix product, no autograd through x)."""
        linear = self.encoder[1]
        a = linear(x.flatten(1))
        slope = _SLOPES[self.activation](a, self.encoder[2](a))
        return slope.pow(2) @ linear.weight.pow(2).sum(dim=1)

    def pretraining_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        reconstruction = nn.functional.mse_loss(self.reconstruct(x), x)
        return reconstruction + self.settings.contraction * self.jacobian_norm_sq(x).mean()


class VariationalSettings(Strict):
    latent: int = Field(20, ge=1, le=100_000)  # size of the Gaussian code the classifier reads
    beta: float = Field(1.0, ge=0, le=1e6)  # weight of the KL term (1: the ELBO)


class VariationalAutoencoder(AutoencoderClassifier):
    """A VAE whose encoder mean feeds the softmax: encoder D -> h (activation) -> latent (mean),
    a log-variance head beside the mean, decoder latent -> h -> D with Bernoulli outputs."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        hidden: int,
        num_classes: int,
        activation: str = "sigmoid",
        *,
        settings: VariationalSettings,
    ) -> None:
        super().__init__(input_shape, hidden, num_classes, activation)
        self.settings = settings
        d, latent = math.prod(input_shape), settings.latent
        self.encoder.append(nn.Linear(hidden, latent))  # the mean: what the classifier reads
        self.log_var = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), activation_layer(activation), nn.Linear(hidden, d),
            nn.Sigmoid(), nn.Unflatten(1, self.input_shape),
        )  # fmt: skip
        self.classifier = nn.Linear(latent, num_classes)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log variance) of q(z | x), each (B, latent)."""
        hidden = self.encoder[:3](x)
        return self.encoder[3](hidden), self.log_var(hidden)

    def pretraining_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The negative ELBO per pixel (beta-weighted KL): Bernoulli cross-entropy of the
        decoded sample (pixels in [0, 1] as soft targets) + beta * KL(q(z|x) || N(0, I))."""
        mean, log_var = self.posterior(x)
        z = mean + (0.5 * log_var).exp() * _normal(mean, generator)
        bce = nn.functional.binary_cross_entropy(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum()
        return (bce + self.settings.beta * kl) / x.numel()


# kind -> (class, its model_args settings)
KINDS: dict[str, tuple[type[AutoencoderClassifier], type[Strict]]] = {
    "ae": (AutoencoderClassifier, NoSettings),
    "dae": (DenoisingAutoencoder, DenoisingSettings),
    "cae": (ContractiveAutoencoder, ContractiveSettings),
    "vae": (VariationalAutoencoder, VariationalSettings),
}


def build_autoencoder(
    kind: str,
    input_shape: tuple[int, ...],
    hidden: int,
    num_classes: int,
    activation: str,
    settings: Strict | None,
) -> AutoencoderClassifier:
    cls, _ = KINDS[kind]
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if kind == "ae":
        return cls(shape, hidden, num_classes, activation)
    return cls(shape, hidden, num_classes, activation, settings=settings)  # type: ignore[call-arg]
