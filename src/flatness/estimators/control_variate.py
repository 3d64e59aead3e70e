r"""``estimator="cv"``: Hutchinson with the output layer's exact Hessian block as control variate.

.. math::

    \widehat{\operatorname{Tr}(H^2)} = \lVert H_{LL} \rVert_F^2
        + \frac{1}{M} \sum_{j=1}^{M} \bigl(\lVert H v_j \rVert^2 - \lVert H_{LL} v_{j,L} \rVert^2\bigr)

(:mod:`flatness.control_variate`): unbiased, lower variance at about the same cost; the sampled
term comes from a Hutchinson engine (autograd or the layer-wise closed form).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..control_variate import cv_sq_trace
from ..linear_io import SharedPrefix
from .base import HutchinsonEngine, ProbeEstimator, Share, Shared, Support

__all__ = ["ControlVariateEstimator"]


class ControlVariateEstimator(ProbeEstimator):
    """The control variate around ``engine`` (its model, loss, probes and generator).

    It starts from the task forward's mode-independent prefix (:attr:`Share.PREFIX`; the
    layer-wise engine takes its first Linear output from it) and supports what its engine
    supports but compiled parts and a :class:`flatness.ModelLoss` (its exact block needs the
    model output). All the model's trainable parameters are penalised.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.estimators import AutogradEstimator, ControlVariateEstimator
        >>> model = nn.Linear(4, 3).double()  # one layer: the control variate is exact
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        >>> def cv(seed):
        ...     gen = torch.Generator().manual_seed(seed)
        ...     engine = AutogradEstimator(model, nn.CrossEntropyLoss(), probes=1, generator=gen)
        ...     return ControlVariateEstimator(engine)(x, y)
        >>> bool(torch.isclose(cv(0), cv(1)))  # every draw gives the exact Tr(H²)
        True
    """

    name = "cv"
    argument = "estimator"
    shares = Share.PREFIX

    def __init__(self, engine: HutchinsonEngine) -> None:
        if not isinstance(engine, HutchinsonEngine) or not isinstance(engine, ProbeEstimator):
            raise TypeError(f"the control variate wraps a Hutchinson engine, got {type(engine).__name__}")
        super().__init__(
            engine.model, engine.loss_fn, probes=engine.probes, dist=engine.dist,
            generator=engine.generator, dropout=engine.dropout,
        )
        self.engine: ProbeEstimator = engine
        self.refuse_params(engine.given_params)

    @property
    def supports(self) -> Support:  # type: ignore[override]
        """What the engine supports, without ``torch.compile`` or a :class:`flatness.ModelLoss`."""
        engine = self.engine.supports
        return Support(autocast=engine.autocast, compile=False, ddp=engine.ddp, model_loss=False)

    def children(self) -> tuple[ProbeEstimator, ...]:
        """The engine that computes the products."""
        return (self.engine,)

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The control-variate estimate (:func:`flatness.control_variate.cv_sq_trace`) with the engine's products."""
        prefix = shared if isinstance(shared, SharedPrefix) else None
        engine: HutchinsonEngine = self.engine  # type: ignore[assignment]  # checked in __init__
        with self.curvature_pass():
            return cv_sq_trace(
                self.model, self.loss_fn, x, y, self.probes, self.dist, generator=self.generator,
                sq_norm_mean=lambda vectors: engine.sq_norm_mean(x, y, vectors, prefix),
                prefix=prefix, drawn_by_engine=engine.draws_itself(x),
            )

    def state_dict(self) -> dict[str, Any]:
        """The engine's state."""
        return self.engine.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Restore the engine's state."""
        self.engine.load_state_dict(state)
