r"""What the Linear layers of a model see in one forward pass: their input rows and outputs.

The closed-form curvature pieces built on Linear layers (the output layer's Hessian block of
:mod:`flatness.control_variate`, the Kronecker factors of :mod:`flatness.kfac`) need, per layer,
the input rows :math:`\tilde a_i = [a_i, 1]` and the output tensor (with its graph).
:func:`linear_calls` runs the model once with forward hooks held only for that call;
:func:`input_gram` is the N×N Gram matrix :math:`\tilde a_i^\top \tilde a_j` of the rows, for
dense or sparse inputs.

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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LINEAR_TYPES
from .utils import call_model

__all__ = ["LinearCall", "input_gram", "linear_calls"]


@dataclass
class LinearCall:
    """One call of a Linear layer: the module, its input rows (N, n) and its output (N, m)."""

    module: nn.Module
    inputs: Tensor
    output: Tensor


def linear_calls(model: nn.Module, x: Any) -> tuple[Tensor, list[LinearCall]]:
    """``model(x)`` and the calls of its Linear layers, in call order.

    Inputs and outputs keep their graphs; leading dimensions beyond the batch (tokens) are
    folded into the rows of ``inputs`` (the ``output`` is the tensor the layer returned).
    Hooks are registered for this call only and removed also when the forward pass raises.
    """
    calls: list[LinearCall] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        inputs = args[0]
        if inputs.layout == torch.strided:
            inputs = inputs.reshape(-1, inputs.shape[-1])
        calls.append(LinearCall(module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LINEAR_TYPES)]
    try:
        out = call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return out, calls


def input_gram(inputs: Tensor, bias: bool) -> Tensor:
    """K_ij = ã_i·ã_j for the rows of a Linear layer's input (ã = [a, 1] when it has a bias)."""
    dense = inputs.to_dense() if inputs.layout != torch.strided else inputs
    gram = dense @ dense.T
    return gram + 1 if bias else gram
