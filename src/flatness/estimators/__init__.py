r"""Tr(H²) estimators for the FA penalty, one per backend, and the one place that picks one.

:func:`make_estimator` turns the penalty's ``backend=``/``estimator=`` strings into an
:class:`Estimator` (:mod:`flatness.estimators.base` declares the protocol): the registry
:data:`BACKENDS` maps each backend to its class, and each class declares what it penalises,
shares and supports, which is all the validation reads.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.estimators import make_estimator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> [make_estimator(b, "hutchinson", model, nn.CrossEntropyLoss()).name for b in BACKENDS]
    ['auto', 'autograd', 'layerwise', 'finite-difference', 'kfac']
    >>> make_estimator("auto", "cv", model, nn.CrossEntropyLoss()).supports
    Support(autocast=True, compile=False, ddp=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..probes import Distribution
from ..utils import is_compiled
from .autograd import AutogradEstimator
from .base import Estimator, HutchinsonEngine, ProbeEstimator, Share, Shared, Support, TaskGradient, estimate
from .control_variate import ControlVariateEstimator
from .finite_difference import FiniteDifferenceEstimator
from .kfac import KFACEstimator
from .layerwise import LayerwiseEstimator

__all__ = [
    "BACKENDS",
    "ESTIMATORS",
    "AutogradEstimator",
    "ControlVariateEstimator",
    "Estimator",
    "FiniteDifferenceEstimator",
    "HutchinsonEngine",
    "KFACEstimator",
    "LayerwiseEstimator",
    "ProbeEstimator",
    "Share",
    "Shared",
    "Support",
    "TaskGradient",
    "estimate",
    "make_estimator",
]


def _auto(model: nn.Module, loss_fn: Any, params: Sequence[Tensor] | None, **settings: Any) -> ProbeEstimator:
    if params is not None:  # a subset of the parameters: the closed form covers all of them
        return AutogradEstimator(model, loss_fn, params=params, **settings)
    return LayerwiseEstimator(model, loss_fn, check=True, **settings)


# backend -> (constructor(model, loss_fn, params, **settings), takes params=, takes fd_step=)
BACKENDS: dict[str, tuple[Callable[..., ProbeEstimator], bool, bool]] = {
    "auto": (_auto, True, False),
    "autograd": (lambda m, f, params, **s: AutogradEstimator(m, f, params=params, **s), True, False),
    "layerwise": (lambda m, f, params, **s: LayerwiseEstimator(m, f, **s), False, False),
    "finite-difference": (
        lambda m, f, params, h=None, **s: FiniteDifferenceEstimator(m, f, params=params, h=h, **s), True, True
    ),
    "kfac": (lambda m, f, params, **s: KFACEstimator(m, f, **s), False, False),
}
# estimator -> whether it wraps the backend's Hutchinson engine
ESTIMATORS: tuple[str, ...] = ("hutchinson", "cv")


def make_estimator(
    backend: str,
    estimator: str,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    params: Sequence[Tensor] | None = None,
    probes: int = 5,
    dist: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    dropout: bool = False,
    fd_step: float | tuple[float, float] | None = None,
) -> Estimator:
    """The estimator of ``backend`` (a key of :data:`BACKENDS`), wrapped in the control variate
    for ``estimator="cv"``; ``model`` is the module the curvature pass runs (unwrapped from DDP).

    Raises:
        ValueError: an unknown name, ``params`` for an estimator that penalises all the model's
            parameters, ``estimator="cv"`` around a backend with an estimator of its own,
            ``fd_step`` for another backend, or a ``torch.compile``-d model for an estimator that
            needs double backward — each message naming the argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    build, takes_params, takes_fd_step = BACKENDS[backend]
    if fd_step is not None and not takes_fd_step:
        raise ValueError(f"fd_step is for backend='finite-difference', not backend={backend!r}: drop fd_step")
    options = {"h": fd_step} if takes_fd_step else {}
    chosen = build(model, loss_fn, params, probes=probes, dist=dist, generator=generator, dropout=dropout, **options)
    if estimator == "cv":
        if not isinstance(chosen, HutchinsonEngine):
            raise ValueError(f"backend={backend!r} has its own estimator: drop estimator")
        chosen = ControlVariateEstimator(chosen)
    for name, takes in ((f"backend={backend!r}", takes_params), (f"estimator={estimator!r}", estimator != "cv")):
        if params is not None and not takes:
            raise ValueError(f"{name} penalises all of the model's parameters: drop params")
    if is_compiled(model) and not chosen.supports.compile:
        raise ValueError(
            f"backend={backend!r} differentiates twice, which torch.compile refuses: "
            "use backend='finite-difference' (or pass the uncompiled model)"
        )
    return chosen
