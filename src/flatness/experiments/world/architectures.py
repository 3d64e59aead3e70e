r"""Image classifiers for the CIFAR tasks, in plain torch: CIFAR ResNets, All-CNN-C and a ViT.

Every model takes CIFAR images either as ``(N, 3, 32, 32)`` or flattened channel-major as
``(N, 3072)`` (the layout :func:`flatness.experiments.world.data.load_cifar100` returns) and returns
logits ``(N, num_classes)``.

- :func:`cifar_resnet`: He et al. (2016, §4.2) — a 3×3 stem, three stages of n basic blocks at
  widths w, 2w, 4w (strides 1, 2, 2), global average pooling, a linear head; depth 6n+2
  (ResNet-20: n = 3, w = 16). BatchNorm after every convolution. Shortcuts: option **A**
  (default, as in the paper's CIFAR experiments) is parameter-free — stride-2 subsampling and
  zero-padded extra channels; option **B** projects with a 1×1 convolution + BatchNorm where
  the shape changes.
- :func:`resnet18`: the CIFAR variant of ResNet-18 — a 3×3 stride-1 stem without max-pooling,
  four stages of two basic blocks at widths 64, 128, 256, 512, option-B shortcuts.
- :func:`all_conv`: All-CNN-C of Springenberg et al. (2015), the "nine-layer all-convolutional
  network with average pooling in the last layer" of Geng et al.: conv3×3(w)×2, conv3×3(w,
  stride 2), conv3×3(2w)×2, conv3×3(2w, stride 2), conv3×3(2w, no padding), conv1×1(2w),
  conv1×1(classes), global average pooling; ReLU after every convolution but the last, w = 96.
  No BatchNorm by default (Geng et al.'s per-example curvature regulariser assumes none).
- :class:`VisionTransformer`: patch embedding (a strided convolution, patch 4 on CIFAR gives
  64 tokens), learned position embeddings, pre-norm blocks of multi-head self-attention through
  :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels where PyTorch has
  them) and a GELU MLP, a final LayerNorm, class-token or mean pooling, a linear head.
  :func:`vit_small` is the CPU size (dim 96, depth 4, heads 3, MLP ratio 2); :func:`vit_tiny`
  is ViT-Ti scale (dim 192, depth 12, heads 3, MLP ratio 4).

:data:`ARCHITECTURES` maps the names the tasks use to builders.

Example:
    >>> import torch
    >>> from flatness.experiments.world.architectures import build_architecture
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(2, 3072)
    >>> [tuple(build_architecture(n, 100)(x).shape) for n in ("resnet20", "allconv", "vit-small")]
    [(2, 100), (2, 100), (2, 100)]
    >>> sum(p.numel() for p in build_architecture("resnet20", 10).parameters())  # He et al.: 0.27M
    269722
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock",
    "ResNet",
    "cifar_resnet",
    "resnet18",
    "AllConvNet",
    "all_conv",
    "VisionTransformer",
    "vit_small",
    "vit_tiny",
    "ARCHITECTURES",
    "build_architecture",
]

CIFAR_SHAPE: tuple[int, int, int] = (3, 32, 32)
Shortcut = Literal["A", "B"]


def as_images(x: Tensor, shape: Sequence[int]) -> Tensor:
    """``x`` as a batch of images of ``shape`` (a flattened ``(N, C·H·W)`` batch is reshaped)."""
    return x.reshape(x.shape[0], *shape) if x.dim() == 2 else x


def _he_init(module: nn.Module) -> None:
    """He-normal (fan-out, ReLU) convolutions, unit/zero BatchNorm, PyTorch-default Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with ReLU and a shortcut: ``relu(bn(conv(relu(bn(conv x)))) + s(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "B") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad_channels = planes - in_planes if shortcut == "A" else 0
        self.projection: nn.Module | None = None
        if shortcut == "B" and (stride != 1 or in_planes != planes):
            self.projection = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:  # option A: subsample, then zero channels for the new width
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """The network's output for the batch ``x``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNet(nn.Module):
    """3×3 conv-BN-ReLU stem, stages of :class:`BasicBlock`, global average pooling, linear head."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        shortcut: Shortcut = "B",
        image_shape: Sequence[int] = CIFAR_SHAPE,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks or min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"need one width >= 1 per stage of >= 1 blocks, got {blocks}, {widths}")
        self.image_shape = tuple(image_shape)
        self.conv1 = nn.Conv2d(self.image_shape[0], widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output for the batch ``x``."""
        out = F.relu(self.bn1(self.conv1(as_images(x, self.image_shape))))
        out = self.layers(out)
        return self.fc(out.mean(dim=(2, 3)))


def cifar_resnet(
    depth: int = 20, width: int = 16, num_classes: int = 100, shortcut: Shortcut = "A"
) -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n+2 layers, stage widths w, 2w, 4w."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2 >= 8 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return ResNet([n] * 3, [width, 2 * width, 4 * width], num_classes, shortcut)


def resnet18(num_classes: int = 100, width: int = 64) -> ResNet:
    """ResNet-18 for 32×32 inputs: 3×3 stem (no max-pool), [2, 2, 2, 2] blocks, option B."""
    return ResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, "B")


class AllConvNet(nn.Module):
    """All-CNN-C (Springenberg et al., 2015): nine convolutions, global average pooling.

    ``dropout`` (Springenberg et al. use 0.5) acts after each stride-2 convolution;
    ``batch_norm`` adds BatchNorm after every convolution but the last.
    """

    def __init__(
        self,
        num_classes: int = 100,
        width: int = 96,
        dropout: float = 0.0,
        batch_norm: bool = False,
        image_shape: Sequence[int] = CIFAR_SHAPE,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_shape = tuple(image_shape)
        w, w2 = width, 2 * width
        # (in, out, kernel, stride, padding, dropout after)
        spec = [
            (self.image_shape[0], w, 3, 1, 1, False), (w, w, 3, 1, 1, False), (w, w, 3, 2, 1, True),
            (w, w2, 3, 1, 1, False), (w2, w2, 3, 1, 1, False), (w2, w2, 3, 2, 1, True),
            (w2, w2, 3, 1, 0, False), (w2, w2, 1, 1, 0, False),
        ]
        layers: list[nn.Module] = []
        for c_in, c_out, k, s, p, drop in spec:
            layers.append(nn.Conv2d(c_in, c_out, k, s, p, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            if drop and dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Conv2d(w2, num_classes, 1))
        self.features = nn.Sequential(*layers)
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output for the batch ``x``."""
        return self.features(as_images(x, self.image_shape)).mean(dim=(2, 3))


def all_conv(num_classes: int = 100, width: int = 96, dropout: float = 0.0, batch_norm: bool = False) -> AllConvNet:
    """Geng et al.'s nine-layer all-convolutional network (All-CNN-C), see :class:`AllConvNet`."""
    return AllConvNet(num_classes, width, dropout, batch_norm)


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention`` (dropout only in training)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) for small images; ``pool`` is ``"cls"`` or ``"mean"``."""

    def __init__(
        self,
        num_classes: int = 100,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        patch: int = 4,
        pool: Literal["cls", "mean"] = "cls",
        dropout: float = 0.0,
        image_shape: Sequence[int] = CIFAR_SHAPE,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height % patch or width % patch:
            raise ValueError(f"patch {patch} does not tile a {height}x{width} image")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if depth < 1 or mlp_ratio <= 0:
            raise ValueError(f"depth must be >= 1 and mlp_ratio > 0, got {depth}, {mlp_ratio}")
        self.image_shape = tuple(image_shape)
        self.pool = pool
        tokens = (height // patch) * (width // patch)
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + (pool == "cls"), dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.in_channels * math.prod(self.patch_embed.kernel_size)
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output for the batch ``x``."""
        tokens = self.patch_embed(as_images(x, self.image_shape)).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        out = self.norm(self.blocks(tokens + self.pos_embed))
        return self.head(out[:, 0] if self.pool == "cls" else out.mean(dim=1))


def vit_small(num_classes: int = 100, **overrides: object) -> VisionTransformer:
    """The CPU-sized ViT: dim 96, depth 4, heads 3, MLP ratio 2, patch 4, class token."""
    settings: dict[str, object] = {"dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0, **overrides}
    return VisionTransformer(num_classes, **settings)  # type: ignore[arg-type]


def vit_tiny(num_classes: int = 100, **overrides: object) -> VisionTransformer:
    """ViT-Ti scale: dim 192, depth 12, heads 3, MLP ratio 4, patch 4, class token."""
    settings: dict[str, object] = {"dim": 192, "depth": 12, "heads": 3, "mlp_ratio": 4.0, **overrides}
    return VisionTransformer(num_classes, **settings)  # type: ignore[arg-type]


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda c: cifar_resnet(20, 16, c, "A"),
    "resnet18": resnet18,
    "allconv": all_conv,
    "allconv-small": lambda c: all_conv(c, width=32),
    "vit-small": vit_small,
    "vit-tiny": vit_tiny,
}


_CIFAR_RESNET = re.compile(r"resnet(\d+)-w(\d+)")


def build_architecture(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``ARCHITECTURES[name]``.

    Or ``resnetD-wW``: He et al.'s CIFAR ResNet of depth D = 6n+2 and width W, option A (e.g.
    ``resnet8-w16``, the study's small CNN). Seed torch's global RNG before calling.
    """
    match = _CIFAR_RESNET.fullmatch(name)
    if match:
        return cifar_resnet(int(match[1]), int(match[2]), num_classes, "A")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)} or resnetD-wW")
    return ARCHITECTURES[name](num_classes)
