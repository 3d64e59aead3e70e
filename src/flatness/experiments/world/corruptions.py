r"""Common image corruptions in plain torch, at Hendrycks & Dietterich's (2019) CIFAR severities.

Four corruptions of ``(N, C, H, W)`` RGB images with values in [0, 1], each with five severity
levels whose parameters are those of the authors' CIFAR-10-C generator
(``make_cifar_c.py`` in hendrycks/robustness); severity 0 returns the images unchanged:

==================  ==========================================  ============================
corruption          what                                        severity 1 … 5
==================  ==========================================  ============================
``gaussian_blur``   Gaussian filter of standard deviation σ     σ = 0.4, 0.6, 0.7, 0.8, 1.0
                    pixels, per channel, edges replicated,
                    truncated at 4σ (scikit-image's defaults)
``contrast``        (x − m)·c + m, m each channel's mean        c = 0.75, 0.5, 0.4, 0.3, 0.15
``brightness``      HSV value V → min(V + b, 1), hue and        b = 0.05, 0.1, 0.15, 0.2, 0.3
                    saturation kept
``jpeg``            JPEG-like quantisation at quality q         q = 80, 65, 58, 50, 40
==================  ==========================================  ============================

Every corrupted image is clipped to [0, 1] and rounded to 8-bit levels (k/255), as the
authors store them (they truncate; rounding is used here).

**JPEG-like**: the lossy steps of baseline JPEG as libjpeg (Pillow's default) does them: RGB →
YCbCr (JFIF), 4:2:0 chroma subsampling (2 × 2 means), level shift by 128, orthonormal 8 × 8
DCT-II per block, quantisation by the standard luminance and chrominance tables (ITU-T T.81
Annex K) scaled to quality q by the IJG rule (scale 5000/q below q = 50, else 200 − 2q;
entries ⌊(t·scale + 50)/100⌋ clamped to [1, 255]), rounding, the inverse DCT, libjpeg's
"fancy" (triangular) chroma upsampling, and back to RGB. The entropy coding is lossless and
left out; the arithmetic is floating point where libjpeg's is integer (colour conversion,
DCT), so pixels differ by about one level: against Pillow's encoder on CIFAR-100 test images
the mean absolute difference is 1.2/255 and the mean damage agrees within 1 %
(``tests/test_corruptions.py`` checks below 2/255).

:func:`gaussian_noise` is the additive input noise of the robustness evaluation (clipped to
[0, 1]); :func:`to_pixels` / :func:`from_pixels` undo and redo a per-channel standardisation.

Example:
    >>> import torch
    >>> from flatness.experiments.world.corruptions import corrupt
    >>> images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> torch.equal(corrupt(images, "contrast", 0), images)
    True
    >>> out = corrupt(images, "jpeg", 5)
    >>> out.shape, out.dtype, bool(out.min() >= 0) and bool(out.max() <= 1)
    (torch.Size([2, 3, 32, 32]), torch.float32, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "gaussian_blur",
    "contrast",
    "brightness",
    "jpeg",
    "gaussian_noise",
    "to_pixels",
    "from_pixels",
]

SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "jpeg": (80, 65, 58, 50, 40),
}
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITIES)

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row-major
_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))
# JFIF's full-range RGB → YCbCr (offsets of 128 on Cb, Cr added separately)
_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _check(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")


def _finish(images: Tensor) -> Tensor:
    """Clip to [0, 1] and round to 8-bit levels."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Each channel filtered by a Gaussian of ``sigma`` pixels (radius ⌊4σ + ½⌋, edges replicated)."""
    _check(images)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
    h, w = images.shape[2:]
    # separable: a weighted sum of shifted copies along each axis (a handful of taps)
    padded = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    rows = sum(k * padded[..., i : i + w] for i, k in enumerate(kernel))
    padded = F.pad(rows, (0, 0, radius, radius), mode="replicate")
    return sum(k * padded[..., i : i + h, :] for i, k in enumerate(kernel))


def contrast(images: Tensor, factor: float) -> Tensor:
    """(x − m)·factor + m with m the mean of each image's channel."""
    _check(images)
    means = images.mean(dim=(2, 3), keepdim=True)
    return (images - means) * factor + means


def brightness(images: Tensor, shift: float) -> Tensor:
    """HSV value V raised to min(V + shift, 1), hue and saturation kept.

    With hue and saturation fixed every RGB channel is proportional to V (x·V'/V); a black
    pixel (V = 0, saturation 0 by convention) becomes grey (V', V', V').
    """
    _check(images)
    value = images.amax(dim=1, keepdim=True)
    new = (value + shift).clamp(max=1.0)
    scaled = images * (new / value.clamp_min(1e-12))
    return torch.where(value > 0, scaled, new.expand_as(images))


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.to(dtype=dtype, device=device)


def _quant_table(base: Sequence[int], quality: float, like: Tensor) -> Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float64)
    table = torch.floor((table * scale + 50) / 100).clamp(1, 255)
    return table.reshape(8, 8).to(dtype=like.dtype, device=like.device)


def _blockwise(planes: Tensor, table: Tensor) -> Tensor:
    """Quantise the 8 × 8 block DCT of ``(N, H, W)`` planes (H, W multiples of 8) by ``table``."""
    n, h, w = planes.shape
    d = _dct_matrix(planes.dtype, planes.device)
    blocks = planes.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    coef = torch.round(coef / table) * table
    blocks = d.T @ coef @ d
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, h, w)


def jpeg(images: Tensor, quality: float) -> Tensor:
    """JPEG-like compression at ``quality`` (1–100) of RGB images (see the module docs)."""
    _check(images)
    if images.shape[1] != 3:
        raise ValueError(f"jpeg needs RGB images (3 channels), got {images.shape[1]}")
    n, _, h, w = images.shape
    ph, pw = -h % 16, -w % 16  # whole 16 × 16 macroblocks (4:2:0): pad by replication
    x = F.pad(images.double() * 255, (0, pw, 0, ph), mode="replicate")
    ycc = torch.einsum("ij,njhw->nihw", torch.tensor(_RGB_TO_YCC, dtype=x.dtype, device=x.device), x)
    luma = _blockwise(ycc[:, 0] - 128, _quant_table(_LUMA, quality, x)) + 128
    chroma = F.avg_pool2d(ycc[:, 1:], 2)  # 4:2:0; the +128 offset cancels with the level shift
    flat = chroma.reshape(-1, *chroma.shape[2:])
    chroma = _blockwise(flat, _quant_table(_CHROMA, quality, x)).reshape(chroma.shape)
    # libjpeg's "fancy" upsampling: weights 9/16, 3/16, 3/16, 1/16 = bilinear, half-pixel centres
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    ycc = torch.cat([luma[:, None], chroma], dim=1)
    ycc_to_rgb = torch.linalg.inv(torch.tensor(_RGB_TO_YCC, dtype=x.dtype, device=x.device))
    rgb = torch.einsum("ij,njhw->nihw", ycc_to_rgb, ycc)
    return (rgb[:, :, :h, :w] / 255).to(images.dtype)


_FUNCTIONS = {"gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness, "jpeg": jpeg}


def corrupt(images: Tensor, name: str, severity: int) -> Tensor:
    """``images`` under corruption ``name`` at ``severity`` 0–5 (0: unchanged).

    Clipped and rounded to 8-bit levels (severities 1–5).
    """
    if name not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; expected one of {CORRUPTIONS}")
    if not (isinstance(severity, int) and 0 <= severity <= 5):
        raise ValueError(f"severity must be an integer in 0..5, got {severity!r}")
    _check(images)
    if severity == 0:
        return images
    return _finish(_FUNCTIONS[name](images, SEVERITIES[name][severity - 1]))


def gaussian_noise(images: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Add Gaussian noise: images + σ·ξ, ξ ~ N(0, I) from ``generator``.

    Clipped to [0, 1], as the authors' noise.
    """
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    return (images + sigma * noise).clamp(0, 1)


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float], shape: Sequence[int] = (3, 32, 32)) -> Tensor:
    """``(N, C, H, W)`` pixels in [0, 1] from per-channel standardised inputs (flat or not)."""
    images = x.reshape(x.shape[0], *shape)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return images * s + m


def from_pixels(images: Tensor, mean: Sequence[float], std: Sequence[float], like: Tensor) -> Tensor:
    """The standardised inputs of ``images``, in the layout of ``like`` (inverse of :func:`to_pixels`)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return ((images - m) / s).reshape(like.shape)
