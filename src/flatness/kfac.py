r"""K-FAC estimate of Tr(H²): per Linear layer, Tr(A_l²)·Tr(G_l²), differentiable.

Kronecker-factored approximate curvature (Martens & Grosse, 2015) approximates the Fisher (for
cross-entropy, the generalised Gauss-Newton part of the Hessian) of layer l by a Kronecker
product, and the Hessian by its layer-diagonal blocks:

.. math::

    H_l \approx A_l \otimes G_l, \qquad
    A_l = \frac{1}{N}\sum_i \tilde a_i \tilde a_i^\top, \qquad
    G_l = \frac{1}{N}\sum_i g_i g_i^\top, \qquad
    g_i = \frac{\partial \ell(z_i, \hat y_i)}{\partial s_{l,i}}, \quad \hat y_i \sim \operatorname{softmax}(z_i),

with :math:`\tilde a_i = [a_i, 1]` the layer's input row, :math:`s_{l,i}` its output (the
pre-activation), :math:`z_i` the model's logits and labels *sampled* from the model's predictive
distribution (the true Fisher, not the empirical one). Since
:math:`\operatorname{Tr}((A \otimes G)^2) = \operatorname{Tr}(A^2)\operatorname{Tr}(G^2)`,

.. math::

    \operatorname{Tr}(H^2) \approx \sum_l \operatorname{Tr}(A_l^2)\,\operatorname{Tr}(G_l^2),
    \qquad \operatorname{Tr}(A^2) = \tfrac{1}{N^2}\lVert \tilde A^\top \tilde A\rVert_F^2
    = \tfrac{1}{N^2}\lVert \tilde A \tilde A^\top\rVert_F^2,

each factor by the cheaper of its d×d and N×N Gram matrices. One forward pass and one backward
pass to the layer outputs (not to the weights), no probes and no Hessian-vector product; the
sampled labels are held fixed when the value is differentiated.

The loss is taken to be a batch mean of per-example losses of the logits and class ids:
cross-entropy over C >= 2 logits (labels sampled from their softmax) or binary cross-entropy on
one logit (labels from Bernoulli(sigmoid)); every trainable parameter must belong to a Linear layer
(:data:`flatness.layers.LINEAR_TYPES`) that runs once per forward pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.kfac import kfac_sq_trace, kronecker_factors
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> value = kfac_sq_trace(model, nn.CrossEntropyLoss(), x, y, seed=0)
    >>> value.requires_grad  # differentiable: a training penalty
    True
    >>> layers = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, seed=0)
    >>> by_layer = sum(f.sq_trace_a() * f.sq_trace_g() for f in layers)
    >>> bool(torch.isclose(value, by_layer))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .linear_io import SharedPrefix, input_gram, linear_calls
from .probes import categorical, make_generator

__all__ = ["KroneckerFactors", "kfac_sq_trace", "kronecker_factors"]


def _predictive(logits: Tensor) -> Tensor:
    """The model's predictive distribution over class ids: softmax of C >= 2 logits, or
    Bernoulli(sigmoid) over {0, 1} for one logit (binary cross-entropy)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return logits.softmax(dim=1)


def _sq_frobenius_of_second_moment(rows: Tensor) -> Tensor:
    """‖RᵀR‖²_F for dense rows R (N, d), by the cheaper of RᵀR (d×d) and R Rᵀ (N×N)."""
    gram = rows.T @ rows if rows.shape[1] < rows.shape[0] else rows @ rows.T
    return gram.square().sum()


@dataclass
class KroneckerFactors:
    """One Linear layer's K-FAC factors on a batch, as rows: A = ÃᵀÃ/N, G = ΓᵀΓ/N.

    ``inputs``: the layer's input rows (N, n), dense or sparse; ``grads``: Γ, the per-example
    output gradients at the sampled labels (N, m); ``bias``: whether ã has the bias's 1.
    """

    module: nn.Module
    inputs: Tensor
    grads: Tensor
    bias: bool

    @property
    def rows(self) -> int:
        """N, the number of rows (examples) of the factors."""
        return int(self.grads.shape[0])

    def sq_trace_a(self) -> Tensor:
        """Tr(A²)."""
        n = self.rows
        if self.inputs.layout == torch.strided and self.inputs.shape[1] + self.bias < n:
            a = self.inputs
            if self.bias:
                a = torch.cat([a, a.new_ones(n, 1)], dim=1)
            return _sq_frobenius_of_second_moment(a) / n**2
        return input_gram(self.inputs, self.bias).square().sum() / n**2

    def sq_trace_g(self) -> Tensor:
        """Tr(G²)."""
        return _sq_frobenius_of_second_moment(self.grads) / self.rows**2


def kronecker_factors(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Any,
    y: Any = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    prefix: SharedPrefix | None = None,
) -> list[KroneckerFactors]:
    """The factors of every Linear layer of ``model`` on the batch ``x`` (graphs kept).

    ``y`` is not used: the labels are sampled from the softmax of the model's output (seeding
    as in :mod:`flatness.probes`). Run the model in the mode the curvature pass needs;
    ``prefix`` (:func:`flatness.linear_io.share_prefix`) starts the pass from the task forward's
    mode-independent prefix.

    Raises:
        ValueError: a trainable parameter outside the Linear layers, a Linear layer that runs
            more than once, or an output that is not (N, C) logits.
    """
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():  # Γ needs autograd; under no_grad the factors come back detached
        out, calls = linear_calls(model, x, prefix)
        modules = [c.module for c in calls]
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("K-FAC needs every Linear layer to run once per forward pass")
        covered = {id(p) for m in modules for p in m.parameters()}
        uncovered = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if uncovered:
            raise ValueError(f"K-FAC covers Linear layers only; not covered: {uncovered}")
        if out.dim() != 2:
            raise ValueError(f"K-FAC needs (N, C) logits, got an output of shape {tuple(out.shape)}")
        labels = categorical(_predictive(out.detach()), make_generator(seed, generator))
        # the loss is a batch mean: N × it is the sum of the per-example losses
        sampled = loss_fn(out, labels) * out.shape[0]
        outputs = [c.output for c in calls]
        grads = torch.autograd.grad(
            sampled, outputs, create_graph=differentiable, allow_unused=True
        )
    factors = []
    for call, grad in zip(calls, grads):
        if grad is None:
            grad = torch.zeros_like(call.output)
        if call.rows is not None:
            grad = grad[: call.rows]
        inputs = call.inputs if differentiable else call.inputs.detach()
        factors.append(
            KroneckerFactors(
                call.module, inputs, grad.reshape(-1, grad.shape[-1]),
                getattr(call.module, "bias", None) is not None,
            )
        )
    return factors


def kfac_sq_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Any,
    y: Any = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    prefix: SharedPrefix | None = None,
) -> Tensor:
    """Σ_l Tr(A_l²)·Tr(G_l²), a differentiable scalar (see :func:`kronecker_factors`)."""
    factors = kronecker_factors(model, loss_fn, x, y, generator=generator, seed=seed, prefix=prefix)
    return torch.stack([f.sq_trace_a() * f.sq_trace_g() for f in factors]).sum()
