r"""``backend="autograd"``: Tr(H²) by Hutchinson with generic batched double backward.

.. math::

    \widehat{\operatorname{Tr}(H^2)} = \frac{1}{M}\sum_{j=1}^M \lVert H v_j\rVert^2, \qquad
    H v_j = \nabla_\theta (g^\top v_j), \quad g = \nabla_\theta L

with the M products in one batched backward (:func:`flatness.hutchinson.sq_trace`). Any model
and loss that autograd can differentiate three times (the penalty's gradient) is covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..hutchinson import sq_trace
from ..probes import sample_probes
from ..utils import call_model
from .base import ProbeEstimator, Share, Shared, Support

__all__ = ["AutogradEstimator"]


class AutogradEstimator(ProbeEstimator):
    r"""``backend="autograd"``: Hutchinson by generic batched double backward, any model.

    .. math:: \widehat{\operatorname{Tr}(H^2)} = \frac{1}{M}\sum_{j=1}^M \lVert H v_j\rVert^2,
        \qquad H v_j = \nabla_\theta (g^\top v_j),\quad g = \nabla_\theta L

    (:func:`flatness.sq_trace` on the loss of a forward pass of its own, under the curvature pass's
    function). It shares nothing with the task pass; it supports autocast (the Hessian of the
    autocast function), DDP and a :class:`flatness.ModelLoss` (it needs only the loss), not
    compiled parts (no double backward).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.estimators import AutogradEstimator
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> def loss_fn(out, y):  # L = Σ out² = Σ (xᵀw)²: H = 2 Σ x xᵀ
        ...     return out.square().sum()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> est = AutogradEstimator(model, loss_fn, probes=2, generator=torch.Generator().manual_seed(0))
        >>> float(est(x, None))  # H = 2 I: Tr(H²) = 8, exact for ±1 probes
        8.0
    """

    name = "autograd"
    shares = Share.NOTHING
    supports = Support(autocast=True, compile=False, ddp=True, model_loss=True)

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The mean of ‖H v_j‖² over fresh probes, by double backward."""
        with self.curvature_pass():
            vectors = sample_probes(self.parameters(), self.probes, self.dist, generator=self.generator)
            return self.sq_norm_mean(x, y, vectors)

    def sq_norm_mean(self, x: Any, y: Any, vectors: Sequence[Tensor | None], shared: Shared | None = None) -> Tensor:
        """(1/M) Σ_j ‖H v_j‖² for the given blocks (none ``None``), inside the curvature pass."""
        loss = self.loss_fn(call_model(self.model, x), y)
        return sq_trace(loss, self.parameters(), probe_vectors=vectors, create_graph=True)
