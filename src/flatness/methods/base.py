r"""The one :class:`Method` template: *where* the loss is evaluated, *what* is added, one driver.

Every training method is the same step, built from two kinds of pieces (optax style):

- a :class:`Point` says where the objective is evaluated and how its gradient becomes the
  update: :class:`Here` (at θ; plain training, FA, curvature, NRS, exact GNP), SAM's ascent
  point θ + ε̂ (:class:`flatness.methods.sam.AscentPoint`), GNP's finite-difference point
  (:class:`flatness.methods.gnp.FiniteDifferencePoint`, the far gradient mixed with the clean
  one), RPR's random neighbour θ + δθ (:class:`flatness.methods.nrs.RandomPoint`);
- :class:`Term`\ s are added to the task loss at that point: the FA penalty λ·Tr(H²)/B, the
  curvature penalty α·mean_i ‖∇ℓ_i‖², the gradient norm ρ‖∇L‖, NRS's α·KL + neighbour loss.

The shared driver :meth:`Method.step` does ``zero_grad``, lets the point run the passes (it
calls :meth:`Method.objective` = task loss + terms, one forward pass), and calls
``optimizer.step()`` exactly once. So methods **compose**: ``"sam+fa"`` is SAM's point with FA's
term — the SAM ascent from the task-loss gradient at θ, then the gradient of task loss + FA
penalty at θ + ε̂, θ restored, one optimizer step — configuration, not new code
(:mod:`flatness.methods.compose`, where :func:`make_method` looks names up; at most one
component may move the point).

**Passes and BatchNorm** (:mod:`flatness.passes`). The step's *main pass* is its first forward
pass (at θ; for RPR at θ + δθ, its only one): dropout draws the step's mask and BatchNorm
updates its running statistics, once per step, as in plain training. Every other pass is an
*extra pass* and leaves the running statistics bitwise unchanged while normalising with batch
statistics: perturbed passes (SAM, GNP, NRS's neighbour) replay the main pass's dropout mask
(the same sub-network; standard SAM implementations likewise freeze BN statistics in the
second pass), curvature passes (FA, curvature) turn dropout off and use the math attention
kernel.

A method class sets ``name`` (registry key), ``hparam`` (the strength swept in experiments,
or ``None``), ``default_grid`` (its default sweep) and ``protocol_defaults`` (the settings of
the experiments' default protocol, which run names leave implicit, e.g. FA's 5 probes every 10
steps), and for reports ``symbol`` (the strength's symbol, ``λ``) and ``twin`` (the settings
at which it *is* another method: ``{"method", "settings", "strength_equals", "why"}``, e.g. gnp
at ρ = its ``fd_radius`` is SAM); its ``__init__`` validates its hyper-parameters (clear ``ValueError``) and hands its
point and terms to :class:`Method`. Returned step values are for logging: Python floats, or
detached 0-d tensors (:func:`logged`) that the training loop converts once per epoch, so that a
step does not wait for the device: a step reads nothing on the host (``float()``, ``.item()``,
``bool()`` of a tensor; ``tests/test_methods_common.py`` checks every method), but for the FA
penalty's one read on a curvature step (its non-finite guard must decide before the update).

Example (a composed method, and a new term in a few lines):
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import Method, Term, logged, make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> both = make_method("sam+fa", model, nn.CrossEntropyLoss(), rho=0.05, lam=0.01, seed=0)
    >>> sorted(both.step(x, y, opt))
    ['loss', 'penalty', 'perturbed_loss', 'sq_trace']
    >>> class LogitPenalty(Term):  # β·mean ‖f(x)‖², evaluated wherever the point says
    ...     def __call__(self, ev, info):
    ...         value = ev.logits.square().sum(dim=1).mean()
    ...         info["logit_norm"] = logged(value)
    ...         return 0.1 * value
    >>> sorted(Method(model, nn.CrossEntropyLoss(), terms=[LogitPenalty()]).step(x, y, opt))
    ['logit_norm', 'loss']
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..batch_loss import BatchLoss, adapt, call_pair
from ..passes import frozen_running_stats
from ..utils import call_model, unwrap
from .perturb import RandomReplay, trainable_parameters

__all__ = [
    "Method",
    "Point",
    "Here",
    "Term",
    "Evaluation",
    "logged",
    "register_method",
    "METHODS",
]

LossFn = Callable[[Tensor, Any], Tensor]

METHODS: dict[str, type["Method"]] = {}


def signature_defaults(function: Any, names: Iterable[str]) -> dict[str, Any]:
    """``{name: default}`` of ``function``'s parameters among ``names`` that have a default."""
    params = inspect.signature(function).parameters
    return {n: params[n].default for n in names if n in params and params[n].default is not inspect.Parameter.empty}


def logged(value: Tensor) -> Tensor:
    """A step's logged value of ``value``: detached and in float64.

    What ``float(value)`` gave, without waiting for the device; the training loop reads the epoch's
    sum once.
    """
    return value.detach().double()


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available as ``make_method(cls.name, ...)``."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Evaluation:
    """The task loss at the step's current point, as the terms see it.

    ``main``: whether this is the step's main pass (see the module docs); ``replay`` replays
    the random state of the main pass (its dropout mask) for a term's own forward passes.
    """

    model: nn.Module
    loss_fn: LossFn
    x: Any
    y: Any
    params: list[Tensor]
    logits: Tensor
    loss: Tensor
    replay: RandomReplay
    main: bool


class Term:
    """An extra term of the objective, added to the task loss where the point evaluates it.

    ``__call__(evaluation, info)`` returns a differentiable scalar (or ``None`` for nothing)
    and may write logged floats into ``info``. Its own forward passes are extra passes (see the
    module docs). ``observe(model)`` is entered around the pass's forward (e.g. to record layer
    activations from it).
    """

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor | None:
        """The term's value on ``evaluation`` (``None``: nothing to add); logged floats go into ``info``."""
        raise NotImplementedError

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """A context entered around the pass's forward (default: none)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The term's state (e.g. an adaptive λ's), merged into :meth:`Method.state_dict`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (``state`` may hold other entries too)."""
        return None


class Point:
    """Where the objective is evaluated: ``run`` leaves the update's gradient in ``.grad``.

    It must leave the weights exactly as it found them (also when a pass raises), call
    ``method.objective`` for the objective's value at its point, and write ``info["loss"]``.
    """

    def run(self, method: "Method", x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """Run the step's passes for ``method`` on the batch; leave the gradient in ``.grad``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The point's state, merged into :meth:`Method.state_dict`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (``state`` may hold other entries too)."""
        return None


class Here(Point):
    """At θ itself: one main pass of task loss + terms, one ``backward()``."""

    def run(self, method: "Method", x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """The objective (task loss + terms) at θ, back-propagated in one ``backward()``."""
        replay = RandomReplay.capture(params)
        method.objective(x, y, params, replay, info, main=True).backward()


class Method:
    """One optimisation step: ``step(x, y, optimizer) -> {"loss": ..., ...}`` (module docs).

    Args:
        model: the network (possibly DDP-wrapped); its trainable parameters are updated.
        loss_fn: the task loss ``loss_fn(model(x), y) -> scalar``; or a
            :class:`flatness.ModelLoss` ``fn(model, batch)`` for any batch (dicts), with steps
            ``step(batch, optimizer)`` (:mod:`flatness.batch_loss`).
        point: where the objective is evaluated (default :class:`Here`).
        terms: extra objective terms.

    A step leaves the model's train/eval modes, its running statistics (but for the main
    pass's update) and its weights (but for the optimizer's update) as it found them, also when
    it raises.
    """

    name: ClassVar[str] = ""
    hparam: ClassVar[str | None] = None
    default_grid: ClassVar[tuple[float, ...]] = ()
    protocol_defaults: ClassVar[dict[str, Any]] = {}
    symbol: ClassVar[str | None] = None  # the strength's symbol in tables (hparam's name if None)
    twin: ClassVar[dict[str, Any] | None] = None  # see the module docs

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, point: Point | None = None,
        terms: Sequence[Term] = (),
    ) -> None:
        model, loss_fn = adapt(model, loss_fn)  # a ModelLoss: model and loss as one module
        self.model = model
        self.loss_fn = loss_fn
        self.point = point if point is not None else Here()
        self.terms = list(terms)

    @classmethod
    def keywords(cls) -> frozenset[str]:
        """The keyword arguments the constructor takes (besides ``model`` and ``loss_fn``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        skip = {"self", "model", "loss_fn"}
        return frozenset(
            p.name for p in params
            if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    @classmethod
    def accepts(cls, keyword: str) -> bool:
        """Whether the constructor takes ``keyword`` (:meth:`keywords`)."""
        return keyword in cls.keywords()

    @classmethod
    def keyword_defaults(cls) -> dict[str, Any]:
        """The default of each keyword argument that has one (what a run's record completes its settings with)."""
        return signature_defaults(cls.__init__, cls.keywords())

    def task_loss(self, x: Any, y: Any) -> Tensor:
        """``loss_fn(model(x), y)``, with graph, in the model's current mode."""
        return self.loss_fn(call_model(self.model, x), y)

    def objective(
        self, x: Any, y: Any, params: list[Tensor], replay: RandomReplay, info: dict[str, float],
        *, main: bool, loss_key: str | None = "loss",
    ) -> Tensor:
        """Task loss + terms at the current weights (one forward pass; ``main`` or extra).

        An extra pass replays ``replay``'s random state (the main pass's dropout mask) and
        leaves the running statistics unchanged. The task loss is logged as ``info[loss_key]``.
        """
        with contextlib.ExitStack() as stack:
            for term in self.terms:
                stack.enter_context(term.observe(self.model))
            if not main:
                stack.enter_context(frozen_running_stats(unwrap(self.model)))
                stack.enter_context(replay())
            logits = call_model(self.model, x)
        loss = self.loss_fn(logits, y)
        if loss_key is not None:
            info[loss_key] = loss.detach()  # no host synchronisation per step
        evaluation = Evaluation(self.model, self.loss_fn, x, y, params, logits, loss, replay, main)
        total = loss
        for term in self.terms:
            value = term(evaluation, info)
            if value is not None:
                total = total + value
        return total

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """One training step: ``zero_grad``, the point's passes, ``optimizer.step()``.

        Takes ``step(x, y, optimizer)``, or ``step(batch, optimizer)`` when the model is wrapped
        with a :class:`flatness.ModelLoss`. Returns the logged values (``"loss"`` and each
        term's), floats or detached 0-d tensors.
        """
        if isinstance(self.model, BatchLoss):
            if optimizer is None:
                optimizer, y = y, None
            x, y = call_pair(self.model.loss, x, y, "step")
        if optimizer is None:
            raise TypeError("step(x, y, optimizer): the optimizer is missing")
        params = trainable_parameters(self.model)
        optimizer.zero_grad(set_to_none=True)
        info: dict[str, float] = {}
        self.point.run(self, x, y, params, info)
        optimizer.step()
        return info

    def state_dict(self) -> dict[str, Any]:
        """The point's and the terms' state in one dict (saved with a checkpoint)."""
        state = dict(self.point.state_dict())
        for term in self.terms:
            state.update(term.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`."""
        self.point.load_state_dict(state)
        for term in self.terms:
            term.load_state_dict(state)


@register_method
class Plain(Method):
    """Ordinary training on the task loss (``--method none``)."""

    name = "none"
    hparam = None

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(model, loss_fn)

