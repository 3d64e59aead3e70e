r"""A loss of the model and the whole batch, ``fn(model, batch) -> scalar``, for any batch.

The library's engines evaluate ``loss_fn(model(x), y)``. Models whose batches are not an
``(inputs, target)`` pair — a Hugging Face model takes a dict and computes its own loss,
``model(**batch).loss`` — declare their loss with :class:`ModelLoss`. One adapter,
:func:`adapt`, turns it into the ``(inputs, target)`` form every engine already runs: the model
and the loss become one module, :class:`BatchLoss` (``forward(batch) = fn(model, batch)``, the
same parameters), whose "output" is the loss itself, taken by :func:`output_is_loss`; the
inputs are the 1-tuple ``(batch,)`` (so that the engines, which unpack a tuple into positional
arguments and a dict into keywords, hand the batch over whole) and the target is ``None``
(:func:`as_pair`). Nothing is copied; the parameters are the model's.

Why a wrapper and not signature sniffing: ``loss_fn(a, b)`` has two arguments in both forms,
and a loss such as ``nn.CrossEntropyLoss()`` is a module, so neither arity nor the first
argument's type tells them apart reliably; ``ModelLoss(fn)`` says which form is meant.

The batch size B (the penalty's divisor) is the leading dimension of the batch's first tensor
(for a dict, its first value), or ``ModelLoss(fn, batch_size=...)``: a number, or a function of
the batch.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.batch_loss import ModelLoss, adapt
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(3, 2)
    ...     def forward(self, features, labels):
    ...         return nn.functional.cross_entropy(self.lin(features), labels)
    >>> model = Net()
    >>> loss = ModelLoss(lambda m, batch: m(**batch))
    >>> module, loss_fn = adapt(model, loss)
    >>> batch = {"features": torch.randn(4, 3), "labels": torch.tensor([0, 1, 1, 0])}
    >>> inputs, target = as_pair(batch)
    >>> bool(loss_fn(module(*inputs), target) == model(**batch))
    True
    >>> loss.size_of(batch)
    4
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .utils import FlatnessError, batch_size, unwrap

__all__ = [
    "ModelLoss", "BatchLoss", "adapt", "as_pair", "output_is_loss", "hf_loss", "batch_size_of", "adapt_wrapped",
    "call_pair",
]


class ModelLoss:
    """``fn(model, batch) -> scalar``, the batch-mean loss of ``model`` on ``batch``.

    Args:
        fn: the loss; it calls the model itself (e.g. ``lambda m, b: m(**b).loss``).
        batch_size: B, when the batch's first tensor does not lead with it: an int, or a
            function of the batch.
    """

    def __init__(
        self, fn: Callable[[nn.Module, Any], Tensor], batch_size: int | Callable[[Any], int] | None = None
    ) -> None:
        if not callable(fn):
            raise TypeError(f"ModelLoss needs a callable fn(model, batch), got {type(fn).__name__}")
        if batch_size is not None and not callable(batch_size) and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1 or a function of the batch, got {batch_size!r}")
        self.fn = fn
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar loss of ``model`` on the whole ``batch``."""
        return self.fn(model, batch)

    def size_of(self, batch: Any) -> int:
        """B for ``batch``: the override, else the leading dimension of its first tensor."""
        if self.batch_size is None:
            try:
                return batch_size(batch)
            except (TypeError, ValueError) as exc:
                raise FlatnessError(
                    f"cannot tell the batch size of this batch ({exc}): give ModelLoss(fn, batch_size=...)"
                ) from None
        n = self.batch_size(batch) if callable(self.batch_size) else self.batch_size
        return int(n)

    def __repr__(self) -> str:
        return f"ModelLoss({getattr(self.fn, '__name__', self.fn)!r})"


def hf_loss(model: nn.Module, batch: Any) -> Tensor:
    """The Hugging Face convention: ``model(**batch).loss`` (the batch holds the labels)."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise FlatnessError("the model returned no loss: does the batch hold its labels?")
    return loss


class BatchLoss(nn.Module):
    """The model and a :class:`ModelLoss` as one module: ``forward(batch) = loss(model, batch)``.

    Its parameters, buffers and modes are the model's (it is the only submodule), so passes
    that set modes or freeze BatchNorm statistics on it act on the model.
    """

    def __init__(self, model: nn.Module, loss: ModelLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any) -> Tensor:
        """The wrapped model's loss on ``batch``, checked to be a scalar tensor."""
        value = self.loss(self.model, batch)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise FlatnessError(f"a ModelLoss must return a scalar tensor (the batch-mean loss), got {got}")
        return value


def output_is_loss(loss: Tensor, target: Any) -> Tensor:
    """The ``loss_fn`` of an adapted pair: the module's output already is the loss."""
    return loss


def adapt(model: nn.Module, loss_fn: Any) -> tuple[nn.Module, Callable[[Tensor, Any], Tensor]]:
    """The pair to call: ``(BatchLoss(model, loss_fn), output_is_loss)`` for a :class:`ModelLoss`.

    Otherwise the pair unchanged; the adapted pair is called with :func:`as_pair`'s inputs and
    target.
    """
    if isinstance(loss_fn, ModelLoss):
        return BatchLoss(model, loss_fn), output_is_loss
    return model, loss_fn


def as_pair(batch: Any) -> tuple[tuple[Any], None]:
    """``((batch,), None)``: a whole batch as the (inputs, target) of an adapted pair."""
    return (batch,), None


def batch_size_of(model: nn.Module, inputs: Any) -> int:
    """B of ``inputs`` for ``model``.

    A :class:`BatchLoss`'s inputs ``(batch,)`` by its :meth:`ModelLoss.size_of`, otherwise the
    leading dimension of the first tensor.
    """
    if isinstance(model, BatchLoss) and isinstance(inputs, tuple) and len(inputs) == 1:
        return model.loss.size_of(inputs[0])
    return batch_size(inputs)


def adapt_wrapped(model: nn.Module, loss_fn: Any) -> tuple[nn.Module, Any, nn.Module]:
    """:func:`adapt`, plus the module an out-of-place pass runs.

    Returns ``(model, loss_fn, local)`` with ``local`` the adapted :func:`flatness.utils.unwrap`-ped
    model: the module inside DDP's wrapper (the step's one ``backward()`` is all-reduced) and
    inside ``torch.compile``'s (the eager module: compiled code has no double backward).
    """
    adapted, fn = adapt(model, loss_fn)
    if isinstance(loss_fn, ModelLoss) and unwrap(model) is not model:
        return adapted, fn, BatchLoss(unwrap(model), loss_fn)
    return adapted, fn, unwrap(adapted)


def call_pair(model_loss: ModelLoss | None, x: Any, y: Any, what: str = "penalty") -> tuple[Any, Any]:
    """``(x, y)`` of a call ``what(x, y)``, or the whole batch ``x`` as :func:`as_pair`.

    The whole batch when the callee was built with a :class:`ModelLoss` (then ``what(batch)``).
    """
    if model_loss is not None:
        if y is not None:
            raise TypeError(f"a {what} built with a ModelLoss takes the whole batch: {what}(batch)")
        return as_pair(x)
    return x, y
