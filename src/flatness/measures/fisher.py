r"""Empirical Fisher trace: the mean per-example squared gradient norm (Geng et al., eq. 9).

.. math::

    \operatorname{Tr}(\bar F) = \frac{1}{N}\sum_{i=1}^{N}
    \lVert \nabla_\theta \ell(f_\theta(x_i), y_i) \rVert_2^2
    \;\approx\; \operatorname{Tr}(H) \text{ near a minimum of an over-fitting model.}

Per-example gradients come from ``torch.func.vmap(torch.func.grad(...))`` over chunks of
examples (one vectorised pass, no loop over examples); sparse inputs are densified one chunk at a
time; models whose ops cannot be vmapped fall back to a loop. The standard error is that of the
mean over examples.

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
from ..utils import FlatnessError, batch_size, call_model, eval_mode
from .functional import LossFn, collect_batches, select_params

__all__ = ["fisher_trace", "per_example_sq_grad_norms"]

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
    chunk: int | None = None,
) -> Estimate:
    """Tr of the empirical Fisher over all examples of ``batches``; stderr over examples.

    ``loss_fn`` must be the batch mean (then ``loss_fn`` on one example is that example's loss).
    """
    data = collect_batches(batches)
    values = torch.cat(
        [per_example_sq_grad_norms(model, loss_fn, b.x, b.y, params, chunk=chunk) for b in data]
    ).double().cpu()
    if not torch.isfinite(values).all():
        raise FlatnessError("non-finite per-example gradients; is the checkpoint diverged?")
    n = values.numel()
    stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return Estimate(float(values.mean()), stderr, n)
