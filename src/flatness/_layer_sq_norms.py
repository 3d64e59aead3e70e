"""The per-layer closed forms behind :func:`flatness.per_example.closed_form_sq_grad_norms`.

Each ``add_*_sq_norms`` adds ‖∇ ℓ_i‖² of one layer's wanted parameters to the running per-example
sum, from the layer's recorded input and the gradient at its output (the routes and their costs:
:mod:`flatness.per_example`). Internal to :mod:`flatness.per_example`, which chooses the layer's
form and raises :class:`flatness.per_example.ClosedFormUnavailable` where none applies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "add_batchnorm_sq_norms",
    "add_conv_sq_norms",
    "add_linear_sq_norms",
    "batch_stats",
    "channel_view",
    "matrix_sq_norms",
    "normalised",
]


def channel_view(t: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector ``t`` shaped to broadcast over ``like`` (n, C, *spatial)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def normalised(a: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``a`` normalised per channel with the given statistics (no affine part)."""
    return (a - channel_view(mean, a)) * channel_view(torch.rsqrt(var + eps), a)


def batch_stats(a: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance of ``a``'s batch, detached (held fixed)."""
    dims = [0, *range(2, a.dim())]  # all but the channels
    a = a.detach()
    return a.mean(dim=dims), a.var(dim=dims, unbiased=False)


def row_sq_norms(a: Tensor) -> Tensor:
    """‖a_i‖² for every row of a 2-D dense or sparse (COO/CSR) tensor."""
    if a.layout == torch.sparse_csr:
        rows = torch.repeat_interleave(
            torch.arange(a.shape[0], device=a.device), a.crow_indices().diff()
        )
        out = torch.zeros(a.shape[0], dtype=a.values().dtype, device=a.device)
        return out.index_add(0, rows, a.values().square())
    if a.is_sparse:
        a = a.coalesce()
        out = torch.zeros(a.shape[0], dtype=a.values().dtype, device=a.device)
        return out.index_add(0, a.indices()[0], a.values().square())
    return a.square().sum(dim=1)


def matrix_sq_norms(delta: Tensor, patches: Tensor) -> Tensor:
    """‖δ_iᵀ A_i‖_F² per example (and group): δ (..., T, out), A (..., T, in) → (...)."""
    t, d_out, d_in = delta.shape[-2], delta.shape[-1], patches.shape[-1]
    if d_out * d_in <= t * (d_out + d_in):  # explicit per-example gradient is cheaper
        return (delta.transpose(-1, -2) @ patches).square().sum(dim=(-2, -1))
    gram_d = delta @ delta.transpose(-1, -2)
    gram_a = patches @ patches.transpose(-1, -2)
    return (gram_d * gram_a).sum(dim=(-2, -1))


def conv_per_example_weight_grads(
    a: Tensor, delta: Tensor, weight: Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any, groups: int
) -> Tensor:
    """‖∇_W ℓ_i‖² of a 2-D convolution, with no unfolded patches.

    One weight-gradient call with the batch as n·groups groups (differentiable: the call has a
    double backward).
    """
    n = a.shape[0]
    shape = (n * weight.shape[0], weight.shape[1], *kernel)
    _, grads, _ = torch.ops.aten.convolution_backward(
        delta.reshape(1, -1, *delta.shape[2:]), a.reshape(1, -1, *a.shape[2:]),
        a.new_zeros(()).expand(shape),  # only its shape is read for the weight gradient
        None, list(stride), list(padding), list(dilation), False, [0, 0], n * groups, [False, True, False],
    )
    return grads.reshape(n, -1).square().sum(dim=1)


def add_batchnorm_sq_norms(sq: Tensor, m: _BatchNorm, a: Tensor, delta: Tensor, wanted: set[int]) -> Tensor:
    """``sq`` + ‖∇ ℓ_i‖² of each of a BatchNorm layer's wanted affine parameters, shape (n,).

    ``a`` is the layer's input, ``delta`` the gradient of the summed loss at its output.
    """
    weight, bias = m.weight, m.bias
    if m.training or m.running_mean is None:  # batch statistics, held fixed
        mean, var = batch_stats(a)
    else:
        mean, var = m.running_mean, m.running_var
    def per_channel(t: Tensor) -> Tensor:  # (n, C, *spatial) → (n, C); dim=[] would sum all
        return t.flatten(2).sum(dim=2) if t.dim() > 2 else t

    if weight is not None and id(weight) in wanted:
        xhat = normalised(a, mean, var, m.eps)
        sq = sq + per_channel(delta * xhat).square().sum(dim=1)
    if bias is not None and id(bias) in wanted:
        sq = sq + per_channel(delta).square().sum(dim=1)
    return sq


def add_conv_sq_norms(
    sq: Tensor, m: nn.Module, a: Tensor, delta: Tensor, wanted: set[int], geometry: tuple[tuple[int, int], ...]
) -> Tensor:
    """:func:`add_batchnorm_sq_norms` for a 1-D or 2-D convolution of ``geometry``.

    ``geometry``: (kernel, stride, padding, dilation) as 2-D tuples for ``F.unfold``.
    """
    n = sq.shape[0]
    weight, bias = m.weight, m.bias
    kernel, stride, padding, dilation = geometry
    groups = m.groups
    a4, d4 = (a.unsqueeze(2), delta.unsqueeze(2)) if isinstance(m, nn.Conv1d) else (a, delta)
    if id(weight) in wanted:
        t, d_out = d4.shape[-2] * d4.shape[-1], weight.shape[0] // groups
        d_in = weight[0].numel()
        if d_out * d_in <= t * (d_out + d_in):  # explicit per-example gradients are cheaper
            sq = sq + conv_per_example_weight_grads(a4, d4, weight, kernel, stride, padding, dilation, groups)
        else:
            patches = F.unfold(a4, kernel, dilation, padding, stride)  # (n, C_in·k, T)
            patches = patches.view(n, groups, -1, patches.shape[-1]).transpose(-1, -2)
            d = d4.reshape(n, groups, -1, t).transpose(-1, -2)
            sq = sq + matrix_sq_norms(d, patches).sum(dim=1)
    if bias is not None and id(bias) in wanted:
        sq = sq + delta.flatten(2).sum(dim=2).square().sum(dim=1)
    return sq


def add_linear_sq_norms(sq: Tensor, m: nn.Module, a: Tensor, delta: Tensor, wanted: set[int]) -> Tensor:
    """:func:`add_batchnorm_sq_norms` for a Linear / SparseLinear layer: (n, ..., in) → (n, ..., out)."""
    n = sq.shape[0]
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    if delta.dim() == 2:  # ‖δ_i‖²‖a_i‖² and ‖δ_i‖² (one ‖δ_i‖² for both)
        sq_delta = delta.square().sum(dim=1)
        if id(weight) in wanted:
            sq = sq + sq_delta * row_sq_norms(a).to(sq.dtype)
        if bias is not None and id(bias) in wanted:
            sq = sq + sq_delta
        return sq
    if id(weight) in wanted:
        sq = sq + matrix_sq_norms(delta.reshape(n, -1, delta.shape[-1]), a.reshape(n, -1, a.shape[-1]))
    if bias is not None and id(bias) in wanted:
        summed = delta.reshape(n, -1, delta.shape[-1]).sum(dim=1)
        sq = sq + summed.square().sum(dim=1)
    return sq
