r"""What the Linear layers of a model see in one forward pass: their input rows and outputs.

The closed-form curvature pieces built on Linear layers (the output layer's Hessian block of
:mod:`flatness.control_variate`, the Kronecker factors of :mod:`flatness.kfac`) need, per layer,
the input rows :math:`\tilde a_i = [a_i, 1]` and the output tensor (with its graph).
:func:`linear_calls` runs the model once with forward hooks held only for that call;
:func:`input_gram` is the N×N Gram matrix :math:`\tilde a_i^\top \tilde a_j` of the rows, for
dense or sparse inputs. :func:`share_prefix` lets such a pass reuse the task forward's leading
Linear/activation modules, whose values do not depend on train or eval mode; a :class:`PrefixSlot`
holds such a record from the task forward to the next curvature pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.linear_io import input_gram, linear_calls
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> out, calls = linear_calls(model, torch.randn(5, 3))
    >>> [c.module is m for c, m in zip(calls, (model[0], model[2]))], calls[-1].output is out
    ([True, True], True)
    >>> input_gram(calls[0].inputs, bias=True).shape
    torch.Size([5, 5])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LINEAR_TYPES
from .utils import call_model

__all__ = ["STALE_PREFIX", "LinearCall", "PrefixSlot", "SharedPrefix", "input_gram", "linear_calls", "share_prefix"]

STALE_PREFIX = (
    "penalty.sharing(): a backward pass or a parameter update came between the task forward and "
    "the penalty call, so the shared layers are recomputed (call the penalty before backward() and "
    "optimizer.step() to share them)"
)

# Modules whose output is the same in train and eval mode (Dropout only with p = 0).
_MODE_FREE = (*LINEAR_TYPES, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity, nn.Flatten)


@dataclass
class LinearCall:
    """One call of a Linear layer: the module, its input rows (N, n) and its output (N, m).

    ``passed_on`` is the tensor the forward pass continued with: ``output`` itself, or a copy of
    it when the model has in-place modules (which would otherwise overwrite ``output``). With
    ``rows`` set (a sub-batch of a shared prefix), ``output`` is the whole batch's tensor — what
    a gradient must be taken with respect to — and only its first ``rows`` rows are this call's.
    """

    module: nn.Module
    inputs: Tensor
    output: Tensor
    passed_on: Tensor | None = None
    rows: int | None = None  # only the first ``rows`` rows of ``output`` belong to this call

    def __post_init__(self) -> None:
        if self.passed_on is None:
            self.passed_on = self.output


def _has_inplace(model: nn.Module) -> bool:
    return any(getattr(m, "inplace", False) for m in model.modules())


def linear_calls(
    model: nn.Module, x: Any, prefix: SharedPrefix | None = None
) -> tuple[Tensor, list[LinearCall]]:
    """``model(x)`` and the calls of its Linear layers, in call order.

    Inputs and outputs keep their graphs; leading dimensions beyond the batch (tokens) are
    folded into the rows of ``inputs`` (the ``output`` is the tensor the layer returned). In a
    model with in-place modules (``ReLU(inplace=True)``) the pass continues with a copy of each
    output, so that ``output`` keeps the layer's values; and an input row tensor changed in place
    after the layer used it is refused (``ValueError``) rather than differentiated wrongly.
    Hooks are registered for this call only and removed also when the forward pass raises.
    With a ``prefix`` recorded on this same ``x`` (:func:`share_prefix`), only the rest of the
    model runs, from the prefix's output, and the prefix's calls come first.
    """
    if prefix is not None and prefix.output is not None and prefix.source is x:
        rest = model[prefix.length :]
        if not len(rest):
            return prefix.output, list(prefix.calls)
        out, calls = linear_calls(rest, prefix.output)
        return out, prefix.calls + calls
    calls: list[LinearCall] = []
    versions: list[tuple[Tensor, int]] = []
    copy = _has_inplace(model)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        inputs = args[0]
        if inputs.layout == torch.strided:
            versions.append((inputs, inputs._version))
            inputs = inputs.reshape(-1, inputs.shape[-1])
        passed_on = output.clone() if copy else output
        calls.append(LinearCall(module, inputs, output, passed_on))
        return passed_on if copy else None

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LINEAR_TYPES)]
    try:
        out = call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    if any(t._version != v for t, v in versions):
        raise ValueError("a Linear layer's input was changed in place after the layer used it")
    return out, calls


def input_gram(inputs: Tensor, bias: bool) -> Tensor:
    """K_ij = ã_i·ã_j for the rows of a Linear layer's input (ã = [a, 1] when it has a bias)."""
    dense = inputs.to_dense() if inputs.layout != torch.strided else inputs
    gram = dense @ dense.T
    return gram + 1 if bias else gram


def _prefix_length(model: nn.Module) -> int:
    """How many leading modules of a Sequential compute the same function in train and eval mode."""
    if type(model) is not nn.Sequential or model._forward_hooks or model._forward_pre_hooks:
        return 0  # a subclass may run its modules otherwise; hooks may change what they see
    length = 0
    for module in model:
        free = isinstance(module, _MODE_FREE) or (isinstance(module, nn.Dropout) and module.p == 0)
        if not free or list(module.children()):
            break
        length += 1
    return length


@dataclass
class SharedPrefix:
    """A forward pass's mode-independent prefix: its input, output and Linear calls.

    It is a cache of that forward pass, valid only while nothing it was computed from has
    changed: ``versions`` holds the version counters (``Tensor._version``, bumped by every
    in-place update such as ``optimizer.step()``) of the input and of the prefix's parameters
    when the layers ran, and ``consumed`` becomes true when a backward pass goes through its
    output (which frees the graph the curvature pass would extend). :meth:`stale` says whether
    either happened.
    """

    length: int
    source: Any = None
    output: Tensor | None = None
    calls: list[LinearCall] = field(default_factory=list)
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    consumed: list[bool] = field(default_factory=lambda: [False])  # shared with first_rows' views

    def stale(self) -> bool:
        """Whether the prefix no longer holds the current weights' values (or its graph)."""
        return self.consumed[0] or any(t._version != v for t, v in self.versions)

    def first_rows(self, source: Any) -> SharedPrefix:
        """The prefix of ``source``, a leading slice ``x[:n]`` of this prefix's batch-first input (a sub-batch).

        The prefix works sample by sample, so its values for those samples are the first rows of its
        own (of every Linear input's rows, ``n`` × its rows per sample).
        """
        empty = SharedPrefix(self.length)
        if self.output is None or not isinstance(self.source, Tensor) or not isinstance(source, Tensor):
            return empty
        whole = self.source
        if (
            source.layout != torch.strided or whole.layout != torch.strided
            or source.data_ptr() != whole.data_ptr() or source.shape[1:] != whole.shape[1:]
            or source.stride() != whole.stride() or source.shape[0] > whole.shape[0]
        ):
            return empty  # not a leading slice of the recorded input
        n, total = int(source.shape[0]), int(whole.shape[0])
        output = self.output[:n]
        calls = [
            LinearCall(
                c.module, c.inputs[: n * (c.inputs.shape[0] // total)], c.output,
                output if c.passed_on is self.output else c.passed_on[:n], n,
            )
            for c in self.calls
        ]
        return SharedPrefix(self.length, source, output, calls, self.versions, self.consumed)

    def first_linear_output(self, module: nn.Module) -> Tensor | None:
        """The output of ``module`` if it is the prefix's first Linear call (its rows of a sub-batch), else ``None``.

        This is what :func:`flatness.layerwise.layerwise_sq_trace` shares.
        """
        if self.output is None or not self.calls or self.calls[0].module is not module:
            return None
        call = self.calls[0]
        return call.output if call.rows is None else call.output[: call.rows]


@contextlib.contextmanager
def share_prefix(model: nn.Module) -> Iterator[SharedPrefix]:
    """Record the output of ``model``'s mode-independent prefix during the body's forward pass.

    The body's forward pass is e.g. the task loss's; the prefix is the leading Linear/activation
    modules of a Sequential, which give the same values with dropout on or off — so that a curvature
    pass (:mod:`flatness.kfac`, :mod:`flatness.control_variate`) can start there. The two passes
    then share the prefix's forward and, in the one backward of task loss + penalty, its weight
    gradients: for the paper's MLP, the 3072 × 512 input layer. Nothing is recorded for other models
    or for models with in-place modules (the pass then runs the whole model). The record is a cache:
    see :meth:`SharedPrefix.stale`.
    """
    prefix = SharedPrefix(0 if _has_inplace(model) else _prefix_length(model))
    if prefix.length == 0:
        yield prefix
        return
    last = model[prefix.length - 1]

    def start(module: nn.Module, args: tuple[Any, ...]) -> None:
        prefix.source, prefix.calls = args[0], []
        prefix.versions = [(args[0], args[0]._version)] if isinstance(args[0], Tensor) else []

    def linear(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        prefix.calls.append(LinearCall(module, args[0].reshape(-1, args[0].shape[-1]), output))
        prefix.versions += [(p, p._version) for p in module.parameters()]

    def mark_consumed(grad: Tensor) -> None:
        prefix.consumed[0] = True

    def end(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        prefix.output = output
        prefix.versions.append((output, output._version))
        if output.requires_grad:  # a backward through it frees the graph the pass would extend
            output.register_hook(mark_consumed)

    handles = [model[0].register_forward_pre_hook(start)]
    handles += [
        model[i].register_forward_hook(linear) for i in range(prefix.length) if isinstance(model[i], LINEAR_TYPES)
    ]
    handles.append(last.register_forward_hook(end))
    try:
        yield prefix
    finally:
        for handle in handles:
            handle.remove()


class PrefixSlot:
    """The prefix recorded by a task forward for the next curvature pass: taken once, used only while current.

    :meth:`record` around the task loss's forward pass, :meth:`take` at the next curvature pass. The
    prefix is used only by a pass on the very input tensor it was recorded on, and only while it is
    not :meth:`~SharedPrefix.stale` (else the pass recomputes it, with the :data:`STALE_PREFIX`
    warning, once per slot).
    """

    def __init__(self) -> None:
        self.prefix: SharedPrefix | None = None
        self._warned = False

    @contextlib.contextmanager
    def record(self, model: nn.Module) -> Iterator[None]:
        """Record ``model``'s prefix during the body's forward pass (:func:`share_prefix`), if the pass runs one."""
        with share_prefix(model) as prefix:
            yield
        if prefix.output is not None:
            self.prefix = prefix

    def take(self, source: Any) -> SharedPrefix | None:
        """The recorded prefix if it was recorded on ``source`` and holds the current weights; empties the slot."""
        prefix, self.prefix = self.prefix, None
        if prefix is None or prefix.source is not source:
            return None
        if prefix.stale():
            if not self._warned:
                self._warned = True
                warnings.warn(STALE_PREFIX, RuntimeWarning, stacklevel=3)  # at the penalty call's caller
            return None
        return prefix
