r"""Output margin (Jiang et al., 2019): a low percentile of the margins of the training examples.

.. math::

    \gamma_i = f(x_i)_{y_i} - \max_{j \ne y_i} f(x_i)_j, \qquad
    \gamma = q\text{-quantile of } \{\gamma_i\}, \qquad \mu_{\text{margin}} = 1/\gamma^2,

with q = 0.1 by default (Jiang et al. take the 10th percentile rather than the minimum, to be
robust to outliers). The quantile is the (⌊(m−1)q⌋ + 1)-th smallest of the m margins
(``torch.quantile`` with ``interpolation="lower"``; the 100th of 1,000 at q = 0.1). A model
with one output column is a binary classifier on the logit z (the two-class logits (0, z)):
γ_i = (2y_i − 1)·z_i. A misclassified example has γ_i ≤ 0;
:func:`zero_one_error` counts them (a tie counts as an error), as a batch-mean loss usable
wherever a ``loss_fn`` is expected.

The model runs in eval mode (dropout off); its modes are restored and its weights never written.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import output_margin
    >>> model = nn.Linear(2, 3, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(3, 2))
    >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    >>> m = output_margin(model, [(x, torch.tensor([0, 1, 0]))], quantile=0.5)
    >>> m.margins  # 2 - 0, 1 - 0, 1 - 3
    (2.0, 1.0, -2.0)
    >>> m.value, m.error
    (1.0, 0.3333333333333333)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import FlatnessError, call_model, eval_mode
from .functional import collect_batches

__all__ = ["Margin", "margins_of", "zero_one_error", "output_margin"]


@dataclass(frozen=True)
class Margin:
    """The q-quantile γ of the output margins and what it was computed from."""

    value: float
    quantile: float
    error: float
    num_examples: int
    margins: tuple[float, ...]

    @property
    def inverse_sq(self) -> float:
        """Jiang et al.'s margin measure 1/γ² (infinite at γ = 0)."""
        return math.inf if self.value == 0 else 1.0 / self.value**2


def margins_of(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example margins: correct logit minus the largest other one; (2y−1)·z for one column."""
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        z = logits.reshape(-1)
        return (2 * y.to(z.dtype).reshape(-1) - 1) * z
    if logits.dim() != 2:
        raise FlatnessError(f"margins need (N, C) logits, got shape {tuple(logits.shape)}")
    labels = y.long().reshape(-1, 1)
    correct = logits.gather(1, labels).squeeze(1)
    others = logits.scatter(1, labels, float("-inf"))
    return correct - others.max(dim=1).values


def zero_one_error(logits: Tensor, y: Tensor) -> Tensor:
    """Batch-mean 0-1 error (margin ≤ 0): the classification error as a ``loss_fn``."""
    return (margins_of(logits, y) <= 0).to(logits.dtype).mean()


def output_margin(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    quantile: float = 0.1,
) -> Margin:
    """The ``quantile`` of the output margins over all examples of ``batches`` (eval mode)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    data = collect_batches(batches)
    with eval_mode(model), torch.no_grad():
        margins = torch.cat([margins_of(call_model(model, b.x), b.y).double().cpu() for b in data])
    gamma = float(torch.quantile(margins, quantile, interpolation="lower"))
    error = float((margins <= 0).double().mean())
    return Margin(gamma, quantile, error, int(margins.numel()), tuple(margins.tolist()))
