r"""The k largest Hessian eigenvalues (thick-restart Lanczos in torch) and per-layer blocks.

.. math:: H u_i = \lambda_i u_i, \qquad \lambda_1 \ge \lambda_2 \ge \dots \ge \lambda_k

:func:`top_eigenvalues` runs a thick-restart Lanczos (Wu & Simon, 2000) on the Hessian operator,
so only Hessian-vector products are needed. The basis is a preallocated ``(m, P)`` matrix in the
operator's dtype and device, every new vector is orthogonalised against all of it (a second
pass when the first one cancels much, Daniel-Gragg-Kaufman-Stewart), the Ritz values are
checked after every product and the iteration stops as soon as the k largest have residuals
:math:`\lVert H u_i - \theta_i u_i\rVert \le \text{tol}\cdot|\theta_i|` (ARPACK's criterion,
which bounds the distance of θ_i to an eigenvalue by ``tol·|θ_i|``). A full basis restarts from the
best Ritz vectors instead of starting over. SciPy's ``eigsh`` (ARPACK) on ``H.to_scipy()``
computes the same numbers but spent 64% of its time in ARPACK's own Fortran on the CIFAR-100
MLP, and converts every vector to NumPy and back.

Summaries of the top of the spectrum (the whole spectrum is out of reach):

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
from torch import Tensor, nn

from ..probes import make_generator, random_matrix
from ..utils import FlatnessError
from .functional import LossFn, accepts_model_loss, collect_batches
from .operator import HessianOperator
from .trace import Operator, operator_dim

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
        """The largest eigenvalue."""
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
        """The summaries as JSON-ready keys (``lambda_max``, ``top_eigenvalues``, ...).

        ``z`` is passed to :meth:`effective_dimension`.
        """
        return {
            "lambda_max": self.lambda_max,
            "top_eigenvalues": list(self.eigenvalues),
            "condition_number_topk": self.condition_number,
            "effective_dimension_topk": self.effective_dimension(z),
            "eigen_matvecs": self.num_matvecs,
        }


@dataclass
class _Lanczos:
    """State of a thick-restart Lanczos run: basis rows ``V[:j]`` and the projected ``T``."""

    A: Operator
    V: Tensor  # (m, P), row i = basis vector i
    T: Tensor  # (m, m) float64 on the CPU: Vᵀ A V
    j: int = 0
    matvecs: int = 0
    w: Tensor | None = None  # the last residual direction, orthogonal to the basis
    beta: float | None = None  # ‖w‖ when the newest basis vector is w / ‖w‖, else None

    def expand(self) -> float:
        """Multiply the newest basis vector by A and orthogonalise the result: returns its norm β."""
        V, j = self.V, self.j
        v = V[j]
        w = (self.A @ v).to(V.dtype)
        self.matvecs += 1
        # α first (an exact projection on v), then one pass against the whole basis; a second
        # pass only when that one cancels much of what is left (Daniel-Gragg-Kaufman-Stewart).
        alpha = torch.dot(w, v)
        w.sub_(v, alpha=float(alpha))
        if self.beta is not None:  # v_j = w_{j-1} / β: the three-term recurrence's other term
            w.sub_(V[j - 1], alpha=self.beta)
        known = V[: j + 1]
        before = float(torch.linalg.vector_norm(w))
        h = known @ w
        w.addmv_(known.T, h, alpha=-1.0)
        if float(torch.linalg.vector_norm(w)) < 0.7 * before:
            h2 = known @ w
            w.addmv_(known.T, h2, alpha=-1.0)
            h = h + h2
        h[j] += alpha
        if self.beta is not None:
            h[j - 1] += self.beta
        h64 = h.double().cpu()
        self.T[: j + 1, j] = h64
        self.T[j, : j + 1] = h64
        self.j = j + 1
        self.w = w
        self.beta = None  # until push() makes w / β the next basis vector
        return float(torch.linalg.vector_norm(w))

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and their coordinates in the basis, float64."""
        return torch.linalg.eigh(self.T[: self.j, : self.j])

    def push(self, v: Tensor, orthogonalise: bool = False) -> None:
        """Make ``v`` the next basis vector, normalised.

        ``orthogonalise`` it against the basis first (twice) unless it is a residual direction,
        which already is orthogonal.
        """
        known = self.V[: self.j]
        if orthogonalise and self.j:
            for _ in range(2):
                v = v - known.T @ (known @ v)
        norm = float(torch.linalg.vector_norm(v))
        self.V[self.j] = v / norm
        self.beta = norm if v is self.w else None

    def restart(self, coords: Tensor, theta: Tensor, nxt: Tensor, orthogonalise: bool) -> None:
        """Keep the Ritz vectors ``V[:j]ᵀ coords`` (values ``theta``), then continue with ``nxt``."""
        keep = coords.shape[1]
        self.V[:keep] = coords.T.to(self.V.dtype).to(self.V.device) @ self.V[: self.j]
        self.T.zero_()
        self.T[:keep, :keep] = torch.diag(theta)
        self.j = keep
        self.push(nxt, orthogonalise)
        self.beta = None  # the new vector couples to every kept Ritz vector, not just the last


def _random_unit(dim: int, gen: torch.Generator | None, like: Tensor) -> Tensor:
    v = random_matrix(dim, 1, "gaussian", gen, like.dtype, like.device)[:, 0]
    return v / torch.linalg.vector_norm(v)


def _basis_size(dim: int, k: int, num_vectors: int | None) -> int:
    """The Lanczos basis size m for the ``k`` top eigenpairs (default ``max(2k + 1, 30)``), at most ``dim``."""
    m = min(dim, num_vectors if num_vectors is not None else max(2 * k + 1, 30))
    if m <= k:
        raise ValueError(f"num_vectors must be > k, got {m}")
    return m


def _thick_restart(run: _Lanczos, k: int, m: int, residual: bool, gen: torch.Generator | None) -> None:
    """Restart a full basis of ``m`` vectors from its ``k + (m - k) // 2`` best Ritz vectors.

    It continues from the residual direction, or (without one: ``residual`` false) from a random
    vector drawn from ``gen``.
    """
    keep = max(k, min(m - 1, k + (m - k) // 2))
    theta, coords = run.ritz()
    if not residual:  # no residual direction to continue from
        run.restart(coords[:, -keep:], theta[-keep:], _random_unit(run.V.shape[1], gen, run.V), True)
    else:
        run.restart(coords[:, -keep:], theta[-keep:], run.w, False)


def _lanczos_top(
    A: Operator,
    k: int,
    *,
    tol: float,
    seed: int | None = 0,
    num_vectors: int | None = None,
    max_restarts: int | None = None,
) -> tuple[np.ndarray, Tensor, int]:
    """The k largest eigenpairs of a symmetric operator: (values descending, (P, k) vectors, products).

    ``num_vectors`` is the basis size m (default ``max(2k + 1, 30)``); a full basis restarts
    from its ``k + (m - k) // 2`` best Ritz vectors, at most ``max_restarts`` times (default
    300). An invariant subspace (β ≈ 0) continues from a random vector orthogonal to it.
    """
    dim = operator_dim(A)
    dtype, device = A.dtype, A.device
    m = _basis_size(dim, k, num_vectors)
    gen = make_generator(seed)
    run = _Lanczos(A, torch.empty(m, dim, dtype=dtype, device=device),
                   torch.zeros(m, m, dtype=torch.float64))
    run.push(_random_unit(dim, gen, run.V), orthogonalise=True)
    eps = torch.finfo(dtype).eps
    restarts = 0
    verify = max(10, k)
    verified, min_j = k == 1, 0  # the largest eigenvalue needs no second start
    while True:
        invariant, min_j = False, 0
        while run.j < m:
            beta = run.expand()
            theta, coords = run.ritz()
            scale = max(float(theta.abs().max()), 1e-300)
            if run.j == dim:  # the whole space: the Ritz values are the eigenvalues
                beta = 0.0
            resid = (beta * coords[-1, -k:]).abs()
            floor = tol * torch.clamp(theta[-k:].abs(), min=eps ** (2 / 3) * scale)
            done = run.j >= max(k, min_j) and not invariant and bool((resid <= floor).all())
            if done and not verified:
                # A single start vector sees one copy of a repeated eigenvalue: restart from the
                # k Ritz vectors and a fresh random vector, and accept only if no new Ritz value
                # enters the top k within the next ``verify`` products.
                verified, done = True, False
                run.restart(coords[:, -k:], theta[-k:], _random_unit(dim, gen, run.V), True)
                min_j = min(m, k + verify)
                continue
            if run.j == dim or done:
                order = torch.arange(run.j - 1, run.j - 1 - k, -1)
                vecs = coords[:, order].T.to(dtype).to(device) @ run.V[: run.j]
                return theta[order].numpy(), vecs.T, run.matvecs
            if beta <= 1e-12 * scale:
                # An invariant subspace: its Ritz values are exact, but a repeated or unseen
                # eigenvalue may lie outside it. Continue from a random orthogonal vector.
                invariant = True
                if run.j < m:
                    run.push(_random_unit(dim, gen, run.V), orthogonalise=True)
            elif run.j < m:
                run.push(run.w)
        restarts += 1
        if restarts > (max_restarts if max_restarts is not None else 300):
            raise FlatnessError(
                f"Lanczos did not converge to {k} eigenvalues in {run.matvecs} products; "
                "raise tol or max_restarts"
            )
        _thick_restart(run, k, m, beta > 1e-12 * scale, gen)


def eigenvalues_of(
    H: Operator,
    k: int = 1,
    *,
    tol: float | None = None,
    seed: int | None = 0,
    max_restarts: int | None = None,
    return_eigenvectors: bool = False,
    num_vectors: int | None = None,
) -> Spectrum:
    """The k largest (algebraic) eigenvalues of a symmetric operator (or dense tensor).

    Args:
        H: the operator.
        k: how many (1 <= k <= number of parameters).
        tol: relative accuracy of the Ritz values (residual <= ``tol·|λ|``); default 1e-10 in
            float64, 1e-4 in float32 (the products' own rounding error is about 1e-7 relative
            there).
        seed: seed of the Lanczos start vector (reproducible runs).
        max_restarts: how many times a full basis may restart (default 300).
        return_eigenvectors: also return the ``(P, k)`` eigenvectors.
        num_vectors: Lanczos basis size (memory ``num_vectors × P``; default ``max(2k+1, 30)``).

    Small problems (P <= 2k + 1) are solved densely.
    """
    dim = operator_dim(H)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > dim:
        raise FlatnessError(f"k={k} is larger than the number of parameters ({dim})")
    if tol is None:
        tol = 1e-10 if H.dtype == torch.float64 else 1e-4
    if dim <= 2 * k + 1:
        dense = H if isinstance(H, Tensor) else H @ torch.eye(dim, dtype=H.dtype, device=H.device)
        values, vectors = torch.linalg.eigh(((dense + dense.T) / 2).double())
        order = torch.argsort(values, descending=True)[:k]
        vals, vecs, matvecs = values[order].cpu().numpy(), vectors[:, order].to(H.dtype), dim
    else:
        vals, vecs, matvecs = _lanczos_top(
            H, k, tol=tol, seed=seed, num_vectors=num_vectors, max_restarts=max_restarts
        )
    if not np.all(np.isfinite(vals)):
        raise FlatnessError("non-finite Hessian eigenvalues; is the checkpoint diverged?")
    return Spectrum(
        tuple(float(v) for v in vals), dim, matvecs, vecs if return_eigenvectors else None
    )


@accepts_model_loss
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
    max_vectors: int | None = None,
    num_vectors: int | None = None,
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
        num_vectors=num_vectors,
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


@accepts_model_loss
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
