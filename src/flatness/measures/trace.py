r"""Tr(H) by Hutchinson and by Hutch++ (Meyer, Musco, Musco & Woodruff, 2021), with a standard error.

Hutchinson, with probes :math:`E[g g^\top] = I`:

.. math:: \widehat{\operatorname{Tr}}(A) = \frac{1}{m}\sum_{j=1}^{m} g_j^\top A g_j .

Hutch++ spends its m products in three parts: a sketch :math:`Q = \operatorname{orth}(A S)`
of the dominant range (m/3 products), the exact trace of :math:`Q^\top A Q` (m/3 products), and
Hutchinson on the deflated rest (the remaining products):

.. math::

    \widehat{\operatorname{Tr}}_{++}(A) = \operatorname{Tr}(Q^\top A Q)
    + \frac{1}{m_g}\sum_{j} g_j^\top (I - QQ^\top) A (I - QQ^\top) g_j .

For a matrix with a decaying spectrum (a trained network's Hessian) the deflated rest is small,
so Hutch++ has much lower variance than Hutchinson at equal cost. Its reported standard error is
that of the Hutchinson part *given the sketch Q* (the sketch's own randomness is not in it).

Why not curvlinops' ``hutchinson_trace``/``hutchpp_trace``: they return no standard error and
draw probes from torch's global random state; these take a seed or generator and chunk their
products. They accept a :class:`~flatness.measures.operator.LinearOperator` (such as
:class:`~flatness.measures.HessianOperator`) or a dense tensor.

Example:
    >>> import torch
    >>> from flatness.measures import hutchinson_trace, hutchpp_trace
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    >>> hutchinson_trace(A, num_matvecs=4, seed=0).value  # exact for diagonal A, ±1 probes
    6.5
    >>> round(hutchpp_trace(A, num_matvecs=12, seed=0).value, 6)
    6.5
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..hutchinson import Estimate
from ..probes import Distribution, chunked_samples, make_generator, matrix_probes, random_matrix
from .functional import LossFn, accepts_model_loss
from .operator import HessianOperator, LinearOperator

__all__ = [
    "Operator",
    "apply_chunked",
    "hutchinson_trace",
    "hutchpp_trace",
    "hessian_trace",
    "TraceMethod",
]

Operator = Tensor | LinearOperator
TraceMethod = Literal["hutchinson", "hutch++"]


def operator_dim(A: Operator) -> int:
    rows, cols = A.shape[0], A.shape[1]
    if rows != cols:
        raise ValueError(f"the operator must be square, got shape {tuple(A.shape)}")
    return int(rows)


def operator_dtype_device(A: Operator) -> tuple[torch.dtype, torch.device]:
    return A.dtype, A.device


def quadratic_forms(A: Operator, X: Tensor) -> Tensor:
    """xⱼᵀ A xⱼ for each column of X: the operator's own row-wise route, or one pass for a matrix."""
    return A.quadratic_forms(X) if isinstance(A, LinearOperator) else (X * (A @ X)).sum(0)


def sq_norms(A: Operator, X: Tensor) -> Tensor:
    """‖A xⱼ‖² for each column of X (see :func:`quadratic_forms`)."""
    return A.sq_norms(X) if isinstance(A, LinearOperator) else (A @ X).square().sum(0)


def apply_chunked(A: Operator, X: Tensor, chunk: int) -> Tensor:
    """``A @ X`` computed ``chunk`` columns at a time (bounds the memory of the products)."""
    return torch.cat([A @ X[:, s : s + chunk] for s in range(0, X.shape[1], chunk)], dim=1)


def hutchinson_trace(
    A: Operator,
    num_matvecs: int = 100,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    chunk: int = 20,
) -> Estimate:
    """Hutchinson's Tr(A) from ``num_matvecs`` products; stderr from the per-probe spread."""
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
    dtype, device = operator_dtype_device(A)
    draw_chunk = matrix_probes(operator_dim(A), dist, make_generator(seed, generator), dtype, device)
    return Estimate.from_samples(chunked_samples(num_matvecs, chunk, draw_chunk, lambda g: quadratic_forms(A, g)))


def hutchpp_trace(
    A: Operator,
    num_matvecs: int = 99,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    chunk: int = 20,
) -> Estimate:
    """Hutch++ Tr(A) from ``num_matvecs`` (>= 3) products: ⌊m/3⌋ sketch, ⌊m/3⌋ exact, rest Hutchinson.

    ``stderr`` is the Hutchinson part's standard error given the sketch.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}")
    dim = operator_dim(A)
    dtype, device = operator_dtype_device(A)
    gen = make_generator(seed, generator)
    num_sketch = num_matvecs // 3
    num_rest = num_matvecs - 2 * num_sketch
    sketch = random_matrix(dim, num_sketch, dist, gen, dtype, device)
    Q, _ = torch.linalg.qr(apply_chunked(A, sketch, chunk))
    exact = float(torch.einsum("ij,ij->", Q, apply_chunked(A, Q, chunk)))
    G = random_matrix(dim, num_rest, dist, gen, dtype, device)
    G_perp = G - Q @ (Q.T @ G)
    AG_perp = apply_chunked(A, G_perp, chunk)
    # gᵀ(I-QQᵀ) A (I-QQᵀ) g = (G_perp)ᵀ A G_perp, column by column.
    return Estimate.from_samples((G_perp * AG_perp).sum(0), offset=exact)


@accepts_model_loss
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    num_matvecs: int = 100,
    method: TraceMethod = "hutchinson",
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
    chunk: int = 20,
) -> Estimate:
    """Tr(H) of the loss averaged over ``batches`` by ``"hutchinson"`` or ``"hutch++"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.measures import hessian_trace
        >>> model = nn.Linear(3, 2, dtype=torch.float64)
        >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
        >>> est = hessian_trace(model, nn.functional.cross_entropy, data, num_matvecs=30)
        >>> est.num_samples, est.stderr > 0
        (30, True)
    """
    estimators: dict[str, Callable[..., Estimate]] = {
        "hutchinson": hutchinson_trace,
        "hutch++": hutchpp_trace,
    }
    if method not in estimators:
        raise ValueError(f"unknown trace method {method!r}; expected one of {sorted(estimators)}")
    H = HessianOperator(model, loss_fn, batches, params)
    return estimators[method](H, num_matvecs, dist, seed=seed, chunk=chunk)
