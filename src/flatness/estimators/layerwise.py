r"""``backend="layerwise"`` and ``"auto"``: Tr(H²) by the closed form of :mod:`flatness.layerwise`.

For a stack of Linear layers and activations, H v_j is propagated layer by layer (tangents
forward, signals backward) instead of by double backward:

.. math::

    \widehat{\operatorname{Tr}(H^2)} = \frac{1}{M}\sum_{j=1}^M \sum_l
    \lVert \dot\delta_{l,j}^\top X_l + \delta_l^\top \dot X_{l,j} \rVert_F^2
    + \lVert \textstyle\sum_i \dot\delta_{l,j,i} \rVert^2

— the same estimate as autograd's for the same probes (:mod:`flatness.layerwise` derives it).
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layerwise import first_linear, layerwise_sq_trace, unsupported_reason
from ..linear_io import SharedPrefix
from ..precision import full_precision
from ..probes import Distribution, sample_probes
from .autograd import AutogradEstimator
from .base import ProbeEstimator, Share, Shared, Support

__all__ = ["LayerwiseEstimator", "Route"]


class Route(enum.Enum):
    """How a call computes: the closed form, autograd, or both with the same probes (the check)."""

    CLOSED_FORM = "closed form"
    AUTOGRAD = "autograd"
    CHECK = "check"


class LayerwiseEstimator(ProbeEstimator):
    r"""``backend="layerwise"`` (and ``"auto"``): Hutchinson by the closed form of this module.

    .. math:: \widehat{\operatorname{Tr}(H^2)} = \frac{1}{M}\sum_{j=1}^M \sum_l
        \lVert (H v_j)_{W_l} \rVert^2 + \lVert (H v_j)_{b_l} \rVert^2

    by :func:`flatness.layerwise.layerwise_sq_trace` on the model's own layers, for all its
    trainable parameters. It takes the task forward's first Linear output
    (:attr:`Share.FIRST_LAYER`), supports autocast and DDP, not compiled parts nor a
    :class:`flatness.ModelLoss` (the closed form starts from the model output).

    With ``check=True`` (``backend="auto"``) it applies where
    :func:`flatness.layerwise.unsupported_reason` finds nothing, else it is
    :class:`~flatness.estimators.AutogradEstimator`; and since the structure
    cannot show that ``loss_fn`` depends on the model output alone, its first covered pass
    computes both with the same probes (in full precision) and keeps the closed form only if they
    agree (relative difference <= 1e-8 in float64, 1e-4 in float32), otherwise it warns once and
    uses autograd from then on; ``agrees`` holds the verdict (``None`` before the check).
    Without ``check`` a model it does not cover is a ``ValueError`` naming the reason.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.estimators import AutogradEstimator, LayerwiseEstimator
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        >>> x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
        >>> def seeded():
        ...     return {"probes": 3, "generator": torch.Generator().manual_seed(0)}
        >>> fast = LayerwiseEstimator(model, nn.CrossEntropyLoss(), **seeded())(x, y)
        >>> slow = AutogradEstimator(model, nn.CrossEntropyLoss(), **seeded())(x, y)
        >>> bool(torch.isclose(fast, slow, rtol=1e-10))  # the same probes, the same estimate
        True
    """

    shares = Share.FIRST_LAYER
    supports = Support(autocast=True, compile=False, ddp=True, model_loss=False)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        *,
        params: Sequence[Tensor] | None = None,
        probes: int = 5,
        dist: Distribution = "rademacher",
        generator: torch.Generator | None = None,
        dropout: bool = False,
        check: bool = False,
    ) -> None:
        super().__init__(model, loss_fn, probes=probes, dist=dist, generator=generator, dropout=dropout)
        self.check = check
        self.refuse_params(params)
        self.agrees: bool | None = None
        self.fallback = AutogradEstimator(
            model, loss_fn, probes=probes, dist=dist, generator=generator, dropout=dropout
        )

    def children(self) -> tuple[ProbeEstimator, ...]:
        """The autograd estimator used where the closed form does not apply."""
        return (self.fallback,)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``auto`` when the closed form is checked against autograd, else ``layerwise``."""
        return "auto" if self.check else "layerwise"

    def ready(self) -> Share:
        """The first layer once the closed form is known to apply (after ``auto``'s check)."""
        return Share.FIRST_LAYER if not self.check or self.agrees else Share.NOTHING

    def _route(self, x: Any) -> Route:
        reason = unsupported_reason(self.model, x)
        if not self.check:
            if reason is not None:
                raise ValueError(f"backend='layerwise' cannot compute this model's Tr(H²): {reason}")
            return Route.CLOSED_FORM
        if reason is not None or self.agrees is False:
            return Route.AUTOGRAD
        return Route.CLOSED_FORM if self.agrees else Route.CHECK

    def _first(self, shared: Shared | None) -> Tensor | None:
        if not isinstance(shared, SharedPrefix):
            return None
        return shared.first_linear_output(self.model[first_linear(self.model)])

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The closed-form estimate where it applies (and agrees), else the fallback's."""
        with self.curvature_pass():
            if self.dist == "gaussian" and self._route(x) is Route.CLOSED_FORM:
                # its own draw: the input layer's Gaussian block in the data's image (same law, cheaper)
                return layerwise_sq_trace(
                    self.model, self.loss_fn, x, y, self.probes, "gaussian", generator=self.generator,
                    first_linear_output=self._first(shared),
                )
            vectors = sample_probes(self.parameters(), self.probes, self.dist, generator=self.generator)
            return self.sq_norm_mean(x, y, vectors, shared)

    def sq_norm_mean(self, x: Any, y: Any, vectors: Sequence[Tensor | None], shared: Shared | None = None) -> Tensor:
        """(1/M) Σ_j ‖H v_j‖² for given blocks, inside the curvature pass.

        The input layer's block may be ``None``: see :meth:`draws_itself`.
        """
        route = self._route(x)
        if route is Route.AUTOGRAD:
            return self.fallback.sq_norm_mean(x, y, vectors)
        if route is Route.CLOSED_FORM:
            return layerwise_sq_trace(
                self.model, self.loss_fn, x, y, dist=self.dist, generator=self.generator,
                probe_vectors=vectors, first_linear_output=self._first(shared),
            )
        return self._verified(x, y, vectors)

    def draws_itself(self, x: Any) -> Tensor | None:
        """The input layer's weight when its Gaussian block is drawn in the data's image here."""
        if self.dist != "gaussian" or self._route(x) is not Route.CLOSED_FORM:
            return None
        linears = [m for m in self.model if type(m) is nn.Linear]
        return linears[0].weight if len(linears) > 1 else None

    def _verified(self, x: Any, y: Any, vectors: Sequence[Tensor | None]) -> Tensor:
        """``auto``'s first pass: autograd, and the closed form on the same probes, kept if they agree.

        The two are compared in full precision: the check is about the loss, not about rounding.
        """
        with full_precision(self.parameters()[0].device.type):
            slow = self.fallback.sq_norm_mean(x, y, vectors)
            fast = layerwise_sq_trace(self.model, self.loss_fn, x, y, probe_vectors=vectors)
        a, b = float(fast.detach()), float(slow.detach())
        if not (math.isfinite(a) and math.isfinite(b)):
            return slow  # nothing to compare: check again on the next pass
        rtol = {torch.float64: 1e-8, torch.float32: 1e-4}.get(slow.dtype, 1e-2)
        self.agrees = abs(a - b) <= rtol * max(abs(a), abs(b))
        if not self.agrees:
            warnings.warn(
                f"the layer-wise closed form gives Tr(H²) = {a:.6g} where autograd gives {b:.6g}: "
                "loss_fn is not a function of the model output alone (e.g. it adds a weight "
                "penalty), so this penalty uses autograd from now on; pass backend='autograd' "
                "to skip the check",
                RuntimeWarning,
                stacklevel=7,
            )
            return slow
        return fast

    def state_dict(self) -> dict[str, Any]:
        """``auto``'s verdict (whether the closed form agreed), to resume without checking again."""
        return {"layerwise_agrees": self.agrees} if self.check else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``auto``'s verdict."""
        if self.check:
            self.agrees = state.get("layerwise_agrees")
