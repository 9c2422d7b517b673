"""Image resampling to another resolution: the input-dimension axis of a sweep (d = C * H * W).

Integer factors use the box filter (area averaging down, pixel replication up): it keeps every
image's mean intensity exactly, is antialiased by construction when shrinking, and down(up(x))
gives x back, so changing d adds no information and removes only detail. Other factors fall back
to bilinear filtering with antialiasing (torch's), which keeps the mean up to edge effects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"resolution {size!r} must be at least 1 pixel a side")
    return int(h), int(w)


def _divides(small: int, big: int) -> bool:
    return big % small == 0


def resample(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """(N, C, H, W) images in [0, 1] -> (N, C, h, w), still in [0, 1] and float32."""
    if images.dim() != 4:
        raise ValueError(f"resample takes (N, C, H, W) images, got shape {tuple(images.shape)}")
    h, w = _pair(size)
    height, width = int(images.shape[2]), int(images.shape[3])
    x = images.to(torch.float32)
    if (h, w) == (height, width):
        return x
    if h <= height and w <= width and _divides(h, height) and _divides(w, width):
        out = F.avg_pool2d(x, kernel_size=(height // h, width // w))
    elif h >= height and w >= width and _divides(height, h) and _divides(width, w):
        out = x.repeat_interleave(h // height, dim=2).repeat_interleave(w // width, dim=3)
    else:
        out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0).contiguous()
