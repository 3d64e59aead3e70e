r"""Tr(H²) of the data-set loss, the FA-regularization paper's flatness, by Hutchinson.

.. math::

    \operatorname{Tr}(H^2) = \mathbb{E}_v \lVert H v\rVert^2
    \approx \frac{1}{m}\sum_{j=1}^m \lVert H v_j \rVert^2 ,
    \qquad H = \sum_b \tfrac{|b|}{N} H_b .

H v is accumulated over all batches *before* the square is taken: the mean of per-batch
‖H_b v‖² (what :func:`flatness.measure_sq_trace` gives for one batch) is a different quantity.
This is the measurement counterpart of the training penalty (no graph is kept).

Why not curvlinops' ``hutchinson_squared_fro``: it draws from torch's global random state and
returns no standard error.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import hessian_sq_trace
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    >>> est = hessian_sq_trace(model, nn.functional.cross_entropy, data, num_matvecs=20)
    >>> est.value > 0
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..hutchinson import Estimate
from ..probes import Distribution, chunked_samples, make_generator, matrix_probes
from .functional import LossFn, accepts_model_loss
from .operator import HessianOperator
from .trace import Operator, operator_dim, sq_norms

__all__ = ["sq_trace_of", "hessian_sq_trace"]


def sq_trace_of(
    A: Operator,
    num_matvecs: int = 100,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    chunk: int = 20,
) -> Estimate:
    """Hutchinson's Tr(A²) = E‖A v‖² for a symmetric operator (dense tensor or linear operator)."""
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
    draw_chunk = matrix_probes(operator_dim(A), dist, make_generator(seed, generator), A.dtype, A.device)
    return Estimate.from_samples(chunked_samples(num_matvecs, chunk, draw_chunk, lambda v: sq_norms(A, v)))


@accepts_model_loss
def hessian_sq_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    num_matvecs: int = 100,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
    chunk: int = 20,
) -> Estimate:
    """Tr(H²) of the loss averaged over ``batches``, with its standard error."""
    H = HessianOperator(model, loss_fn, batches, params)
    return sq_trace_of(H, num_matvecs, dist, seed=seed, chunk=chunk)
