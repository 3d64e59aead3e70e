r"""The k largest Hessian eigenvalues (Lanczos, SciPy ``eigsh``) and per-layer blocks.

.. math:: H u_i = \lambda_i u_i, \qquad \lambda_1 \ge \lambda_2 \ge \dots \ge \lambda_k

:func:`top_eigenvalues` runs ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
``which="LA"``) on ``HessianOperator(...).to_scipy()``, so only Hessian-vector products are
needed. Summaries of the top of the spectrum (the whole spectrum is out of reach):

- ``condition_number`` κ_k = λ_1 / λ_k (the top-k condition number; the full κ = λ_max/λ_min is
  undefined or huge for the near-singular Hessians of networks);
- ``effective_dimension(z)`` = Σ_{i≤k} λ_i / (λ_i + z) (Maddox, Benton & Wilson, 2020), the
  number of directions with curvature well above the scale ``z``; a lower bound of the full
  sum, since only the top k terms are known.

Per-layer variants take the diagonal block of H that belongs to one module's parameters, e.g.
the last layer's λ_max reported by the NRS paper (§5.2).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import top_eigenvalues
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> data = [(torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,)))]
    >>> spec = top_eigenvalues(model, nn.functional.cross_entropy, data, k=3)
    >>> len(spec.eigenvalues), spec.eigenvalues[0] >= spec.eigenvalues[2]
    (3, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor, nn

from ..utils import FlatnessError
from .functional import LossFn, collect_batches
from .operator import HessianOperator

__all__ = [
    "Spectrum",
    "top_eigenvalues",
    "eigenvalues_of",
    "module_params",
    "last_layer",
    "layer_top_eigenvalues",
]


@dataclass(frozen=True)
class Spectrum:
    """The top of a Hessian spectrum: eigenvalues in descending order and summaries."""

    eigenvalues: tuple[float, ...]
    num_params: int
    num_matvecs: int
    eigenvectors: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def lambda_max(self) -> float:
        return self.eigenvalues[0]

    @property
    def condition_number(self) -> float:
        """λ_1 / λ_k over the k computed eigenvalues (inf when λ_k <= 0)."""
        low = self.eigenvalues[-1]
        return self.eigenvalues[0] / low if low > 0 else math.inf

    def effective_dimension(self, z: float = 1.0) -> float:
        """Σ_{i≤k} max(λ_i, 0) / (max(λ_i, 0) + z), z > 0 the curvature scale."""
        if z <= 0:
            raise ValueError(f"z must be > 0, got {z}")
        lam = np.clip(np.asarray(self.eigenvalues), 0.0, None)
        return float(np.sum(lam / (lam + z)))

    def as_dict(self, z: float = 1.0) -> dict[str, Any]:
        return {
            "lambda_max": self.lambda_max,
            "top_eigenvalues": list(self.eigenvalues),
            "condition_number_topk": self.condition_number,
            "effective_dimension_topk": self.effective_dimension(z),
            "eigen_matvecs": self.num_matvecs,
        }


def eigenvalues_of(
    H: HessianOperator,
    k: int = 1,
    *,
    tol: float | None = None,
    seed: int | None = 0,
    max_restarts: int | None = None,
    return_eigenvectors: bool = False,
) -> Spectrum:
    """The k largest (algebraic) eigenvalues of a Hessian operator.

    Args:
        H: the operator.
        k: how many (1 <= k <= number of parameters).
        tol: ARPACK's relative accuracy; default 1e-10 in float64, 1e-4 in float32 (the products'
            own rounding error is about 1e-7 relative there).
        seed: seed of the Lanczos start vector (reproducible runs).
        max_restarts: ARPACK's ``maxiter`` (default SciPy's).
        return_eigenvectors: also return the ``(P, k)`` eigenvectors.

    Small problems (P <= 2k + 1) are solved densely: ARPACK needs k < P with room to spare.
    """
    dim = H.shape[0]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > dim:
        raise FlatnessError(f"k={k} is larger than the number of parameters ({dim})")
    if tol is None:
        tol = 1e-10 if H.dtype == torch.float64 else 1e-4
    before = H.num_matvecs
    if dim <= 2 * k + 1:
        values, vectors = torch.linalg.eigh(H.dense().double())
        order = torch.argsort(values, descending=True)[:k]
        vals = values[order].cpu().numpy()
        vecs = vectors[:, order].to(H.dtype) if return_eigenvectors else None
    else:
        rng = np.random.default_rng(seed)
        v0 = rng.standard_normal(dim)
        try:
            result = eigsh(
                H.to_scipy(dtype=np.float64),
                k=k,
                which="LA",
                tol=tol,
                v0=v0,
                maxiter=max_restarts,
                return_eigenvectors=return_eigenvectors,
            )
        except ArpackNoConvergence as exc:
            raise FlatnessError(
                f"Lanczos did not converge to {k} eigenvalues ({len(exc.eigenvalues)} found); "
                "raise tol or max_restarts"
            ) from None
        if return_eigenvectors:
            raw_vals, raw_vecs = result
        else:
            raw_vals, raw_vecs = result, None
        order = np.argsort(raw_vals)[::-1]
        vals = raw_vals[order]
        vecs = None
        if raw_vecs is not None:
            vecs = torch.as_tensor(raw_vecs[:, order].copy(), dtype=H.dtype, device=H.device)
    if not np.all(np.isfinite(vals)):
        raise FlatnessError("non-finite Hessian eigenvalues; is the checkpoint diverged?")
    return Spectrum(tuple(float(v) for v in vals), dim, H.num_matvecs - before, vecs)


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    k: int = 1,
    *,
    params: Iterable[Tensor] | None = None,
    tol: float | None = None,
    seed: int | None = 0,
    max_restarts: int | None = None,
    return_eigenvectors: bool = False,
    max_vectors: int = 10,
) -> Spectrum:
    """The k largest eigenvalues of H = ∇²L over ``batches`` (all parameters, or ``params``).

    See :func:`eigenvalues_of` for the arguments; ``k`` larger than the number of parameters
    raises a :class:`~flatness.FlatnessError`.
    """
    H = HessianOperator(model, loss_fn, batches, params, max_vectors=max_vectors)
    return eigenvalues_of(
        H,
        k,
        tol=tol,
        seed=seed,
        max_restarts=max_restarts,
        return_eigenvectors=return_eigenvectors,
    )


def module_params(model: nn.Module) -> dict[str, list[Tensor]]:
    """Trainable parameters grouped by the module that owns them directly, in model order.

    The root module's own parameters (if any) are under the key ``""``.
    """
    groups: dict[str, list[Tensor]] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            groups[name] = own
    if not groups:
        raise FlatnessError("the model has no parameters that require grad")
    return groups


def last_layer(model: nn.Module) -> tuple[str, list[Tensor]]:
    """Name and trainable parameters of the last module (in registration order) that has some."""
    name, params = list(module_params(model).items())[-1]
    return name, params


def layer_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    k: int = 1,
    *,
    layers: Sequence[str] | None = None,
    tol: float | None = None,
    seed: int | None = 0,
) -> dict[str, Spectrum]:
    """Top-k eigenvalues of each layer's diagonal Hessian block, keyed by module name.

    ``layers`` picks module names (default: every module that owns trainable parameters).
    """
    groups = module_params(model)
    names = list(groups) if layers is None else list(layers)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise FlatnessError(f"no trainable parameters in module(s) {unknown}; have {list(groups)}")
    data = collect_batches(batches)
    return {
        name: top_eigenvalues(model, loss_fn, data, min(k, sum(p.numel() for p in groups[name])),
                              params=groups[name], tol=tol, seed=seed)
        for name in names
    }
