r"""The Hessian of a data-set loss as a matrix-free linear operator.

.. math::

    H = \nabla^2_\theta L(\theta), \qquad
    L(\theta) = \sum_b \frac{|b|}{N}\,\ell_b(\theta), \qquad
    H V = \sum_b \frac{|b|}{N}\, \nabla_\theta\big(\nabla_\theta \ell_b^\top V\big)

:class:`LinearOperator` is the package's small matrix-free operator interface: ``A @ v`` on flat
``(P,)`` or ``(P, K)`` tensors, ``shape``, ``dtype``, ``device``, and ``A.to_scipy()`` for SciPy
(a :class:`scipy.sparse.linalg.LinearOperator`, e.g. for ``eigsh``). :class:`HessianOperator`
implements it for the Hessian of a loss averaged over batches. The model runs in eval mode
(dropout off) during every product and its train/eval flags are restored afterwards.

Products use :func:`flatness.hutchinson.hvp` (reverse-over-reverse, K columns in one vmapped
backward call), which works with any callable loss and with sparse or dict inputs. The columns
are handed to the batched backward as contiguous ``(K, *p.shape)`` blocks: strided views of
the ``(P, K)`` matrix made the vmapped backward run at half speed. Each batch's
loss-and-gradient graph is built once and reused by every product (``keep_graph``).

Why our own operator rather than curvlinops': its ``HessianLinearOperator`` needs the loss as an
``nn.Module`` with a ``reduction`` attribute and pushes inputs through ``torch.func`` transforms
that have no rules for sparse inputs (the 20 Newsgroups TF-IDF matrix), and its operator base
class is private API.

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
    >>> from scipy.sparse.linalg import eigsh
    >>> top = eigsh(H.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    >>> bool(abs(top[0] - torch.linalg.eigvalsh(H.dense())[-1]) < 1e-8)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from torch import Tensor, nn

from ..hutchinson import hvp
from ..utils import FlatnessError, call_model, eval_mode
from .functional import Batch, LossFn, collect_batches, model_loss_args, require_finite, select_params

__all__ = ["LinearOperator", "HessianOperator"]

_TILE = 32768  # rows per tile of a transposing copy: a tile of a (P, 20) block stays in cache


def transposed(X: Tensor, out: Tensor | None = None) -> Tensor:
    """``X.T`` as a contiguous tensor, copied tile by tile along the longer axis.

    For the tall ``(P, K)`` blocks of probes (P ~ 10⁶, K ~ 20) ``X.T.contiguous()`` reads with a
    stride of K over the whole matrix; copying cache-sized tiles is about 3× faster on the CPU
    (199 ms against 69 ms for P = 1.73 M, K = 20, one thread). ``out``: a contiguous
    ``(cols, rows)`` tensor to write into.

    Example:
        >>> X = torch.arange(12.0).reshape(6, 2)
        >>> torch.equal(transposed(X), X.T.contiguous()) and transposed(X).is_contiguous()
        True
    """
    rows, cols = X.shape
    if out is None or tuple(out.shape) != (cols, rows) or out.dtype != X.dtype or not out.is_contiguous():
        out = X.new_empty(cols, rows)
    if rows >= cols:
        for start in range(0, rows, _TILE):
            out[:, start : start + _TILE].copy_(X[start : start + _TILE].T)
    else:
        for start in range(0, cols, _TILE):
            out[start : start + _TILE].copy_(X[:, start : start + _TILE].T)
    return out


def rowwise_dots(a: Tensor, b: Tensor, tile: int | None = None) -> Tensor:
    """``(K,)`` float64: Σᵢ a[k, i]·b[k, i] for ``(K, P)`` a and b, tile by tile.

    Each tile is summed by torch (pairwise) and the tiles in float64: as accurate as
    ``(a * b).sum(1)`` in float64 to about 1e-6 relative, without a (K, P) temporary (fresh
    memory costs more than the arithmetic here) and about 2× faster on the CPU. ``tile``:
    columns per tile, by default about 2¹⁸ entries (1 MiB of float32) per tile of each input.
    """
    if tile is None:
        tile = max(16384, (1 << 18) // max(a.shape[0], 1))
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], tile):
        total += (a[:, start : start + tile] * b[:, start : start + tile]).sum(1, dtype=torch.float64)
    return total


class LinearOperator:
    """A square matrix-free operator on flat vectors: ``A @ X`` for ``(P,)`` or ``(P, K)`` X.

    Subclasses set ``shape``, ``dtype`` and ``device`` and implement :meth:`_matmat` on a
    ``(P, K)`` tensor; ``num_matvecs`` counts the columns multiplied so far.
    """

    shape: tuple[int, int]
    num_matvecs: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors the operator takes and returns."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """The device of the vectors the operator takes and returns."""
        raise NotImplementedError

    def _matmat(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def quadratic_forms(self, X: Tensor) -> Tensor:
        """``(K,)``: xⱼᵀ A xⱼ for the columns of a ``(P, K)`` X (what Hutchinson's Tr(A) averages)."""
        return (X * (self @ X)).sum(0)

    def sq_norms(self, X: Tensor) -> Tensor:
        """``(K,)``: ‖A xⱼ‖² for the columns of a ``(P, K)`` X (what Hutchinson's Tr(A²) averages)."""
        return (self @ X).square().sum(0)

    def __matmul__(self, X: Tensor) -> Tensor:
        if not isinstance(X, Tensor) or X.dim() not in (1, 2) or X.shape[0] != self.shape[1]:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"expected a ({self.shape[1]},) or ({self.shape[1]}, K) tensor, got {got}")
        if X.dim() == 1:
            return self._matmat(X.unsqueeze(1))[:, 0]
        return self._matmat(X)

    def to_scipy(self, dtype: Any = np.float64) -> ScipyLinearOperator:
        """A SciPy ``LinearOperator`` (NumPy in and out, ``dtype``) for ``scipy.sparse.linalg``."""

        def matmat(X: np.ndarray) -> np.ndarray:
            Xt = torch.as_tensor(np.asarray(X), device=self.device).to(self.dtype)
            return (self @ Xt).detach().cpu().numpy().astype(dtype, copy=False)

        # symmetric: the adjoint is the operator itself
        return ScipyLinearOperator(
            self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=dtype
        )


class HessianOperator(LinearOperator):
    """H = ∇²L over all ``batches``, w.r.t. ``params`` (default: every trainable parameter).

    Args:
        model: the network (not modified; run in eval mode, modes restored).
        loss_fn: ``loss_fn(model(x), y)``, the batch *mean* loss.
        batches: iterable of ``(x, y)``; materialised once, weighted by batch size.
        params: a subset of the model's trainable parameters (e.g. the last layer's) for the
            diagonal block of H that belongs to them.
        max_vectors: columns per vmapped backward call (memory bound: ``max_vectors × P``);
            default 1 on the CPU, where batching made each column slower (CIFAR-100 MLP, 1,000
            examples, one thread: 88 ms of CPU per column one at a time, 104 ms in batches of
            20), and 16 on accelerators, where one call per column would leave them idle.
        keep_graph: build each batch's loss and gradient graph once and reuse it for every
            product (saves a forward and a backward pass per product: about two thirds of a
            single-vector product's time); costs the graphs' memory, about one training step's
            activations per batch. The operator is then a snapshot: changing the model's
            weights in place afterwards makes the next product fail instead of going stale.

    Attributes:
        num_matvecs: Hessian-vector products done so far (columns multiplied).
        names: the parameter names, in the order of the flat vector.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]] | list[Batch],
        params: Iterable[Tensor] | None = None,
        *,
        max_vectors: int | None = None,
        keep_graph: bool = True,
    ) -> None:
        if max_vectors is not None and max_vectors < 1:
            raise ValueError(f"max_vectors must be >= 1, got {max_vectors}")
        model, loss_fn, batches = model_loss_args(model, loss_fn, batches)  # a ModelLoss: any batch
        named = select_params(model, params)
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._model = model
        self._loss_fn = loss_fn
        self._batches = collect_batches(batches)
        if max_vectors is None:
            max_vectors = 1 if self._params[0].device.type == "cpu" else 16
        self._max_vectors = max_vectors
        self._batched = True
        self._keep_graph = keep_graph
        self._graphs: list[tuple[Tensor, list[Tensor]]] | None = None
        self._sizes = [p.numel() for p in self._params]
        self._scratch: dict[str, Tensor] = {}
        self.num_matvecs = 0
        dim = sum(self._sizes)
        self.shape = (dim, dim)

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self._params[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self._params[0].dtype

    @property
    def batches(self) -> list[Batch]:
        """The batches the Hessian is taken over (materialised once, weighted by batch size)."""
        return self._batches

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
        yield from zip(self._batches, self._graphs, strict=True)

    def _matmat(self, X: Tensor) -> Tensor:
        out = self._row_products(self._rows(X))
        return out.T if X.shape[1] == 1 else transposed(out)

    def quadratic_forms(self, X: Tensor) -> Tensor:
        """vⱼᵀ H vⱼ for the columns vⱼ of ``X``."""
        return self._row_reductions(X, squares=False)

    def sq_norms(self, X: Tensor) -> Tensor:
        """‖H vⱼ‖² for the columns vⱼ of ``X``."""
        return self._row_reductions(X, squares=True)

    def _row_reductions(self, X: Tensor, squares: bool) -> Tensor:
        """vⱼᵀ A vⱼ (or ‖A vⱼ‖² with ``squares``) for the columns of X, in the operator's dtype.

        Over one batch each product is reduced as it comes out of the backward pass, so no
        (K, P) block of products is stored; over several, the products are summed into the
        operator's own scratch block (reused from call to call: nothing of it is returned).
        """
        rows = self._rows(X, self._scratch.get("rows"))
        if rows.data_ptr() != X.data_ptr():  # a transposed copy: keep its memory for the next call
            self._scratch["rows"] = rows
        if len(self._batches) > 1:
            prods = self._row_products(rows, self._scratch.get("prods"))
            self._scratch["prods"] = prods
            return rowwise_dots(prods if squares else rows, prods).to(self.dtype)
        ((loss, grads),) = [g for _, g in self._batch_graphs()]
        weight = self._batches[0].weight
        total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
        for start, vecs in self._chunks(rows):
            for vec, prod in zip(vecs, self._hvp_chunk(loss, grads, vecs), strict=True):
                prod = prod.detach().reshape(vec.shape[0], -1)
                total[start : start + vec.shape[0]] += rowwise_dots(
                    prod if squares else vec.reshape(vec.shape[0], -1), prod
                )
        self.num_matvecs += rows.shape[0]
        return (total * (weight * weight if squares else weight)).to(self.dtype)

    def _rows(self, X: Tensor, out: Tensor | None = None) -> Tensor:
        """The columns of a ``(P, K)`` X as contiguous rows ``(K, P)``, in the operator's dtype."""
        if not isinstance(X, Tensor) or X.dim() != 2 or X.shape[0] != self.shape[1]:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"expected a ({self.shape[1]}, K) tensor, got {got}")
        X = X.to(self.dtype)
        return X.T if X.T.is_contiguous() else transposed(X, out)

    def _chunks(self, rows: Tensor) -> list[tuple[int, list[Tensor]]]:
        """(first row, one ``(k, *p.shape)`` block per parameter) for ``max_vectors`` rows at a time."""
        # Columns as contiguous rows: the (k, *p.shape) blocks handed to the batched backward
        # are then contiguous, which it needs to run at full speed (the columns of a (P, K)
        # matrix, 20 at a time: 1.1-1.4 s strided, 0.57 s contiguous).
        return [
            (start, [
                block.reshape(-1, *p.shape).contiguous()
                for block, p in zip(rows[start : start + self._max_vectors].split(self._sizes, 1),
                                    self._params, strict=True)
            ])
            for start in range(0, rows.shape[0], self._max_vectors)
        ]

    def _row_products(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """``(K, P)`` rows of (A vⱼ)ᵀ for contiguous rows vⱼ ``(K, P)`` (into ``out`` if it fits)."""
        num = rows.shape[0]
        chunks = self._chunks(rows)
        if out is None or out.shape != rows.shape or out.dtype != rows.dtype:
            out = torch.empty_like(rows)  # every entry is written by the first batch
        for i, (b, (loss, grads)) in enumerate(self._batch_graphs()):
            for start, vecs in chunks:
                prods = self._hvp_chunk(loss, grads, vecs)
                acc = out[start : start + vecs[0].shape[0]].split(self._sizes, 1)
                for a, prod in zip(acc, prods, strict=True):
                    prod = prod.detach().reshape(a.shape)
                    if i == 0:
                        torch.mul(prod, b.weight, out=a) if b.weight != 1.0 else a.copy_(prod)
                    else:
                        a.add_(prod, alpha=b.weight)
        self.num_matvecs += num
        return out

    def dense(self) -> Tensor:
        """The P × P matrix (P products; for small blocks and tests only)."""
        dim = self.shape[0]
        if dim > 20_000:
            raise FlatnessError(f"refusing to build a dense {dim} x {dim} Hessian")
        eye = torch.eye(dim, device=self.device, dtype=self.dtype)
        mat = self @ eye
        return (mat + mat.T) / 2
