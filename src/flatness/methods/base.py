"""The one interface every training method implements, and the method registry.

A method owns what happens inside one optimisation step on a mini-batch; the training loop
(:mod:`flatness.train`) only iterates over batches and calls :meth:`Method.step`. No method is
special-cased in the loop.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> method = make_method("fa", model, nn.CrossEntropyLoss(), lam=0.01, probes=2, seed=0)
    >>> info = method.step(torch.randn(8, 4), torch.randint(0, 3, (8,)), opt)
    >>> sorted(info)
    ['loss', 'penalty', 'sq_trace']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import call_model

__all__ = ["Method", "register_method", "make_method", "METHODS", "method_hparam"]

LossFn = Callable[[Tensor, Any], Tensor]

METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available as ``make_method(cls.name, ...)``."""
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, model: nn.Module, loss_fn: LossFn, **hparams: Any) -> "Method":
    """Build the method called ``name`` for ``model`` and ``loss_fn``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](model, loss_fn, **hparams)


def method_hparam(name: str) -> str | None:
    """The name of the method's main hyper-parameter (swept like λ), or None."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name].hparam


class Method:
    """One optimisation step: ``step(x, y, optimizer) -> {"loss": ..., ...}``.

    Subclasses set ``name`` (registry key) and ``hparam`` (the name of the strength swept in
    experiments, e.g. ``"lam"`` or ``"rho"``; ``None`` for none), validate their
    hyper-parameters in ``__init__`` (clear ``ValueError``) and implement :meth:`step`, which
    must zero gradients, compute, back-propagate and call ``optimizer.step()`` exactly once. A
    step must leave the model's train/eval modes as it found them and no perturbed weights
    behind, also when it raises. Returned values are for logging: Python floats or 0-d tensors
    (detached; the training loop converts those once per epoch, so a step need not wait for the
    device).
    """

    name: str = ""
    hparam: str | None = None

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn

    def task_loss(self, x: Any, y: Any) -> Tensor:
        return self.loss_fn(call_model(self.model, x), y)

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@register_method
class Plain(Method):
    """Ordinary training on the task loss (``--method none``)."""

    name = "none"
    hparam = None

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(x, y)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}
