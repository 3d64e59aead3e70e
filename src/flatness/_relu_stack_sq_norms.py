r"""Per-example ‖∇θ ℓ_i‖² of a ReLU stack with cross-entropy, with the explicit backward.

The curvature method's fast path (:mod:`flatness.methods.curvature`) for the models the paper
trains: a Sequential that opens with ``Linear, ReLU`` (the prefix the task pass shares,
:func:`flatness.linear_io.share_prefix`) and continues with Linear layers, each but the last
followed by ReLU, with Dropout anywhere (off: the curvature pass), under
``nn.CrossEntropyLoss`` of class indices. For the per-example loss ℓ_i, Linear layer l's input
a_{l-1,i} and the gradient δ_{l,i} = ∂ℓ_i/∂z_{l,i} at its output (Geng et al. eq. 12),

.. math::

    \lVert \nabla_\theta \ell_i \rVert^2 = \sum_l \lVert \delta_{l,i} \rVert^2
        \bigl(\lVert a_{l-1,i} \rVert^2 + 1\bigr), \qquad
    \delta_L = \operatorname{softmax}(z_L) - e_{y}, \quad
    \delta_{l-1} = (\delta_l W_l) \odot \mathbb 1[z_{l-1} > 0].

The generic engine (:func:`flatness.per_example.closed_form_sq_grad_norms`) gets the same values
by a δ-pass and the norms' gradient by double backward through autograd's graph of both;
here both directions are written out as one :class:`torch.autograd.Function`, so a step runs
the matrix products the formulation needs and little else (``flatness bench methods``:
``curvature_ratio`` against ``curvature_products_floor_ratio``). The backward runs the
δ recursion's adjoint upwards and then the forward pass's adjoint downwards; each layer's two
weight-gradient products accumulate into one tensor.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness._relu_stack_sq_norms import relu_stack_layers, relu_stack_sq_norms
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> shared = model[1](model[0](x))  # the task pass's prefix output
    >>> layers = relu_stack_layers(model, 2, nn.CrossEntropyLoss())
    >>> relu_stack_sq_norms(layers, x, shared, y).shape
    torch.Size([5])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["relu_stack_layers", "relu_stack_sq_norms"]


def _no_hooks(module: nn.Module) -> bool:
    """Whether nothing hooks ``module``'s forward: the fast path does not call the modules."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def relu_stack_layers(model: nn.Module, prefix_length: int, loss_fn: Any) -> list[nn.Linear] | None:
    """The Linear layers of ``model`` if the fast path computes its curvature pass, else ``None``.

    ``model`` must be a plain Sequential opening with ``Linear, ReLU`` (``prefix_length`` 2, the
    shared prefix), then Linear layers each but the last followed by ReLU, Dropout anywhere, no
    hooks, every weight and bias present and trainable; ``loss_fn`` a plain
    ``nn.CrossEntropyLoss`` (no class weights, no label smoothing).
    """
    if type(model) is not nn.Sequential or prefix_length != 2 or not _no_hooks(model):
        return None
    if type(loss_fn) is not nn.CrossEntropyLoss or loss_fn.weight is not None or loss_fn.label_smoothing != 0:
        return None
    kinds = [type(m) for m in model if type(m) is not nn.Dropout]
    if kinds[:2] != [nn.Linear, nn.ReLU] or kinds[-1] is not nn.Linear or type(model[1]) is not nn.ReLU:
        return None
    if any(kinds[i] is not (nn.Linear if i % 2 == 0 else nn.ReLU) for i in range(len(kinds))):
        return None
    if not all(_no_hooks(m) for m in model):
        return None
    layers = [m for m in model if type(m) is nn.Linear]
    if any(m.bias is None or not (m.weight.requires_grad and m.bias.requires_grad) for m in layers):
        return None
    return layers


def _targets_delta(probs: Tensor, y: Tensor, ignore_index: int) -> Tensor:
    """δ_L = softmax − one-hot of y per row; zero for an ignored target (ℓ_i = 0 there)."""
    valid = y != ignore_index
    kept = valid.to(probs.dtype).unsqueeze(1)
    return probs.scatter_add(1, torch.where(valid, y, 0).unsqueeze(1), -kept) * kept


def _relu_backward(grad: Tensor, activation: Tensor) -> Tensor:
    """``grad`` where the ReLU's output is positive, else 0: ReLU's own backward kernel (no mask tensor)."""
    return torch.ops.aten.threshold_backward(grad, activation, 0)


class _ReluStackSqNorms(torch.autograd.Function):
    """Forward: the per-example norms from the shared output a₁; backward: their vector-Jacobian product."""

    @staticmethod
    def forward(ctx: Any, shared: Tensor, input_sq: Tensor, y: Tensor, ignore_index: int, *params: Tensor) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        acts = [shared]  # acts[j]: the input of weights[j], a ReLU's output
        for w, b in zip(weights, biases, strict=True):
            logits = torch.addmm(b, acts[-1], w.T)
            acts.append(logits.relu())
        acts.pop()  # the last layer's output has no ReLU: the logits
        probs = torch.softmax(logits, dim=1)
        deltas = [_targets_delta(probs, y, ignore_index)]
        for w, a in zip(reversed(weights), reversed(acts), strict=True):
            deltas.append(_relu_backward(deltas[-1] @ w, a))
        deltas.reverse()  # δ₁ (the prefix's Linear) ... δ_L
        in_sq = [input_sq] + [a.square().sum(dim=1) + 1 for a in acts]  # ‖a_{l-1}‖² + 1 per layer
        delta_sq = [d.square().sum(dim=1) for d in deltas]
        ctx.layers = len(weights)
        ctx.save_for_backward(probs, *acts, *deltas, *delta_sq, *in_sq, *weights)
        return sum(d * a for d, a in zip(delta_sq, in_sq, strict=True))  # type: ignore[return-value]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.layers
        probs, *saved = ctx.saved_tensors
        acts, deltas = saved[:n], saved[n : 2 * n + 1]
        delta_sq, in_sq, weights = saved[2 * n + 1 : 3 * n + 2], saved[3 * n + 2 : 4 * n + 3], saved[4 * n + 3 :]
        twice = 2 * grad
        # the δ recursion's adjoint, upwards: v = ∂/∂(δ_{l-1} before its ReLU mask), masked
        grad_w: list[Tensor] = []
        v = _relu_backward((twice * in_sq[0]).unsqueeze(1) * deltas[0], acts[0])
        for layer, w in enumerate(weights):
            grad_w.append(deltas[layer + 1].T @ v)
            v = torch.addcmul(v @ w.T, (twice * in_sq[layer + 1]).unsqueeze(1), deltas[layer + 1])
            if layer + 1 < n:
                v = _relu_backward(v, acts[layer + 1])
        g = probs * v  # through δ_L = softmax(z_L) − e_y: the softmax's Jacobian
        g = torch.addcmul(g, probs, g.sum(dim=1, keepdim=True), value=-1)
        # the forward pass's adjoint, downwards (‖a_{l-1}‖² enters through in_sq)
        grad_b: list[Tensor] = [g] * n
        for layer in range(n - 1, -1, -1):
            grad_w[layer].addmm_(g.T, acts[layer])
            grad_b[layer] = g.sum(dim=0)
            g = torch.addcmul(g @ weights[layer], (twice * delta_sq[layer + 1]).unsqueeze(1), acts[layer])
            if layer > 0:
                g = _relu_backward(g, acts[layer])
        params = [t for pair in zip(grad_w, grad_b, strict=True) for t in pair]
        return (g, None, None, None, *params)


def relu_stack_sq_norms(layers: Sequence[nn.Linear], x: Tensor, shared: Tensor, y: Tensor,
                        ignore_index: int = -100) -> Tensor:
    """‖∇θ ℓ_i‖² over all of ``layers``' weights and biases, shape (B,), differentiable.

    Args:
        layers: :func:`relu_stack_layers` of the model (the prefix's Linear first).
        x: the batch (B, n₀) the prefix ran on; its rows' norms enter the first layer's term.
        shared: the prefix's output a₁ = ReLU(x W₁ᵀ + b₁) from the task pass, with its graph
            (the norms' gradient reaches W₁ through it, in the task loss's backward).
        y: class indices (B,).
        ignore_index: the loss's ignored class index (ℓ_i = 0 for those rows).
    """
    input_sq = x.detach().square().sum(dim=1) + 1
    params = [t for m in layers[1:] for t in (m.weight, m.bias)]
    return _ReluStackSqNorms.apply(shared, input_sq, y, ignore_index, *params)
