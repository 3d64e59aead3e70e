r"""Layers the library's closed forms know about: :class:`SparseLinear` for sparse inputs.

:class:`SparseLinear` computes :math:`x W^\top + b` for a sparse CSR (or COO) batch ``x``
without densifying it, as a gather of the weight columns of the non-zero features and a
scatter-add per row:

.. math:: (x W^\top)_{i c} = \sum_{k:\, \mathrm{row}(k) = i} \mathrm{val}_k \, W_{c,\, \mathrm{col}(k)}

Both ops are ordinary dense autograd ops with batching rules, so gradients, Hessian-vector
products (batched over probes) and the FA penalty's third-order backward all work through it
(``torch.sparse.mm`` has no batching rule for batched Hessian-vector products).

Example:
    >>> import torch
    >>> from flatness.layers import SparseLinear
    >>> layer = SparseLinear(5, 3)
    >>> x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    >>> torch.allclose(layer(x.to_sparse_csr()), layer(x))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SparseLinear", "sparse_linear", "LINEAR_TYPES"]


def sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for a dense, sparse-CSR or sparse-COO ``x`` of shape (N, in)."""
    if x.layout == torch.sparse_csr:
        crow, col, val = x.crow_indices(), x.col_indices(), x.values()
        rows = torch.repeat_interleave(
            torch.arange(x.shape[0], device=x.device), crow.diff(), output_size=val.numel()
        )
    elif x.is_sparse:
        x = x.coalesce()
        (rows, col), val = x.indices(), x.values()
    else:
        return nn.functional.linear(x, weight, bias)
    contrib = weight.index_select(1, col) * val.to(weight.dtype)  # (out, nnz)
    out = weight.new_zeros(weight.shape[0], x.shape[0]).index_add(1, rows, contrib).t()
    return out if bias is None else out + bias


class SparseLinear(nn.Module):
    """A linear layer (``weight`` is (out, in) as in :class:`torch.nn.Linear`) for sparse inputs.

    Dense inputs go through ``F.linear``; sparse CSR/COO inputs through :func:`sparse_linear`.
    Initialised like :class:`torch.nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Linear`` does (Kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` by :func:`sparse_linear`."""
        return sparse_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        """The layer's sizes, as ``nn.Linear`` shows them."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Layers whose weight acts as ``x @ weight.T + bias`` on (batch, features) inputs.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, SparseLinear)
