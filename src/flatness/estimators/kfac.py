r"""``backend="kfac"``: the Kronecker-factored approximation of :mod:`flatness.kfac`.

.. math::

    \operatorname{Tr}(H^2) \approx c^2 \sum_l \operatorname{Tr}(A_l^2)\,\operatorname{Tr}(G_l^2),
    \qquad A_l = \tfrac{1}{N}\textstyle\sum_i \tilde a_i \tilde a_i^\top,\quad
    G_l = \tfrac{1}{N}\textstyle\sum_i g_i g_i^\top,

with labels sampled from the model's predictive distribution (no probes) and c = 1 for a
batch-mean cross-entropy, N for a summed one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..kfac import kfac_sq_trace
from ..linear_io import SharedPrefix
from .base import ProbeEstimator, Share, Shared, Support

__all__ = ["KFACEstimator"]


class KFACEstimator(ProbeEstimator):
    """K-FAC for classifiers built of Linear layers (cross-entropy of the logits; others are refused).

    It starts from the task forward's mode-independent prefix (:attr:`Share.PREFIX`) and supports
    autocast and DDP, not compiled parts nor a :class:`flatness.ModelLoss` (it needs the logits);
    its only randomness is the sampled labels (``generator``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.estimators import KFACEstimator
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def kfac(reduction):
        ...     gen = torch.Generator().manual_seed(0)
        ...     return KFACEstimator(model, nn.CrossEntropyLoss(reduction=reduction), generator=gen)(x, y)
        >>> mean, summed = kfac("mean"), kfac("sum")
        >>> bool(torch.isclose(summed, 16**2 * mean))  # H of a sum is N × H of the mean
        True
    """

    name = "kfac"
    shares = Share.PREFIX
    supports = Support(autocast=True, compile=False, ddp=True, model_loss=False)

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], *,
                 params: Sequence[Tensor] | None = None, **settings: Any) -> None:
        super().__init__(model, loss_fn, **settings)
        self.refuse_params(params)

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The K-FAC estimate (:func:`flatness.kfac.kfac_sq_trace`), from the shared prefix where there is one."""
        prefix = shared if isinstance(shared, SharedPrefix) else None
        with self.curvature_pass():
            return kfac_sq_trace(self.model, self.loss_fn, x, y, generator=self.generator, prefix=prefix)
