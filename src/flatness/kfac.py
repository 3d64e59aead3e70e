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

The loss must be the negative log-likelihood of those labels — cross-entropy over C >= 2 logits
(labels sampled from their softmax) or binary cross-entropy on one logit (labels from
Bernoulli(sigmoid)) — as the batch mean or the batch sum of the per-example terms; each call
checks it on the sampled labels (:func:`loss_scale`) and refuses any other loss (a regression
loss such as ``MSELoss`` has no such factors here). A summed loss is N times the mean, so its
Tr(H²) is N² times the mean's: the estimate is scaled by :attr:`KroneckerFactors.loss_scale`\ ².
Every trainable parameter must belong to a Linear layer (:data:`flatness.layers.LINEAR_TYPES`)
that runs once per forward pass.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .linear_io import SharedPrefix, input_gram, linear_calls
from .probes import categorical, make_generator

__all__ = ["KroneckerFactors", "kfac_sq_trace", "kronecker_factors", "loss_scale"]


def _predictive(logits: Tensor) -> Tensor:
    """The model's predictive distribution over class ids.

    Softmax of C >= 2 logits, or Bernoulli(sigmoid) over {0, 1} for one logit (binary
    cross-entropy).
    """
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
    output gradients at the sampled labels (N, m); ``bias``: whether ã has the bias's 1;
    ``loss_scale``: the loss over the batch mean of its per-example terms (1 for a mean, N for a
    sum): Tr(H²) ≈ loss_scale² · Σ_l Tr(A_l²)·Tr(G_l²).
    """

    module: nn.Module
    inputs: Tensor
    grads: Tensor
    bias: bool
    loss_scale: float = 1.0

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


# losses of torch's that are not a likelihood of class ids (refused before being evaluated on them)
_REGRESSION = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.GaussianNLLLoss, nn.PoissonNLLLoss)


def _check_tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def loss_scale(loss_fn: Callable[[Tensor, Any], Tensor], out: Tensor, labels: Tensor) -> tuple[Tensor, float]:
    """``(loss_fn(out, labels), c)``: the loss on sampled class ids and how it is reduced.

    c = 1 if it is the batch mean of their negative log-likelihood (cross-entropy of the logits, or
    binary cross-entropy of one logit), c = N if it is the sum (one host read of both values).

    Raises:
        ValueError: ``loss_fn`` is not that likelihood (e.g. ``MSELoss``, class weights, label
            smoothing, an added weight penalty), naming what it gave instead.
    """
    n = out.shape[0]
    refusal = ("backend='kfac' needs loss_fn to be the cross-entropy of the model's logits and class "
               "ids (their batch mean or sum)")
    if isinstance(loss_fn, _REGRESSION):
        raise ValueError(f"{refusal}; {type(loss_fn).__name__} is a regression loss, which it does not cover")
    try:
        loss = loss_fn(out, labels)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{refusal}; on sampled class ids it fails: {exc}") from None
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"{refusal}; it does not return a scalar")
    with torch.no_grad():
        if out.shape[1] == 1:
            nll = F.binary_cross_entropy_with_logits(out[:, 0], labels.to(out.dtype), reduction="sum")
        else:
            nll = F.cross_entropy(out, labels, reduction="sum")
    value, total = float(loss.detach()), float(nll)
    tol = _check_tolerance(out.dtype)
    slack = n * tol * (1.0 + float(out.detach().abs().max()))
    for scale in (1, n):  # the mean first: both hold for one example, where they are equal
        if math.isclose(value * (n / scale), total, rel_tol=tol, abs_tol=slack):
            return loss, float(scale)
    raise ValueError(
        f"{refusal}; on sampled class ids it gives {value:.6g} where the cross-entropy's batch mean "
        f"is {total / n:.6g} (a regression loss such as MSELoss is not covered)"
    )


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
            more than once, an output that is not (N, C) logits, or a loss that is not their
            cross-entropy (:func:`loss_scale`).
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
        loss, scale = loss_scale(loss_fn, out, labels)
        # the sum of the per-example losses: N × a batch mean (the summed loss itself)
        sampled = loss * out.shape[0] if scale == 1 else loss
        outputs = [c.output for c in calls]
        grads = torch.autograd.grad(
            sampled, outputs, create_graph=differentiable, allow_unused=True
        )
    factors = []
    for call, grad in zip(calls, grads, strict=True):
        if grad is None:
            grad = torch.zeros_like(call.output)
        if call.rows is not None:
            grad = grad[: call.rows]
        inputs = call.inputs if differentiable else call.inputs.detach()
        factors.append(
            KroneckerFactors(
                call.module, inputs, grad.reshape(-1, grad.shape[-1]),
                getattr(call.module, "bias", None) is not None, scale,
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
    """c² · Σ_l Tr(A_l²)·Tr(G_l²), a differentiable scalar.

    See :func:`kronecker_factors`; c = :attr:`KroneckerFactors.loss_scale`, 1 for a batch-mean loss.
    """
    factors = kronecker_factors(model, loss_fn, x, y, generator=generator, seed=seed, prefix=prefix)
    total = torch.stack([f.sq_trace_a() * f.sq_trace_g() for f in factors]).sum()
    scale = factors[0].loss_scale if factors else 1.0
    return total if scale == 1 else total * scale**2
