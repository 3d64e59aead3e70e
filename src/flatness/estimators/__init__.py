r"""Tr(H²) estimators for the FA penalty, one per backend, and the one place that picks one.

:func:`make_estimator` turns the penalty's ``backend=``/``estimator=`` strings into an
:class:`Estimator` (:mod:`flatness.estimators.base` declares the protocol): the registries
:data:`BACKENDS` and :data:`ESTIMATORS` map the strings to classes; each class validates its
own arguments (e.g. refuses ``params`` if it penalises all the parameters) and declares what it
shares and supports, which is what the penalty reads.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.estimators import make_estimator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> [make_estimator(b, "hutchinson", model, nn.CrossEntropyLoss()).name for b in BACKENDS]
    ['auto', 'autograd', 'layerwise', 'finite-difference', 'kfac']
    >>> make_estimator("auto", "cv", model, nn.CrossEntropyLoss()).supports
    Support(autocast=True, compile=False, ddp=True, model_loss=False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..batch_loss import BatchLoss
from ..probes import Distribution
from ..utils import require_double_backward
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


def _auto(model: nn.Module, loss_fn: Any, *, params: Sequence[Tensor] | None = None, **settings: Any) -> ProbeEstimator:
    """``backend="auto"``: the closed form, checked against autograd, where it applies.

    Autograd for a subset of the parameters (the closed form covers all of them) and for a
    :class:`flatness.ModelLoss` (the closed form starts from the model output).
    """
    if params is not None or isinstance(model, BatchLoss):
        return AutogradEstimator(model, loss_fn, params=params, **settings)
    return LayerwiseEstimator(model, loss_fn, check=True, **settings)


#: backend= -> the estimator class (or, for "auto", the rule choosing one)
BACKENDS: dict[str, Callable[..., ProbeEstimator]] = {
    "auto": _auto,
    "autograd": AutogradEstimator,
    "layerwise": LayerwiseEstimator,
    "finite-difference": FiniteDifferenceEstimator,
    "kfac": KFACEstimator,
}
#: estimator= -> what wraps the backend's Hutchinson engine (``None``: the engine itself)
ESTIMATORS: dict[str, type[ControlVariateEstimator] | None] = {"hutchinson": None, "cv": ControlVariateEstimator}


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
    """The estimator of ``backend`` (a key of :data:`BACKENDS`), wrapped as ``estimator`` says (:data:`ESTIMATORS`).

    ``model`` is the module the curvature pass runs (unwrapped from DDP and from ``torch.compile``'s
    wrapper: :func:`flatness.utils.unwrap`), and a :class:`flatness.batch_loss.BatchLoss` with
    ``loss_fn`` its :func:`~flatness.batch_loss.output_is_loss` for a :class:`flatness.ModelLoss`
    (:func:`flatness.batch_loss.adapt`).

    Under ``torch.autocast`` the passes run in the autocast dtype, the finite-difference ones in
    full precision (:func:`estimate`, :mod:`flatness.precision`); a ``torch.compile``-d model is
    differentiated through its eager module, and compiled parts are refused but by
    ``"finite-difference"`` (the others need double backward).

    Raises:
        ValueError: an unknown name, ``params`` for an estimator that penalises all the model's
            parameters, ``estimator="cv"`` around a backend with an estimator of its own,
            ``fd_step`` for another backend, a model with compiled parts for an estimator that
            needs double backward, or a ModelLoss for one that needs the model output — each
            message naming the argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    build, wrap = BACKENDS[backend], ESTIMATORS[estimator]
    options: dict[str, Any] = {"probes": probes, "dist": dist, "generator": generator, "dropout": dropout}
    if fd_step is not None:
        if build is not FiniteDifferenceEstimator:
            raise ValueError(f"fd_step is for backend='finite-difference', not backend={backend!r}: drop fd_step")
        options["h"] = fd_step
    chosen = build(model, loss_fn, params=params, **options)
    if wrap is not None:
        if not isinstance(chosen, HutchinsonEngine):
            raise ValueError(f"backend={backend!r} has its own estimator: drop estimator")
        chosen = wrap(chosen)
    if isinstance(model, BatchLoss) and not chosen.supports.model_loss:
        what = f"estimator={estimator!r}" if wrap is not None else f"backend={backend!r}"
        raise ValueError(f"{what} needs the model output, and a ModelLoss gives only the loss: "
                         "use backend='auto', 'autograd' or 'finite-difference'")
    if not chosen.supports.compile:
        require_double_backward(model, f"backend={backend!r}")
    return chosen
