r"""The model as a function of its parameters, averaged over a data set.

Every measure and landscape evaluates a loss averaged over *all* batches of a data set,

.. math:: L(\theta) = \sum_b \frac{|b|}{N} \, \ell_b(\theta),

where ``loss_fn`` returns each batch's mean loss, and evaluates it at *other* parameters
θ + δ with :func:`torch.func.functional_call`, so the user's model is never written to.

These helpers run the model as it is; the measures put it in the measured function first
(:func:`flatness.passes.measure_pass`: ``"deployed"`` = eval mode, the default, or
``"batch_stats"`` = BatchNorm on each batch's statistics), e.g.
``with measure_pass(model, "batch_stats"): loss_at(model, ...)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures.functional import collect_batches, loss_at, trainable_params
    >>> model = nn.Linear(3, 2)
    >>> batches = collect_batches([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    >>> theta = trainable_params(model)
    >>> zero = {name: torch.zeros_like(p) for name, p in theta.items()}
    >>> round(float(loss_at(model, nn.functional.cross_entropy, batches, zero)), 4)  # log 2 at θ=0
    0.6931
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..batch_loss import BatchLoss, ModelLoss, output_is_loss
from ..utils import FlatnessError, batch_size

__all__ = [
    "LossFn",
    "Batch",
    "collect_batches",
    "trainable_params",
    "select_params",
    "call_at",
    "loss_at",
    "evaluate_at",
    "require_finite",
    "model_loss_args",
    "accepts_model_loss",
]

LossFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch and its weight ``|b| / N`` in the data-set average."""

    x: Any
    y: Any
    weight: float


def collect_batches(batches: Iterable[tuple[Any, Any]]) -> list[Batch]:
    """Materialise an iterable of ``(x, y)`` batches (it is traversed many times) with weights.

    Raises:
        FlatnessError: the iterable yields no batch, or a batch is not an ``(x, y)`` pair.
    """
    if isinstance(batches, list) and batches and all(isinstance(b, Batch) for b in batches):
        return batches
    pairs = []
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise FlatnessError("batches must yield (inputs, targets) pairs")
        pairs.append((item[0], item[1], batch_size(item[0])))
    total = sum(n for _, _, n in pairs)
    if total == 0:
        raise FlatnessError("no data: the batches hold no examples")
    return [Batch(x, y, n / total) for x, y, n in pairs]


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters that require grad, by name, detached (read-only views)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise FlatnessError("the model has no parameters that require grad")
    return params


def select_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs for ``params`` (default: all trainable ones) of ``model``.

    Raises:
        FlatnessError: a tensor is not a parameter of ``model`` or does not require grad.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        if not named:
            raise FlatnessError("the model has no parameters that require grad")
        return named
    by_id = {id(p): n for n, p in named}
    chosen = []
    for p in params:
        if id(p) not in by_id:
            raise FlatnessError("params must be trainable parameters of the model")
        chosen.append((by_id[id(p)], p))
    if not chosen:
        raise FlatnessError("params is empty")
    return chosen


def call_at(model: nn.Module, params: Mapping[str, Tensor], x: Any) -> Tensor:
    """``model(x)`` with the named parameters replaced by ``params`` (others and buffers kept)."""
    if isinstance(x, tuple):
        return functional_call(model, dict(params), x)
    if isinstance(x, dict):
        return functional_call(model, dict(params), (), x)
    return functional_call(model, dict(params), (x,))


def loss_at(
    model: nn.Module, loss_fn: LossFn, batches: list[Batch], params: Mapping[str, Tensor]
) -> Tensor:
    """L(θ) averaged over all batches, at parameters ``params`` (differentiable in them)."""
    total: Tensor | float = 0.0
    for b in batches:
        total = total + b.weight * loss_fn(call_at(model, params, b.x), b.y)
    assert isinstance(total, Tensor)
    return total


@torch.no_grad()
def evaluate_at(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    params: Mapping[str, Tensor],
    metric: Callable[[Tensor, Any], Tensor] | None = None,
) -> tuple[float, float]:
    """(loss, metric) averaged over all batches at ``params``; metric is NaN without ``metric``.

    ``metric(logits, y)`` returns a batch mean (e.g. accuracy). Non-finite values are returned
    as they are: callers decide whether to raise or to mark the point.
    """
    loss = 0.0
    value = 0.0
    for b in batches:
        out = call_at(model, params, b.x)
        loss += b.weight * float(loss_fn(out, b.y))
        if metric is not None:
            value += b.weight * float(metric(out, b.y))
    return loss, (value if metric is not None else math.nan)


def require_finite(value: float, what: str) -> float:
    """``value``, or a :class:`FlatnessError` naming ``what`` when it is NaN or infinite."""
    if not math.isfinite(value):
        raise FlatnessError(f"{what} is not finite ({value}); is the checkpoint diverged?")
    return value


def model_loss_args(model: nn.Module, loss_fn: Any, batches: Any) -> tuple[nn.Module, Any, Any]:
    """For a :class:`flatness.ModelLoss`: the model and loss as one module; otherwise the arguments unchanged.

    The loss is that module's output, and the whole batches are its weighted inputs
    (:mod:`flatness.batch_loss`); ``batches`` is then an iterable of whole batches (e.g. dicts).
    """
    if not isinstance(loss_fn, ModelLoss):
        return model, loss_fn, batches
    if isinstance(batches, Mapping):
        raise FlatnessError("batches must be an iterable of batches (e.g. a list of dicts), got one dict")
    whole = list(batches)
    sizes = [loss_fn.size_of(b) for b in whole]
    total = sum(sizes)
    if total == 0:
        raise FlatnessError("no data: the batches hold no examples")
    weighted = [Batch((b,), None, n / total) for b, n in zip(whole, sizes, strict=True)]
    return BatchLoss(model, loss_fn), output_is_loss, weighted


def accepts_model_loss(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a measure ``fn(model, loss_fn, batches, ...)``.

    The measure then also takes a :class:`flatness.ModelLoss` with any batches
    (:func:`model_loss_args`).
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        if isinstance(a.get("loss_fn"), ModelLoss):
            a["model"], a["loss_fn"], a["batches"] = model_loss_args(a["model"], a["loss_fn"], a["batches"])
            if a.get("initial") is not None:  # the user's names → the adapted module's
                a["initial"] = prefixed(a["initial"])
            options = a.get("options")
            if options is not None and getattr(options, "initial", None) is not None:
                a["options"] = dataclasses.replace(options, initial=prefixed(options.initial))
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def prefixed(initial: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Initial weights (a module or state dict) under :class:`flatness.batch_loss.BatchLoss`'s names.

    The names are ``model.<name>``.
    """
    state = initial.state_dict() if isinstance(initial, nn.Module) else initial
    return {f"model.{k}": v for k, v in state.items()}
