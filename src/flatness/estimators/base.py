r"""The estimator protocol: one object per way of computing the FA penalty's Tr(H²).

An :class:`Estimator` returns a differentiable estimate of

.. math:: \operatorname{Tr}(H^2) = \mathbb{E}_v \lVert H v \rVert^2, \qquad
    H = \nabla^2_\theta\, \ell(f_\theta(x), y),

on one curvature batch, computed the way its backend computes it — one class per backend, each
in its own module of :mod:`flatness.estimators` beside the operator module it uses:

=======================  ===========================================  ==================  =======================
``backend=``             class (operator module)                      shares              supports
=======================  ===========================================  ==================  =======================
``"autograd"``           ``AutogradEstimator`` (``hutchinson``)        nothing             autocast, DDP, ModelLoss
``"layerwise"``          ``LayerwiseEstimator`` (``layerwise``)        first layer         autocast, DDP
``"auto"``               ``LayerwiseEstimator(check=True)``            first layer         autocast, DDP
                         (``AutogradEstimator`` for a ModelLoss)
``"finite-difference"``  ``FiniteDifferenceEstimator``                 task gradient       compile, DDP, ModelLoss
                         (``finite_difference``)
``"kfac"``               ``KFACEstimator`` (``kfac``)                  prefix              autocast, DDP
``estimator="cv"``       ``ControlVariateEstimator``                   prefix              its engine's autocast,
                         (``control_variate``) around the first two                        DDP
=======================  ===========================================  ==================  =======================

Each declares, as attributes, what it can take from the training step's task pass
(:class:`Share`) and what it supports (:class:`Support`: ``torch.autocast``, compiled parts,
DistributedDataParallel, a :class:`flatness.ModelLoss`). :func:`flatness.estimators.make_estimator`
is the one place where a ``backend=``/``estimator=`` pair becomes an object (and refuses what
the object does not support), and :func:`estimate` the one place where the declarations are
applied to a call (an estimator that does not support autocast runs with it off).

What an estimator takes from the task pass is a cache of that pass:
:class:`flatness.linear_io.SharedPrefix` records the versions of the parameters and of the
input it was computed from, and whether a backward went through it; a stale one is never used
(:meth:`flatness.FlatnessPenalty.sharing` recomputes it).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.estimators import Estimator, Share, estimate, make_estimator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> kfac = make_estimator("kfac", "hutchinson", model, nn.CrossEntropyLoss(),
    ...                       generator=torch.Generator().manual_seed(0))
    >>> isinstance(kfac, Estimator), kfac.shares == Share.PREFIX, kfac.supports.compile
    (True, True, False)
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    >>> estimate(kfac, x, y).requires_grad  # differentiable: a training penalty
    True
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..finite_difference import FrozenKinks, surrogate
from ..linear_io import SharedPrefix
from ..passes import curvature_pass
from ..precision import PassPrecision
from ..probes import Distribution, check_distribution, check_probes

__all__ = [
    "Estimator",
    "HutchinsonEngine",
    "ProbeEstimator",
    "Share",
    "Shared",
    "Support",
    "TaskGradient",
    "estimate",
]

LossFn = Callable[[Tensor, Any], Tensor]


class Share(enum.Flag):
    """What an estimator can take from the training step's task pass instead of computing it.

    ``FIRST_LAYER``: the task forward's first Linear output (one input-layer product forward and
    backward fewer); ``PREFIX``: the task forward's mode-independent prefix
    (:func:`flatness.linear_io.share_prefix`); ``TASK_GRADIENT``: the task pass's gradient g(θ)
    and ReLU masks (one gradient evaluation fewer); ``NOTHING``.
    """

    NOTHING = 0
    FIRST_LAYER = enum.auto()
    PREFIX = enum.auto()
    TASK_GRADIENT = enum.auto()


@dataclass(frozen=True)
class Support:
    """What an estimator works with (``tests/test_estimators.py`` checks each declaration).

    ``autocast``: its value under ``torch.autocast`` is the autocast function's (else
    :func:`estimate` runs it with autocast off); ``compile``: it runs on a model with parts
    compiled by ``torch.compile`` (whose code has no double backward; a whole model compiled
    with ``torch.compile(model)`` is differentiated through its eager module by every estimator);
    ``ddp``: it runs on the module inside DistributedDataParallel and its term is all-reduced by
    the one ``backward()`` of the step; ``model_loss``: it needs only the loss, not the model
    output, so it runs on a :class:`flatness.ModelLoss` (:mod:`flatness.batch_loss`).
    """

    autocast: bool
    compile: bool
    ddp: bool
    model_loss: bool


@dataclass
class TaskGradient:
    """What the task pass hands an estimator that shares it.

    Its loss, g(θ) at the penalised parameters and the ReLU masks of θ
    (:class:`flatness.finite_difference.FrozenKinks`). It is computed and used within one
    :meth:`flatness.FlatnessPenalty.objective` call.
    """

    loss: Tensor
    params: list[Tensor]
    grads: list[Tensor]
    kinks: FrozenKinks

    def surrogate(self) -> Tensor:
        """The task loss's value with gradient g(θ) (:func:`flatness.finite_difference.surrogate`)."""
        return surrogate(self.params, self.loss.detach(), self.grads)


Shared = SharedPrefix | TaskGradient  # what an estimator takes from the task pass


@runtime_checkable
class Estimator(Protocol):
    """A differentiable Tr(H²) estimate of ``loss_fn(model(x), y)`` on one curvature batch.

    ``name`` is its ``backend=`` (or ``estimator=``) string; ``shares`` and ``supports`` are its
    declarations; ``probes`` and ``generator`` its Hutchinson probes (K-FAC draws its labels);
    :meth:`ready` says what it takes from the task pass on its next call (a part of ``shares``:
    e.g. ``backend="auto"`` takes nothing before its check against autograd).
    ``__call__`` runs the curvature pass's function itself (:func:`flatness.passes.curvature_pass`).
    """

    name: str
    shares: Share
    supports: Support
    probes: int
    generator: torch.Generator | None

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The estimate on the batch ``(x, y)``, with the graph its gradient needs.

        ``shared``: what the task pass handed over (valid, for this batch), or ``None``.
        """
        ...

    def ready(self) -> Share:
        """What the next call takes from the task pass (a part of ``shares``)."""
        ...

    def parameters(self) -> list[Tensor]:
        """The parameters H is taken over (read on every call)."""
        ...

    def task_pass(self, x: Any, y: Any) -> TaskGradient:
        """The task loss and its gradient, for an estimator that takes the task gradient."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the estimator needs to resume exactly (e.g. ``auto``'s verdict)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (other keys of ``state`` are ignored)."""
        ...


@runtime_checkable
class HutchinsonEngine(Protocol):
    """(1/M) Σ_j ‖H v_j‖² for given probe blocks: what the control variate composes with."""

    supports: Support

    def sq_norm_mean(self, x: Any, y: Any, vectors: Sequence[Tensor | None], shared: Shared | None = None) -> Tensor:
        """(1/M) Σ_j ‖H v_j‖² for the probe blocks ``vectors``, inside the curvature pass.

        One block per parameter, ``(M, *p.shape)``.
        """
        ...

    def draws_itself(self, x: Any) -> Tensor | None:
        """The parameter whose probe block this engine draws itself (``None`` in ``vectors``), if any."""
        ...


class ProbeEstimator:
    """What every estimator is built from: the model (unwrapped), the loss, the probes.

    Args:
        model: the network the curvature pass runs (the module inside a DDP wrapper).
        loss_fn: ``loss_fn(model(x), y) -> scalar``, the task loss.
        params: the parameters H is taken over (default: the model's trainable ones, read on
            every call).
        probes: M >= 1 Hutchinson probes.
        dist: ``"rademacher"`` or ``"gaussian"``.
        generator: the probes' generator (``None``: torch's global one).
        dropout: keep dropout on in the curvature pass (default off, the paper's).
    """

    name: ClassVar[str] = ""
    argument: ClassVar[str] = "backend"  # the penalty's argument that names it
    shares: Share = Share.NOTHING
    supports: ClassVar[Support] = Support(autocast=True, compile=False, ddp=True, model_loss=False)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        params: Sequence[Tensor] | None = None,
        probes: int = 5,
        dist: Distribution = "rademacher",
        generator: torch.Generator | None = None,
        dropout: bool = False,
    ) -> None:
        check_probes(probes)
        check_distribution(dist)
        self.model = model
        self.loss_fn = loss_fn
        self.given_params = list(params) if params is not None else None
        self.probes = probes
        self.dist = dist
        self._generator = generator
        self.dropout = dropout

    @property
    def generator(self) -> torch.Generator | None:
        """The probes' generator (``None``: torch's global one), shared with :meth:`children`."""
        return self._generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self._generator = generator
        for child in self.children():
            child.generator = generator

    def children(self) -> tuple[ProbeEstimator, ...]:
        """The estimators this one computes with (they draw from its generator)."""
        return ()

    def parameters(self) -> list[Tensor]:
        """The parameters H is taken over: as given, else the model's trainable ones now."""
        if self.given_params is not None:
            return self.given_params
        return [p for p in self.model.parameters() if p.requires_grad]

    def refuse_params(self, params: Sequence[Tensor] | None) -> None:
        """For an estimator that penalises all the model's parameters: a ``ValueError`` for ``params``."""
        if params is not None:
            raise ValueError(f"{self.argument}={self.name!r} penalises all of the model's parameters: drop params")

    def curvature_pass(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The curvature pass's function (:func:`flatness.passes.curvature_pass`).

        Batch-statistics norms, running statistics untouched, dropout off unless ``dropout``.
        """
        return curvature_pass(self.model, dropout=self.dropout)

    def ready(self) -> Share:
        """What the next call takes from the task pass: all it declares, unless it says otherwise."""
        return self.shares

    def task_pass(self, x: Any, y: Any) -> TaskGradient:
        """The task pass for an estimator that takes the task gradient (this one does not)."""
        raise TypeError(f"the {self.name} estimator does not share the task gradient")

    def draws_itself(self, x: Any) -> Tensor | None:
        """The parameter whose probe block this engine draws itself: none (all are given)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the estimator needs to resume exactly (nothing, unless it says otherwise)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (other keys of ``state`` are ignored)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probes={self.probes}, dist={self.dist!r})"


def estimate(
    estimator: Estimator, x: Any, y: Any, shared: Shared | None = None, *, precision: PassPrecision | None = None
) -> Tensor:
    """``estimator(x, y, shared)`` with its declarations applied.

    An estimator that does not support autocast runs with it switched off, in the parameters'
    precision, and says so once per ``precision`` (:class:`flatness.precision.PassPrecision`; the
    caller's, e.g. a penalty's, else a new one).
    """
    params = estimator.parameters()
    device_type = params[0].device.type if params else "cpu"
    with (precision or PassPrecision())(device_type, estimator.supports.autocast, estimator.name):
        return estimator(x, y, shared)
