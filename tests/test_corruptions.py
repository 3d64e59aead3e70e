"""Image corruptions (plain torch): identity at severity 0, damage growing with severity, shapes and
dtypes, determinism, and agreement with the references (scipy's Gaussian filter, colorsys' HSV,
Pillow's JPEG).
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.nn import functional as F

from flatness.experiments.world.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    brightness,
    corrupt,
    from_pixels,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    to_pixels,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """16 natural-looking 32 × 32 RGB images on the 8-bit grid: smooth fields, an edge, texture."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 4, 4, generator=gen)
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    edge = (torch.arange(32) >= 16).float().view(1, 1, 1, 32) * 0.3
    x = (0.7 * smooth + edge + 0.05 * torch.rand(16, 3, 32, 32, generator=gen)).clamp(0, 1)
    x[0, :, :4, :4] = 0.0  # black pixels (brightness' special case)
    return torch.round(x * 255) / 255


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_the_identity_and_damage_grows_with_severity(images, name):
    assert torch.equal(corrupt(images, name, 0), images)
    damage = [float((corrupt(images, name, s) - images).abs().mean()) for s in range(1, 6)]
    assert damage[0] > 0
    assert all(a < b for a, b in zip(damage, damage[1:], strict=False)), damage


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("severity", [1, 5])
def test_shapes_dtypes_range_levels_and_determinism(images, name, dtype, severity):
    x = images[:5, :, :, :24].to(dtype)  # a non-square width, not a multiple of 16
    out = corrupt(x, name, severity)
    assert out.shape == x.shape and out.dtype == dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out * 255, torch.round(out * 255), atol=1e-4)  # 8-bit levels
    assert torch.equal(corrupt(x, name, severity), out)
    assert torch.equal(x, images[:5, :, :, :24].to(dtype))  # input untouched


def test_parameters_are_hendrycks_and_dietterichs_cifar_ones():
    assert SEVERITIES == {
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "jpeg": (80, 65, 58, 50, 40),
    }


@pytest.mark.parametrize("sigma", [0.4, 1.0])
def test_blur_is_scikit_images_gaussian_filter(images, sigma):
    ours = gaussian_blur(images.double(), sigma)
    ref = np.stack([ndimage.gaussian_filter(im.double().numpy(), sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
                    for im in images])
    assert np.allclose(ours.numpy(), ref, atol=1e-12)


def test_brightness_is_an_hsv_value_shift(images):
    out = brightness(images.double(), 0.2)
    for n, i, j in [(0, 0, 0), (1, 5, 7), (3, 31, 0), (7, 16, 16), (12, 2, 30)]:
        r, g, b = images[n, :, i, j].double().tolist()
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        expected = colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0))
        assert out[n, :, i, j].tolist() == pytest.approx(expected, abs=1e-12)


def test_contrast_keeps_each_channel_mean_when_nothing_clips(images):
    mid = 0.25 + 0.5 * images  # within [0.25, 0.75]: contrast never clips
    out = corrupt(mid, "contrast", 3)
    assert torch.allclose(out.mean(dim=(2, 3)), mid.mean(dim=(2, 3)), atol=1 / 255)
    assert float(out.std()) < float(mid.std())


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_like_is_close_to_pillows_jpeg(images, severity):
    quality = SEVERITIES["jpeg"][severity - 1]
    pil = []
    for im in images:
        buffer = io.BytesIO()
        pixels = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        pil.append(torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255).permute(2, 0, 1))
    pil = torch.stack(pil)
    ours = corrupt(images, "jpeg", severity)
    assert float((ours - pil).abs().mean()) < 2 / 255
    ours_damage, pil_damage = float((ours - images).abs().mean()), float((pil - images).abs().mean())
    assert ours_damage == pytest.approx(pil_damage, rel=0.2)


def test_jpeg_at_quality_100_keeps_grey_images(images):
    grey = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # no chroma to subsample
    assert float((jpeg(grey, 100) - grey).abs().max()) < 2 / 255  # all quantisation steps 1


def test_gaussian_noise_is_seeded_and_clipped(images):
    a = gaussian_noise(images, 0.1, torch.Generator().manual_seed(1))
    b = gaussian_noise(images, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a - images).std()) == pytest.approx(0.1, rel=0.15)


def test_pixels_round_trip_through_a_standardisation(images):
    mean, std = (0.5, 0.48, 0.44), (0.27, 0.26, 0.28)
    x = ((images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).reshape(16, -1)
    pixels = to_pixels(x, mean, std)
    assert pixels.shape == (16, 3, 32, 32) and torch.allclose(pixels, images, atol=1e-6)
    assert torch.allclose(from_pixels(pixels, mean, std, x), x, atol=1e-5)


@pytest.mark.parametrize("args", [("blur", 1), ("contrast", 6), ("contrast", -1), ("contrast", 1.0)])
def test_bad_arguments_are_refused(images, args):
    with pytest.raises(ValueError):
        corrupt(images, *args)
    with pytest.raises(ValueError, match="N, C, H, W"):
        corrupt(images[0], "contrast", 1)
