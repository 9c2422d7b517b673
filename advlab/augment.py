"""What training does to each batch beyond the objective: standard augmentation (random crop
with zero padding, horizontal flip) and mixed precision.

Augmentation is drawn from the trial's seeded CPU generator, batch by batch in training order,
so a run is the same on any device, streamed or in memory, and resumes exactly (the generator
is in the checkpoint). torchvision's transforms draw from torch's global generator one image
at a time; here one draw covers the batch and the crop is one gather on the batch's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from advlab.spec import AugmentSpec

__all__ = ["augment_batch", "autocast", "grad_scaler"]


def augment_batch(x: Tensor, settings: AugmentSpec, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W) cropped from its zero-padded copy and flipped as `settings` say; x
    itself when augmentation is off (no draw, so the generator's stream is as before)."""
    if settings.crop_padding:
        x = random_crop(x, settings.crop_padding, generator)
    if settings.flip:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    return x


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image shifted by its own offset in [-padding, padding] along each axis, the pixels
    shifted in being zeros (torchvision's RandomCrop(size, padding) with fill 0)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # (B, H, W, C) by advanced indexing over batch, rows and columns, then back to channels first
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Training's forward pass in `precision` (autocast: matrix products and convolutions in
    the low precision, reductions and the loss in float32); float32: nothing changes."""
    if precision == "float32":
        yield
        return
    if precision == "float16" and device.type != "cuda":
        raise RuntimeError(
            f"train.precision: float16 needs a GPU and this trial runs on {device.type}; "
            "use bfloat16 or float32"
        )
    with torch.autocast(device.type, dtype=_DTYPES[precision]):
        yield


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """float16's loss scaling (its gradients underflow without it); bfloat16 has float32's
    exponent range and needs none."""
    if precision != "float16" or device.type != "cuda":
        return None
    return torch.amp.GradScaler("cuda")
