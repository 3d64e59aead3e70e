r"""Standard CIFAR augmentation on tensors: 4-pixel zero padding, random 32×32 crop, random flip.

Applied per mini-batch by the training loop (:func:`flatness.experiments.running.training.train`),
with the run's shuffling generator: the crop offsets and flips are drawn from it, so a seeded
run reproduces exactly, on CPU and CUDA alike (the draws happen on the generator's device and
are then moved to the batch's). Padding is with zeros, which on standardised images is the
per-channel mean pixel.

Example:
    >>> import torch
    >>> from flatness.experiments.world.augment import cifar_augment
    >>> x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3072)
    >>> a = cifar_augment(x, torch.Generator().manual_seed(0))
    >>> b = cifar_augment(x, torch.Generator().manual_seed(0))
    >>> a.shape, torch.equal(a, b)
    (torch.Size([2, 3072]), True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["random_crop_flip", "cifar_augment"]


def random_crop_flip(
    images: Tensor, padding: int, generator: torch.Generator | None = None, flip: bool = True
) -> Tensor:
    """Zero-pad ``(N, C, H, W)`` images by ``padding``, crop back to H×W at random offsets, flip.

    Each image gets its own offsets (uniform in ``0..2·padding``) and, with ``flip``, a
    horizontal flip with probability 1/2. One gather builds the whole batch.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = images.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=gen_device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=gen_device).bool() if flip else None
    offsets = offsets.to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (N, W)
    if flips is not None:
        cols = torch.where(flips.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


def cifar_augment(
    x: Tensor, generator: torch.Generator | None = None, shape: Sequence[int] = (3, 32, 32)
) -> Tensor:
    """The CIFAR training augmentation (pad 4, random crop, flip) of a batch in ``x``'s layout.

    ``x`` is ``(N, 3, 32, 32)`` or flattened ``(N, 3072)``; the result has the same layout.
    """
    images = x.reshape(x.shape[0], *shape) if x.dim() == 2 else x
    out = random_crop_flip(images, 4, generator)
    return out.reshape(x.shape) if x.dim() == 2 else out
