r"""Closed-form, layer-by-layer Tr(H²) estimate for stacks of Linear layers and activations.

Same estimate as :func:`flatness.sq_trace` (same probes give the same number up to rounding, and
the same gradient), computed with the structure of the network instead of generic double
backward — BackPACK-style. For a probe v, H v is the directional derivative of the gradient,
ġ = d/dε ∇L(θ + εv). Propagating tangents through the explicit backward pass of an MLP gives,
for a Linear layer with input X, output pre-activation Z = X Wᵀ + b and back-propagated signal
δ = ∂L/∂Z:

.. math::

    (Hv)_W = \dot\delta^\top X + \delta^\top \dot X, \qquad (Hv)_b = \textstyle\sum_i \dot\delta_i,

with the tangents Ż = Ẋ Wᵀ + X V_Wᵀ + v_b, Ẋ = σ'(Z)⊙Ż, δ̇ = σ'(Z)⊙(δ̇_next W + δ_next V)
+ σ''(Z)⊙Ż⊙(δ_next W), and δ̇ at the output = (∂²L/∂out²)·Ż_out by autograd (any loss).
For the input layer Ẋ = 0, so ‖(Hv)_W‖² = ⟨δ̇ δ̇ᵀ, X Xᵀ⟩: the B×B Gram matrix of the data
replaces the d_out×d_in product. The only per-probe work on the wide input layer is X V_Wᵀ, a
constant that needs no backward. Autograd then differentiates the result (the penalty's
third-order gradient) through these small tensors.

Supported: :class:`torch.nn.Sequential` of ``Linear``, ``ReLU``, ``LeakyReLU``, ``Tanh``,
``Sigmoid``, ``Identity``, ``Flatten`` and ``Dropout`` (identity in eval mode, the paper's
curvature pass) on a dense input; any loss of the model output. :func:`supports` tells.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness import sample_probes, sq_trace
    >>> from flatness.layerwise import layerwise_sq_trace
    >>> model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    >>> x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> params = list(model.parameters())
    >>> v = sample_probes(params, 3, seed=0)
    >>> fast = layerwise_sq_trace(model, loss_fn, x, y, probe_vectors=v)
    >>> slow = sq_trace(loss_fn(model(x), y), params, probe_vectors=v)
    >>> bool(torch.isclose(fast, slow, rtol=1e-10))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .probes import Distribution, sample_probes

__all__ = ["supports", "layerwise_sq_trace"]

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)
_IDENTITY = (nn.Identity, nn.Dropout, nn.Flatten)


def supports(model: nn.Module, x: Any, params: Sequence[Tensor] | None = None) -> bool:
    """Whether :func:`layerwise_sq_trace` applies to ``model`` on input ``x``.

    Needs a ``Sequential`` of supported modules with at least one ``Linear``, a dense tensor
    input, Flatten only before the first Linear, Dropout evaluated in eval mode, and ``params``
    (if given) exactly the model's parameters that require grad, all of them trainable.
    """
    if not isinstance(model, nn.Sequential) or not isinstance(x, Tensor) or x.layout != torch.strided:
        return False
    seen_linear = False
    for m in model:
        if isinstance(m, nn.Linear):
            seen_linear = True
        elif isinstance(m, nn.Flatten):
            if seen_linear:
                return False
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:
                return False
        elif not isinstance(m, _ELEMENTWISE + _IDENTITY):
            return False
    if not seen_linear:
        return False
    model_params = list(model.parameters())
    if not all(p.requires_grad for p in model_params):
        return False
    if params is not None:
        given = list(params)
        if len(given) != len(model_params) or any(a is not b for a, b in zip(given, model_params)):
            return False
    return True


def _act_derivatives(m: nn.Module, z: Tensor, out: Tensor) -> tuple[Tensor, Tensor | None]:
    """σ'(z) and σ''(z) (None where it is zero almost everywhere) of an elementwise module."""
    if isinstance(m, nn.ReLU):
        return (z > 0).to(z.dtype), None
    if isinstance(m, nn.LeakyReLU):
        slope = m.negative_slope
        return (z > 0).to(z.dtype) * (1 - slope) + slope, None
    if isinstance(m, nn.Tanh):
        d1 = 1 - out * out
        return d1, -2 * out * d1
    if isinstance(m, nn.Sigmoid):
        d1 = out * (1 - out)
        return d1, d1 * (1 - 2 * out)
    raise TypeError(f"unsupported module {type(m).__name__}")


@dataclass
class _Linear:
    module: nn.Linear
    x: Tensor  # layer input (B, d_in)
    x_dot: Tensor | None = None  # its tangent (M, B, d_in); None where the input is the data


@dataclass
class _Act:
    d1: Tensor  # σ'(z)
    d2: Tensor | None  # σ''(z), None where it vanishes almost everywhere
    z_dot: Tensor | None = None  # tangent of the activation's input z


def _frobenius_sq(u: Tensor, x: Tensor, g: Tensor | None, x_dot: Tensor | None) -> Tensor:
    """Σ_j ‖u_jᵀ x + gᵀ x_dot_j‖²_F by the cheaper of the explicit and the Gram route.

    u: (M, B, d_out), x: (B, d_in), g: (B, d_out), x_dot: (M, B, d_in). The Gram route uses
    ‖UᵀV‖² = ⟨U Uᵀ, V Vᵀ⟩ with U = [u; g], V = [x; x_dot] stacked over the batch, which costs
    O(B²(d_in + d_out)) per probe instead of O(B d_in d_out).
    """
    m, b, d_out = u.shape
    d_in = x.shape[1]
    if x_dot is None:
        if b * d_in + m * b * d_out < m * d_out * d_in:
            return (torch.matmul(u, u.transpose(1, 2)) * (x @ x.T)).sum()
        return torch.linalg.vector_norm(torch.matmul(u.transpose(1, 2), x)).square()
    assert g is not None
    if 2 * b * (d_in + d_out) < d_out * d_in:
        uu = torch.cat([u, g.expand(m, b, d_out)], dim=1)
        vv = torch.cat([x.expand(m, b, d_in), x_dot], dim=1)
        return (torch.matmul(uu, uu.transpose(1, 2)) * torch.matmul(vv, vv.transpose(1, 2))).sum()
    hv = torch.matmul(u.transpose(1, 2), x) + torch.matmul(g.T, x_dot)
    return torch.linalg.vector_norm(hv).square()


def layerwise_sq_trace(
    model: nn.Sequential,
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Tensor,
    y: Any,
    probes: int = 5,
    dist: Distribution = "rademacher",
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    probe_vectors: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""(1/M) Σ_j ‖H v_j‖² for ``loss_fn(model(x), y)``, differentiable w.r.t. the parameters.

    The model is run as it is (call it inside :func:`flatness.eval_mode` for the paper's
    dropout-off curvature pass). Probes are drawn exactly as :func:`flatness.sample_probes` draws
    them for ``list(model.parameters())``, so a seed gives the same estimate on both paths.
    """
    if not supports(model, x):
        raise ValueError(
            "layerwise_sq_trace needs an nn.Sequential of Linear/ReLU/LeakyReLU/Tanh/Sigmoid/"
            "Identity/Flatten/eval-mode Dropout on a dense input; use flatness.sq_trace instead"
        )
    params = list(model.parameters())
    if probe_vectors is None:
        probe_vectors = sample_probes(params, probes, dist, generator=generator, seed=seed)
    vec_of = {id(p): v for p, v in zip(params, probe_vectors)}
    num = probe_vectors[0].shape[0]

    # Primal forward, keeping what the explicit backward needs.
    records: list[_Linear | _Act | None] = []
    h = x
    for m in model:
        if isinstance(m, nn.Linear):
            records.append(_Linear(m, h))
            h = m(h)
        elif isinstance(m, _ELEMENTWISE):
            z = h
            h = m(z)
            records.append(_Act(*_act_derivatives(m, z, h)))
        else:  # Dropout (eval), Identity: identity; Flatten: only before the first Linear
            h = m(h)
            records.append(None)
    out = h
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss must be a scalar tensor; reduce it (e.g. mean)")
    (g,) = torch.autograd.grad(loss, out, create_graph=True)  # ∂L/∂out, (B, d)

    # Tangent forward along the M probes: Ż = Ẋ Wᵀ + X V_Wᵀ + v_b, Ẋ = σ'(Z) ⊙ Ż.
    t: Tensor | None = None  # None: the tangent is zero (we are still at the data)
    for m, rec in zip(model, records):
        if isinstance(rec, _Linear):
            rec.x_dot = t
            tz = torch.matmul(rec.x, vec_of[id(m.weight)].transpose(1, 2))  # constant on layer 1
            if t is not None:
                tz = tz + torch.matmul(t, m.weight.T)
            if m.bias is not None:
                tz = tz + vec_of[id(m.bias)].unsqueeze(1)
            t = tz
        elif isinstance(rec, _Act):
            rec.z_dot = t
            t = rec.d1 * t
    # δ̇ at the output: the loss Hessian w.r.t. the output applied to Ż_out (any loss).
    (t_grad,) = torch.autograd.grad(g, out, grad_outputs=t, create_graph=True, is_grads_batched=True)

    # Explicit backward of the primal (g) and tangent (t_grad) signals, summing ‖(Hv_j)‖².
    total = torch.zeros((), dtype=out.dtype, device=out.device)
    for rec in reversed(records):
        if isinstance(rec, _Act):
            new_t = rec.d1 * t_grad  # δ̇ = σ'(Z)⊙ġ + σ''(Z)⊙Ż⊙g
            if rec.d2 is not None:
                new_t = new_t + rec.d2 * rec.z_dot * g
            t_grad, g = new_t, rec.d1 * g
        elif isinstance(rec, _Linear):
            lin = rec.module
            # (Hv)_W = δ̇ᵀ X + δᵀ Ẋ,  (Hv)_b = Σ_i δ̇_i
            total = total + _frobenius_sq(t_grad, rec.x, g, rec.x_dot)
            if lin.bias is not None:
                total = total + torch.linalg.vector_norm(t_grad.sum(1)).square()
            if rec.x_dot is None:  # the input is the data: nothing below needs a signal
                break
            t_grad = torch.matmul(t_grad, lin.weight) + torch.matmul(g, vec_of[id(lin.weight)])
            g = g @ lin.weight
    return total / num
