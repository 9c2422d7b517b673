"""Conv nets for the sweeps in this folder, loaded as `model: convnets:<function>`.

advlab puts a sweep file's folder on sys.path (on every Ray worker too), so a model of your
own is one function in a module beside the sweep: f(input_shape, num_classes, **model_args).
"""

from __future__ import annotations

from torch import nn


def wong(
    input_shape: tuple[int, int, int], num_classes: int, width: int = 16, hidden: int = 100
) -> nn.Module:
    """Wong & Kolter's (2018) small MNIST net: two 4x4 stride-2 convs (width, 2 x width
    channels), a hidden layer, ReLU. Strided convs instead of pooling keep a PGD-training epoch
    on the 60,000 Fashion-MNIST images near 80 core-seconds, 5x cheaper than advlab's `cnn`."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 4) * (w // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
