r"""Empirical Fisher trace: the mean per-example squared gradient norm (Geng et al., eq. 9).

.. math::

    \operatorname{Tr}(\bar F) = \frac{1}{N}\sum_{i=1}^{N}
    \lVert \nabla_\theta \ell(f_\theta(x_i), y_i) \rVert_2^2
    \;\approx\; \operatorname{Tr}(H) \text{ near a minimum of an over-fitting model.}

The per-example norms come from the one engine, :mod:`flatness.per_example`: closed forms for
Linear, :class:`flatness.layers.SparseLinear` (sparse inputs stay sparse), Conv1d/2d and
BatchNorm layers (one forward and one backward pass per batch, correct with in-place
activations), else ``torch.func.vmap`` over chunks of examples. ``method`` chooses:
``"auto"`` (default), ``"closed-form"`` (an error where it does not apply) or ``"vmap"``.

The measured function (``function``): ``"deployed"`` (default; eval mode, BatchNorm with its
running statistics) or ``"batch_stats"`` (BatchNorm with each batch's statistics, held fixed
per example; running statistics untouched), see :func:`flatness.passes.measure_pass`. The
standard error is that of the mean over examples.

Why not curvlinops' ``EFLinearOperator``: its trace needs P products (or a Hutchinson estimate
with error), while eq. 9 is exact from one pass of per-example gradients.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import fisher_trace
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    >>> est = fisher_trace(model, nn.functional.cross_entropy, data)
    >>> est.num_samples, est.value > 0
    (16, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..hutchinson import Estimate
from ..passes import Function, measure_pass
from ..per_example import PER_EXAMPLE_IMPLS, ClosedFormUnavailable, Impl, per_example_sq_grad_norms
from ..utils import FlatnessError
from .functional import LossFn, accepts_model_loss, collect_batches, select_params

__all__ = ["fisher_trace"]


@accepts_model_loss
def fisher_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    params: Iterable[Tensor] | None = None,
    method: Impl = "auto",
    chunk: int | None = None,
    function: Function = "deployed",
) -> Estimate:
    """Tr of the empirical Fisher over all examples of ``batches``; stderr over examples.

    ``loss_fn`` must be the batch mean (then ``loss_fn`` on one example is that example's loss).
    ``method``: ``"auto"``, ``"closed-form"`` or ``"vmap"``; ``function``: ``"deployed"`` or
    ``"batch_stats"`` (module docs); ``chunk``: examples per vmap call.
    """
    if method not in PER_EXAMPLE_IMPLS:
        raise ValueError(f"method must be one of {PER_EXAMPLE_IMPLS}, got {method!r}")
    data = collect_batches(batches)
    chosen = [p for _, p in select_params(model, params)]
    parts = []
    with measure_pass(model, function):
        for b in data:
            try:
                norms = per_example_sq_grad_norms(
                    model, loss_fn, b.x, b.y, chosen, impl=method, chunk=chunk
                )
            except ClosedFormUnavailable as exc:
                raise FlatnessError(f"the closed form does not apply to this model: {exc}") from None
            parts.append(norms.sq_norms.detach())
    values = torch.cat(parts).double().cpu()
    if not torch.isfinite(values).all():
        raise FlatnessError("non-finite per-example gradients; is the checkpoint diverged?")
    return Estimate.from_samples(values)
