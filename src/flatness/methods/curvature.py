r"""Curvature regularization (Geng et al.): task loss + α · mean per-example ‖∇θ ℓ_i‖².

.. math::

    \bar L_\mathcal{B}(\theta) = L_\mathcal{B}(\theta)
        + \alpha \, \frac{1}{B} \sum_{i=1}^{B} \lVert \nabla_\theta \ell_i \rVert^2
    \qquad \text{(eq. 11)}

The mean per-example squared gradient norm is the trace of the empirical Fisher, a proxy for
Tr(H) near a minimum (eq. 9). For a ``nn.Linear`` layer :math:`z_i = W a_i + b`, back-propagation
already has :math:`\delta_i = \partial \ell_i / \partial z_i` and the layer input :math:`a_i`, and

.. math::

    \lVert \nabla_W \ell_i \rVert^2 = \lVert \delta_i a_i^\top \rVert_F^2
        = \lVert \delta_i \rVert^2 \lVert a_i \rVert^2,
    \qquad \lVert \nabla_b \ell_i \rVert^2 = \lVert \delta_i \rVert^2
    \qquad \text{(eq. 12)},

so no per-example gradient is ever formed (``impl="linear"``). The δ's come from one
``autograd.grad(Σ_i ℓ_i, layer outputs, create_graph=True)`` and the layer inputs from forward
hooks (removed after each step), so the penalty is differentiable and the step is one forward,
one δ-pass and one backward. For models with other parametrised modules, a Linear layer used
more than once per forward, or inputs with more than two dimensions, ``impl="vmap"`` computes
per-example gradients with ``torch.func.vmap(grad(...))`` over ``functional_call`` (any model,
much slower); ``impl="auto"`` picks the closed form when it applies.

Requirements: ``loss_fn`` is the batch mean (or sum, see its ``reduction``) of per-example
losses, and examples do not interact (no BatchNorm in train mode). Dropout: the closed form uses
the step's single forward pass (and its mask); the vmap form draws an independent mask per
example (``randomness="different"``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> method = make_method("curvature", model, nn.CrossEntropyLoss(), alpha=0.01)
    >>> info = method.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info), method.last_impl
    (['loss', 'mean_sq_grad_norm', 'penalty'], 'linear')
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from ..utils import batch_size, call_model
from .base import LossFn, Method, register_method
from .perturb import require_nonnegative, trainable_parameters

__all__ = [
    "CurvatureRegularization",
    "ClosedFormUnavailable",
    "per_example_sq_grad_norms",
    "linear_sq_grad_norms",
    "vmap_sq_grad_norms",
    "CURVATURE_IMPLS",
]

Impl = Literal["auto", "linear", "vmap"]
CURVATURE_IMPLS: tuple[str, ...] = ("auto", "linear", "vmap")


class ClosedFormUnavailable(ValueError):
    """The per-layer closed form (eq. 12) does not apply to this model or input."""


def _sum_scale(loss_fn: LossFn, n: int) -> float:
    """Factor turning the batch loss into Σ_i ℓ_i (n for a mean, 1 for a sum)."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction == "mean":
        return float(n)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"loss_fn must reduce to a scalar ('mean' or 'sum'), got {reduction!r}")


def _row_sq_norms(a: Tensor) -> Tensor:
    """‖a_i‖² for every row of a 2-D dense or sparse (COO/CSR) tensor."""
    if a.layout == torch.sparse_csr:
        crow = a.crow_indices()
        rows = torch.repeat_interleave(
            torch.arange(a.shape[0], device=a.device), crow[1:] - crow[:-1]
        )
        out = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        return out.index_add(0, rows, a.values().square())
    if a.is_sparse:
        a = a.coalesce()
        out = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        return out.index_add(0, a.indices()[0], a.values().square())
    return a.square().sum(dim=1)


def linear_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, params: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(batch loss, ‖∇θ ℓ_i‖² per example) by eq. 12; both differentiable.

    Raises :class:`ClosedFormUnavailable` if a trainable parameter is not the weight or bias of
    an ``nn.Linear``, a Linear runs more than once per forward, its input is not 2-D, or its
    input or output is modified in place afterwards (``ReLU(inplace=True)``).
    """
    params = trainable_parameters(model) if params is None else params
    wanted = {id(p) for p in params}
    layers: list[nn.Linear] = []
    covered: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            owned = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if owned:
                layers.append(module)
                covered.update(id(p) for p in owned)
    if covered != wanted:
        raise ClosedFormUnavailable("some trainable parameters do not belong to nn.Linear layers")
    if len({id(m) for m in layers}) != len(layers):
        raise ClosedFormUnavailable("a Linear module appears twice in the model")

    # per call: (input, output, their version counters when the layer ran)
    records: dict[int, list[tuple[Any, Tensor, int, int]]] = {id(m): [] for m in layers}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        a = inputs[0] if inputs else None
        version = a._version if isinstance(a, Tensor) and a.layout == torch.strided else 0
        records[id(module)].append((a, output, version, output._version))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        loss = loss_fn(call_model(model, x), y)
    finally:
        for h in handles:
            h.remove()

    n = batch_size(x)
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    for m in layers:
        calls = records[id(m)]
        if len(calls) != 1:
            raise ClosedFormUnavailable(f"a Linear layer ran {len(calls)} times in one forward")
        a, z, a_version, z_version = calls[0]
        if not isinstance(a, Tensor) or a.dim() != 2 or z.dim() != 2 or a.shape[0] != n:
            raise ClosedFormUnavailable("the closed form needs (batch, features) layer inputs")
        if z._version != z_version or (a.layout == torch.strided and a._version != a_version):
            # e.g. ReLU(inplace=True) on the layer's output: z would no longer be the layer's
            raise ClosedFormUnavailable("a Linear layer's input or output was modified in place")
        inputs.append(a)
        outputs.append(z)
    deltas = torch.autograd.grad(
        loss * _sum_scale(loss_fn, n), outputs, create_graph=True, allow_unused=True
    )
    sq = torch.zeros(n, dtype=loss.dtype, device=loss.device)
    for m, a, delta in zip(layers, inputs, deltas):
        if delta is None:  # this layer does not reach the loss: zero gradient
            continue
        sq_delta = delta.square().sum(dim=1)
        if id(m.weight) in wanted:
            sq = sq + sq_delta * _row_sq_norms(a)
        if m.bias is not None and id(m.bias) in wanted:
            sq = sq + sq_delta
    return loss, sq


def _unsqueeze0(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, tuple):
        return tuple(_unsqueeze0(t) for t in x)
    if isinstance(x, list):
        return [_unsqueeze0(t) for t in x]
    if isinstance(x, dict):
        return {k: _unsqueeze0(v) for k, v in x.items()}
    return x


def vmap_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, params: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(batch loss, ‖∇θ ℓ_i‖² per example) from per-example gradients; any model, differentiable.

    Each example runs through ``functional_call(model, params, x_i[None])`` under
    ``vmap(grad_and_value(...))``; dropout draws an independent mask per example.
    """
    params = trainable_parameters(model) if params is None else params
    wanted = {id(p) for p in params}
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if any(isinstance(t, Tensor) and t.layout != torch.strided for t in _leaves(x)):
        raise ValueError("the vmap per-example form does not support sparse inputs")

    def example_loss(p: dict[str, Tensor], xi: Any, yi: Any) -> Tensor:
        xi, yi = _unsqueeze0(xi), _unsqueeze0(yi)
        if isinstance(xi, tuple):
            out = functional_call(model, p, xi)
        elif isinstance(xi, dict):
            out = functional_call(model, p, (), xi)
        else:
            out = functional_call(model, p, (xi,))
        return loss_fn(out, yi)

    per_grads, per_loss = vmap(
        grad_and_value(example_loss), in_dims=(None, 0, 0), randomness="different"
    )(named, x, y)
    n = batch_size(x)
    sq = sum(g.reshape(n, -1).square().sum(dim=1) for g in per_grads.values())
    loss = per_loss.sum() / _sum_scale(loss_fn, n)
    return loss, sq


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [leaf for t in x for leaf in _leaves(t)]
    if isinstance(x, dict):
        return [leaf for t in x.values() for leaf in _leaves(t)]
    return [x]


def per_example_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, impl: Impl = "auto"
) -> tuple[Tensor, Tensor, str]:
    """(batch loss, ‖∇θ ℓ_i‖² per example, the impl used); ``impl`` as in the module docs."""
    if impl not in CURVATURE_IMPLS:
        raise ValueError(f"impl must be one of {CURVATURE_IMPLS}, got {impl!r}")
    if impl in ("auto", "linear"):
        try:
            loss, sq = linear_sq_grad_norms(model, loss_fn, x, y)
            return loss, sq, "linear"
        except ClosedFormUnavailable:
            if impl == "linear":
                raise
    loss, sq = vmap_sq_grad_norms(model, loss_fn, x, y)
    return loss, sq, "vmap"


@register_method
class CurvatureRegularization(Method):
    """``--method curvature``: L + α·mean_i ‖∇θ ℓ_i‖² (Geng et al. eq. 11); ``alpha`` is swept.

    Args:
        alpha: strength α >= 0 (``alpha=0`` trains on the task loss alone, at the plain cost).
        impl: ``"auto"`` (closed form when it applies, else vmap), ``"linear"`` or ``"vmap"``.

    ``last_impl`` says which form the last step used; with ``"auto"`` the first step that
    finds the closed form inapplicable warns once and later steps go straight to vmap.
    """

    name = "curvature"
    hparam = "alpha"
    # at initialisation mean_i ‖∇θ ℓ_i‖² is ~10 (Breast Cancer MLP) to ~200 (CIFAR-100 MLP)
    default_grid: tuple[float, ...] = (0.0001, 0.001, 0.01)

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, alpha: float = 0.001, impl: Impl = "auto"
    ) -> None:
        super().__init__(model, loss_fn)
        self.alpha = require_nonnegative("alpha (α)", alpha)
        if impl not in CURVATURE_IMPLS:
            raise ValueError(f"impl must be one of {CURVATURE_IMPLS}, got {impl!r}")
        self.impl: str = impl
        self.last_impl: str | None = None

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        if self.alpha == 0:
            loss = self.task_loss(x, y)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}
        loss, sq, used = per_example_sq_grad_norms(self.model, self.loss_fn, x, y, self.impl)
        if self.impl == "auto" and used == "vmap":
            warnings.warn(
                "curvature: the per-layer closed form does not apply to this model; using the "
                "(slower) per-example vmap form",
                RuntimeWarning,
                stacklevel=2,
            )
            self.impl = "vmap"
        self.last_impl = used
        mean_sq = sq.mean()
        penalty = self.alpha * mean_sq
        (loss + penalty).backward()
        optimizer.step()
        return {
            "loss": float(loss.detach()),
            "penalty": float(penalty.detach()),
            "mean_sq_grad_norm": float(mean_sq.detach()),
        }

    def __repr__(self) -> str:
        return f"CurvatureRegularization(alpha={self.alpha}, impl={self.impl!r})"
