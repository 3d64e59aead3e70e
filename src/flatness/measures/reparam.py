r"""Function-preserving rescaling of a ReLU network (Dinh et al., 2017), and which measures it moves.

For consecutive linear layers ℓ, ℓ+1 with a positively homogeneous activation between them
(ReLU: relu(αz) = α·relu(z) for α > 0; dropout in eval mode and the identity too),

.. math::

    (W_\ell, b_\ell, W_{\ell+1}) \mapsto (\alpha W_\ell,\; \alpha b_\ell,\; W_{\ell+1}/\alpha)

leaves the network's function unchanged, yet scales the Hessian blocks of layers ℓ and ℓ+1 by
1/α² and α²: λ_max, Tr(H) and plain ε-sharpness can be made as large or as small as one likes at
the same function, which adaptive sharpness (Kwon et al., 2021) and scale-free measures are not.
:func:`rescale_layers` builds the rescaled copy (the model itself is never modified) and checks
the structure it relies on; :func:`reparametrization_check` runs named measures of
:data:`flatness.measures.MEASURES` before and after and reports each value's relative change.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import rescale_layers
    >>> model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    >>> other = rescale_layers(model, 10.0)
    >>> x = torch.randn(8, 3)
    >>> torch.allclose(model(x), other(x), atol=1e-5), torch.equal(other[0].weight, 10 * model[0].weight)
    (True, True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import LINEAR_TYPES
from ..utils import FlatnessError, call_model, eval_mode
from .functional import collect_batches
from .summary import MeasureOptions, compute_measures

__all__ = ["HOMOGENEOUS", "rescale_layers", "Change", "reparametrization_check"]

HOMOGENEOUS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity)
"""Modules f with f(αz) = α f(z) for α > 0 (dropout in eval mode), allowed between the layers."""


def _flat_children(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flat_children(child)]
    return [module]


def rescale_layers(model: nn.Module, alpha: float, first: int = 0) -> nn.Module:
    """A copy of ``model`` with linear layer ``first`` × α (weight and bias), the next ÷ α.

    ``model`` must be an ``nn.Sequential`` (nested ones are flattened) whose linear layers
    ``first`` and ``first + 1`` (counted among the linear layers) are separated only by
    :data:`HOMOGENEOUS` modules; then the copy computes the same function.

    Raises:
        FlatnessError: α is not a finite number > 0, or the model does not have that structure.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise FlatnessError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(model, nn.Sequential):
        raise FlatnessError("rescale_layers needs an nn.Sequential (its layers' order is its data flow)")
    copied = copy.deepcopy(model)
    leaves = _flat_children(copied)
    linear = [i for i, m in enumerate(leaves) if isinstance(m, LINEAR_TYPES)]
    if not 0 <= first < len(linear) - 1:
        raise FlatnessError(f"first must be in [0, {len(linear) - 2}] for {len(linear)} linear layers")
    start, stop = linear[first], linear[first + 1]
    between = leaves[start + 1 : stop]
    bad = [type(m).__name__ for m in between if not isinstance(m, HOMOGENEOUS)]
    if bad:
        raise FlatnessError(f"layers {first} and {first + 1} are separated by {bad}: not positively homogeneous")
    with torch.no_grad():
        leaves[start].weight.mul_(alpha)
        if getattr(leaves[start], "bias", None) is not None:
            leaves[start].bias.mul_(alpha)
        leaves[stop].weight.div_(alpha)
    return copied


@dataclass(frozen=True)
class Change:
    """One measured value before and after the rescaling."""

    key: str
    before: float
    after: float

    @property
    def relative(self) -> float:
        """``|after − before| / |before|`` (``|after − before|`` when before is 0)."""
        diff = abs(self.after - self.before)
        return diff / abs(self.before) if self.before != 0 else diff

    def invariant(self, rtol: float) -> bool:
        """Whether the value changed by at most ``rtol``, relatively (:attr:`relative`)."""
        return self.relative <= rtol


def reparametrization_check(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[tuple[Any, Any]],
    measures: Sequence[str],
    alpha: float = 10.0,
    first: int = 0,
    options: MeasureOptions | None = None,
) -> tuple[float, list[Change]]:
    """Run ``measures`` on ``model`` and on :func:`rescale_layers` (α, ``first``) of it.

    Returns the largest absolute change of the outputs over ``batches`` (eval mode: the
    function is unchanged up to rounding) and one :class:`Change` per numeric result key.
    Measures drawing random numbers see the same draws on both models (same options seed).
    """
    data = collect_batches(batches)
    other = rescale_layers(model, alpha, first)
    with eval_mode(model), eval_mode(other), torch.no_grad():
        drift = max(float((call_model(model, b.x) - call_model(other, b.x)).abs().max()) for b in data)
    before = compute_measures(model, loss_fn, data, measures, options)
    after = compute_measures(other, loss_fn, data, measures, options)
    changes = [
        Change(k, float(v), float(after[k]))
        for k, v in before.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(after.get(k), (int, float))
    ]
    return drift, changes
