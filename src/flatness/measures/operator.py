r"""The Hessian of a data-set loss as a matrix-free linear operator.

.. math::

    H = \nabla^2_\theta L(\theta), \qquad
    L(\theta) = \sum_b \frac{|b|}{N}\,\ell_b(\theta), \qquad
    H V = \sum_b \frac{|b|}{N}\, \nabla_\theta\big(\nabla_\theta \ell_b^\top V\big)

:class:`HessianOperator` is a curvlinops ``PyTorchLinearOperator``: ``H @ V`` on flat
``(P,)``/``(P, K)`` tensors or in list format, ``H.to_scipy()`` for SciPy (``eigsh``), and it
can be handed to curvlinops' spectral routines. The model runs in eval mode (dropout off) during
every product and its train/eval flags are restored afterwards.

Why not ``curvlinops.HessianLinearOperator``: it needs the loss as an ``nn.Module`` with a
``reduction`` attribute and pushes inputs through ``torch.func`` forward-mode transforms, which
have no rules for sparse inputs (the 20 Newsgroups TF-IDF matrix). Our products use the
package's :func:`flatness.hutchinson.hvp` (reverse-over-reverse, all K columns in one vmapped
backward call), which works with any callable loss, sparse or dict inputs, at about the same
speed on the CIFAR-100 MLP (20-column products on 1,000 examples, 2 shared cores: 0.07–0.2 s
per column for both, in interleaved runs). Each batch's loss-and-gradient graph is built once
and reused by every product (``keep_graph``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import HessianOperator
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    >>> H = HessianOperator(model, nn.functional.cross_entropy, [(x, y)])
    >>> H.shape
    (8, 8)
    >>> v = torch.randn(8, dtype=torch.float64)
    >>> bool(torch.allclose(v @ (H @ v), (H @ v) @ v))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from curvlinops._torch_base import PyTorchLinearOperator
from torch import Tensor, nn

from ..hutchinson import hvp
from ..utils import FlatnessError, call_model, eval_mode
from .functional import Batch, LossFn, collect_batches, require_finite, select_params

__all__ = ["HessianOperator"]


class HessianOperator(PyTorchLinearOperator):
    """H = ∇²L over all ``batches``, w.r.t. ``params`` (default: every trainable parameter).

    Args:
        model: the network (not modified; run in eval mode, modes restored).
        loss_fn: ``loss_fn(model(x), y)``, the batch *mean* loss.
        batches: iterable of ``(x, y)``; materialised once, weighted by batch size.
        params: a subset of the model's trainable parameters (e.g. the last layer's) for the
            diagonal block of H that belongs to them.
        max_vectors: columns per vmapped backward call (memory bound: ``max_vectors × P``).
        keep_graph: build each batch's loss and gradient graph once and reuse it for every
            product (saves a forward and a backward pass per product: about two thirds of a
            single-vector product's time); costs the graphs' memory, about one training step's
            activations per batch. The operator is then a snapshot: changing the model's
            weights in place afterwards makes the next product fail instead of going stale.

    Attributes:
        num_matvecs: Hessian-vector products done so far (columns multiplied).
        names: the parameter names, in the order of the flat vector.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]] | list[Batch],
        params: Iterable[Tensor] | None = None,
        *,
        max_vectors: int = 10,
        keep_graph: bool = True,
    ) -> None:
        if max_vectors < 1:
            raise ValueError(f"max_vectors must be >= 1, got {max_vectors}")
        named = select_params(model, params)
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._model = model
        self._loss_fn = loss_fn
        self._batches = collect_batches(batches)
        self._max_vectors = max_vectors
        self._batched = True
        self._keep_graph = keep_graph
        self._graphs: list[tuple[Tensor, list[Tensor]]] | None = None
        self.num_matvecs = 0
        shapes = [tuple(p.shape) for p in self._params]
        super().__init__(shapes, shapes)

    @property
    def device(self) -> torch.device:
        return self._params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._params[0].dtype

    @property
    def batches(self) -> list[Batch]:
        return self._batches

    def _adjoint(self) -> "HessianOperator":
        return self

    def loss(self) -> float:
        """L(θ) over all batches, in eval mode."""
        with torch.no_grad(), eval_mode(self._model):
            total = sum(
                b.weight * float(self._loss_fn(call_model(self._model, b.x), b.y))
                for b in self._batches
            )
        return float(total)

    def _hvp_chunk(self, loss: Tensor, grads: list[Tensor], vecs: list[Tensor]) -> list[Tensor]:
        if self._batched:
            try:
                return hvp(loss, self._params, vecs, grads=grads)
            except (RuntimeError, NotImplementedError):
                # Some ops (e.g. sparse matmul) have no vmap rule: loop over the columns instead.
                self._batched = False
        return hvp(loss, self._params, vecs, grads=grads, batched=False)

    def _graph(self, b: Batch) -> tuple[Tensor, list[Tensor]]:
        """The batch's loss and ∇loss with ``create_graph=True``, in eval mode."""
        with eval_mode(self._model):
            loss = self._loss_fn(call_model(self._model, b.x), b.y)
            require_finite(float(loss.detach()), "the loss")
            grads = list(torch.autograd.grad(loss, self._params, create_graph=True))
        return loss, grads

    def _batch_graphs(self) -> Iterator[tuple[Batch, tuple[Tensor, list[Tensor]]]]:
        if not self._keep_graph:
            for b in self._batches:
                yield b, self._graph(b)
            return
        if self._graphs is None:
            self._graphs = [self._graph(b) for b in self._batches]
        yield from zip(self._batches, self._graphs)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        # curvlinops' list format puts the columns last: (*p.shape, K); hvp wants them first.
        columns = [m.movedim(-1, 0) for m in M]
        num = columns[0].shape[0]
        out = [torch.zeros_like(c) for c in columns]
        for b, (loss, grads) in self._batch_graphs():
            for start in range(0, num, self._max_vectors):
                stop = min(num, start + self._max_vectors)
                prods = self._hvp_chunk(loss, grads, [c[start:stop] for c in columns])
                for acc, prod in zip(out, prods):
                    acc[start:stop].add_(prod.detach(), alpha=b.weight)
        self.num_matvecs += num
        return [o.movedim(0, -1) for o in out]

    def dense(self) -> Tensor:
        """The P × P matrix (P products; for small blocks and tests only)."""
        dim = self.shape[0]
        if dim > 20_000:
            raise FlatnessError(f"refusing to build a dense {dim} x {dim} Hessian")
        eye = torch.eye(dim, device=self.device, dtype=self.dtype)
        mat = self @ eye
        return (mat + mat.T) / 2
