r"""Empirical Fisher trace: the mean per-example squared gradient norm (Geng et al., eq. 9).

.. math::

    \operatorname{Tr}(\bar F) = \frac{1}{N}\sum_{i=1}^{N}
    \lVert \nabla_\theta \ell(f_\theta(x_i), y_i) \rVert_2^2
    \;\approx\; \operatorname{Tr}(H) \text{ near a minimum of an over-fitting model.}

Two exact ways to the per-example norms (``method``):

- ``"linear"``: when every measured parameter belongs to a linear layer (``nn.Linear`` or
  :class:`flatness.models.SparseLinear`) applied once to 2-D inputs, one forward and one backward
  pass suffice: with a_i the layer's input and g_i = ∂ℓ_i/∂z_i its output gradient,
  ‖∇_W ℓ_i‖² = ‖a_i‖² ‖g_i‖² and ‖∇_b ℓ_i‖² = ‖g_i‖² (Goodfellow, 2015). Sparse inputs stay sparse.
- ``"vmap"``: any model, per-example gradients from ``torch.func.vmap(torch.func.grad(...))`` over
  chunks of examples (sparse inputs densified one chunk at a time; a loop where an op cannot be
  vmapped).

``"auto"`` (default) takes the first that applies. The standard error is that of the mean over
examples.

Why not curvlinops' ``EFLinearOperator``: its trace needs P products (or a Hutchinson estimate
with error), while eq. 9 is exact from one pass of per-example gradients.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import fisher_trace
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    >>> est = fisher_trace(model, nn.functional.cross_entropy, data)
    >>> est.num_samples, est.value > 0
    (16, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..hutchinson import Estimate
from ..layers import LINEAR_TYPES
from ..utils import FlatnessError, batch_size, call_model, eval_mode
from .functional import LossFn, collect_batches, select_params

__all__ = ["fisher_trace", "per_example_sq_grad_norms", "linear_sq_grad_norms"]

PER_EXAMPLE_BUDGET = 1 << 25  # numbers of per-example gradients held at once (128 MiB in float32)


def _rows(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, Tensor):
        if x.layout == torch.sparse_csr or x.is_sparse:
            idx = torch.arange(start, stop, device=x.device)
            dense = x.to_sparse_coo() if x.layout == torch.sparse_csr else x
            return dense.index_select(0, idx).to_dense()
        return x[start:stop]
    if isinstance(x, tuple):
        return tuple(_rows(t, start, stop) for t in x)
    if isinstance(x, list):
        return [_rows(t, start, stop) for t in x]
    if isinstance(x, dict):
        return {k: _rows(v, start, stop) for k, v in x.items()}
    raise TypeError(f"cannot slice inputs of type {type(x).__name__}")


def per_example_sq_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    params: Iterable[Tensor] | None = None,
    *,
    chunk: int | None = None,
) -> Tensor:
    """‖∇θ ℓ(f(x_i), y_i)‖² for every example of one batch, shape ``(n,)``.

    ``chunk`` examples are vmapped at once (default: as many as keep the per-example gradients
    under about 2²⁵ numbers, at most 64).
    """
    named = select_params(model, params)
    theta = {n: p.detach() for n, p in named}
    n = batch_size(x)
    if chunk is None:
        chunk = max(1, min(64, PER_EXAMPLE_BUDGET // sum(p.numel() for p in theta.values())))

    def one_loss(p: dict[str, Tensor], xi: Any, yi: Any) -> Tensor:
        add = lambda t: t.unsqueeze(0)  # noqa: E731
        xb = tuple(add(t) for t in xi) if isinstance(xi, tuple) else add(xi)
        out = functional_call(model, p, xb if isinstance(xb, tuple) else (xb,))
        return loss_fn(out, add(yi))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    norms = []
    with eval_mode(model):
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            xs, ys = _rows(x, start, stop), y[start:stop]
            try:
                grads = per_example(theta, xs, ys)
                sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
            except (RuntimeError, NotImplementedError):  # no vmap rule for some op: loop
                sq = torch.stack([_sq_norm_loop(model, loss_fn, named, xs, ys, i)
                                  for i in range(stop - start)])
            norms.append(sq.detach())
    return torch.cat(norms)


def _row_sq_norms(a: Tensor) -> Tensor:
    if a.layout == torch.sparse_csr:
        rows = torch.repeat_interleave(
            torch.arange(a.shape[0], device=a.device), a.crow_indices().diff())
        return torch.zeros(a.shape[0], dtype=a.values().dtype, device=a.device).index_add(
            0, rows, a.values().pow(2))
    if a.is_sparse:
        a = a.coalesce()
        return torch.zeros(a.shape[0], dtype=a.values().dtype, device=a.device).index_add(
            0, a.indices()[0], a.values().pow(2))
    return a.pow(2).sum(1)


def linear_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, params: Iterable[Tensor] | None = None
) -> Tensor | None:
    """Per-example ‖∇θ ℓ_i‖² from one forward/backward pass, or ``None`` when it does not apply.

    Applies when every measured parameter is the weight or bias of a linear layer that is called
    exactly once, on a 2-D input. ``loss_fn`` must be the batch mean of per-example losses.
    """
    named = select_params(model, params)
    wanted = {id(p) for _, p in named}
    layers = [m for m in model.modules() if isinstance(m, LINEAR_TYPES)]
    owned = {id(p) for m in layers for p in m.parameters(recurse=False)}
    if not wanted <= owned:
        return None
    layers = [m for m in layers if any(id(p) in wanted for p in m.parameters(recurse=False))]
    seen: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}

    def remember(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        seen[module].append((inputs[0], output))

    handles = [m.register_forward_hook(remember) for m in layers]
    try:
        n = batch_size(x)
        loss = loss_fn(call_model(model, x), y) * n  # the sum: its output gradients are per-example
    finally:
        for h in handles:
            h.remove()
    calls = [seen[m] for m in layers]
    if any(len(c) != 1 or c[0][0].dim() != 2 or c[0][1].dim() != 2 for c in calls):
        return None
    outputs = [c[0][1] for c in calls]
    out_grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    total = torch.zeros(n, dtype=loss.dtype, device=loss.device)
    for m, (a, _), g in zip(layers, (c[0] for c in calls), out_grads):
        if g is None:
            continue
        g_sq = g.detach().pow(2).sum(1)
        if id(m.weight) in wanted:
            total = total + _row_sq_norms(a.detach()).to(g_sq.dtype) * g_sq
        if getattr(m, "bias", None) is not None and id(m.bias) in wanted:
            total = total + g_sq
    return total


def _sq_norm_loop(model: nn.Module, loss_fn: LossFn, named: list, xs: Any, ys: Any, i: int) -> Tensor:
    params = [p for _, p in named]
    xi = _rows(xs, i, i + 1)
    loss = loss_fn(call_model(model, xi), ys[i : i + 1])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return sum(g.pow(2).sum() for g in grads if g is not None)  # type: ignore[return-value]


def fisher_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    params: Iterable[Tensor] | None = None,
    method: str = "auto",
    chunk: int | None = None,
) -> Estimate:
    """Tr of the empirical Fisher over all examples of ``batches``; stderr over examples.

    ``loss_fn`` must be the batch mean (then ``loss_fn`` on one example is that example's loss).
    ``method``: ``"auto"``, ``"linear"`` (error if it does not apply) or ``"vmap"``.
    """
    if method not in ("auto", "linear", "vmap"):
        raise ValueError(f"method must be 'auto', 'linear' or 'vmap', got {method!r}")
    data = collect_batches(batches)
    params = None if params is None else list(params)
    parts = []
    with eval_mode(model):
        for b in data:
            fast = None if method == "vmap" else linear_sq_grad_norms(model, loss_fn, b.x, b.y, params)
            if fast is None and method == "linear":
                raise FlatnessError("the linear-layer shortcut does not apply to this model")
            if fast is None:
                fast = per_example_sq_grad_norms(model, loss_fn, b.x, b.y, params, chunk=chunk)
            parts.append(fast.detach())
    values = torch.cat(parts).double().cpu()
    if not torch.isfinite(values).all():
        raise FlatnessError("non-finite per-example gradients; is the checkpoint diverged?")
    n = values.numel()
    stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return Estimate(float(values.mean()), stderr, n)
