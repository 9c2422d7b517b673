"""Resampling: the box filter keeps means exactly and round-trips; odd factors stay close."""

import pytest
import torch

from advlab.resample import resample


def _images(n: int = 5, c: int = 1, side: int = 28) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(0))


def test_equal_resolution_is_the_identity() -> None:
    x = _images()
    assert torch.equal(resample(x, 28), x)


@pytest.mark.parametrize("side", [7, 14, 56, 112])
def test_integer_factors_keep_each_images_mean_intensity(side: int) -> None:
    x = _images(c=3)
    y = resample(x, side)
    assert y.shape == (5, 3, side, side)
    # Sums of 784 float32 values in [0, 1]: round-off below 784 * 2**-24 per mean, far under 1e-5.
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)


def test_downsampling_is_the_block_average_by_hand() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) / 15
    y = resample(x, 2)
    expected = torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]])
    assert torch.allclose(y[0, 0], expected.float() / 4 / 15)


@pytest.mark.parametrize("side", [7, 14])
def test_up_then_down_gives_the_images_back(side: int) -> None:
    x = _images(side=side)
    assert torch.allclose(resample(resample(x, 4 * side), side), x, atol=1e-6)


def test_other_factors_stay_in_the_box_and_near_the_mean() -> None:
    x = _images()
    y = resample(x, 20)
    assert y.shape[-2:] == (20, 20) and float(y.min()) >= 0 and float(y.max()) <= 1
    # Bilinear antialiasing renormalises its weights at the edges: the mean moves only by the
    # edge rows' share of the image, here well under 1% of the [0, 1] range on uniform noise.
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.01)


def test_bad_shapes_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        resample(torch.zeros(28, 28), 14)
    with pytest.raises(ValueError, match="at least 1 pixel"):
        resample(_images(), 0)
