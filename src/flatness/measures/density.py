r"""Hessian spectral density by stochastic Lanczos quadrature (SLQ), with a plot.

For a unit probe v, m Lanczos steps give a tridiagonal :math:`T_m = U \Theta U^\top`; its
eigenvalues θ_j (Ritz values) and weights τ_j = (U_{1j})² are an m-node Gauss quadrature of the
spectral measure seen from v:

.. math::

    v^\top f(H) v \approx \sum_{j=1}^m \tau_j f(\theta_j), \qquad
    \phi(t) = \frac{1}{P}\sum_{i=1}^P \delta(t - \lambda_i)
    \approx \frac{1}{R}\sum_{r=1}^R \sum_{j=1}^m \tau_j^{(r)} g_\sigma(t - \theta_j^{(r)}),

exact for polynomials f of degree < 2m, and unbiased for :math:`\operatorname{Tr} f(H)/P` over
probes (Ghorbani, Krishnan & Xiao, 2019; Papyan, 2020). The Gaussian smoothing g_σ is curvlinops'
``lanczos_approximate_spectrum_from_iter`` (Papyan's width rule).

Why not curvlinops' ``lanczos_approximate_spectrum``: its Lanczos (``fast_lanczos``) does not
reorthogonalise, which creates spurious copies of the outer eigenvalues in floating point, and
draws its start vector from torch's global random state. Here the Lanczos basis is fully
reorthogonalised (memory P × m) and probes come from a seed.

Example:
    >>> import torch
    >>> from flatness.measures import density_of
    >>> A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
    >>> dens = density_of(A, num_steps=20, num_repeats=2, seed=0)
    >>> round(dens.moment(1), 6)  # = Tr(A) / P exactly for ±1 probes
    0.5
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum_from_iter
from torch import Tensor, nn

from ..probes import Distribution, make_generator, random_matrix
from .functional import LossFn
from .io import save_figure, save_npz
from .operator import HessianOperator
from .trace import Operator, operator_dim

__all__ = ["SpectralDensity", "lanczos", "density_of", "spectral_density", "plot_spectral_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ result: per-repeat Ritz values and weights, and the smoothed density on a grid."""

    nodes: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    grid: np.ndarray
    density: np.ndarray
    dim: int
    num_matvecs: int

    def moment(self, power: int) -> float:
        """Estimate of (1/P) Tr(H^power) = mean over repeats of Σ_j τ_j θ_j^power."""
        return float(np.mean([np.sum(w * t**power) for t, w in zip(self.nodes, self.weights)]))

    @property
    def ritz_range(self) -> tuple[float, float]:
        return float(min(t.min() for t in self.nodes)), float(max(t.max() for t in self.nodes))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``grid``, ``density``, and padded ``nodes``/``weights`` (NaN-filled) as ``.npz``."""
        width = max(len(t) for t in self.nodes)
        pad = lambda arrs: np.stack(  # noqa: E731
            [np.pad(a, (0, width - len(a)), constant_values=np.nan) for a in arrs]
        )
        return save_npz(
            path,
            grid=self.grid,
            density=self.density,
            nodes=pad(self.nodes),
            weights=pad(self.weights),
            dim=self.dim,
        )


def lanczos(
    A: Operator, v0: Tensor, num_steps: int, *, breakdown_tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """``num_steps`` Lanczos steps with full reorthogonalisation from ``v0``: (α, β) of T.

    Stops early when the Krylov space becomes invariant (β ≈ 0); then fewer than
    ``num_steps`` coefficients come back, and the quadrature is exact.
    """
    dim = operator_dim(A)
    steps = min(num_steps, dim)
    basis = torch.zeros(dim, steps, dtype=v0.dtype, device=v0.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    v = v0 / torch.linalg.vector_norm(v0)
    for j in range(steps):
        basis[:, j] = v
        w = A @ v
        alpha = torch.dot(w, v)
        alphas.append(alpha)
        if j == steps - 1:
            break
        w = w - alpha * v - (betas[-1] * basis[:, j - 1] if j > 0 else 0.0)
        # Two Gram-Schmidt passes against the whole basis keep it orthogonal in floating point.
        for _ in range(2):
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta = torch.linalg.vector_norm(w)
        if float(beta) <= breakdown_tol * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        v = w / beta
    return torch.stack(alphas), (torch.stack(betas) if betas else alphas[0].new_zeros(0))


def density_of(
    A: Operator,
    num_steps: int = 80,
    num_repeats: int = 1,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    num_points: int = 1024,
    kappa: float = 3.0,
    margin: float = 0.05,
) -> SpectralDensity:
    """SLQ density of a symmetric operator: ``num_repeats`` probes × ``num_steps`` products."""
    if num_steps < 2 or num_repeats < 1:
        raise ValueError("SLQ needs num_steps >= 2 and num_repeats >= 1")
    dim = operator_dim(A)
    gen = make_generator(seed)
    iters = []
    for _ in range(num_repeats):
        v0 = random_matrix(dim, 1, dist, gen, A.dtype, A.device)[:, 0]
        alphas, betas = lanczos(A, v0, num_steps)
        T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        evals, evecs = torch.linalg.eigh(T.double().cpu())
        iters.append((evals, evecs))
    nodes = tuple(e.numpy() for e, _ in iters)
    weights = tuple((u[0, :] ** 2).numpy() for _, u in iters)
    low = min(float(t.min()) for t in nodes)
    high = max(float(t.max()) for t in nodes)
    if high - low < 1e-12 * max(1.0, abs(high)):
        low, high = low - 0.5, high + 0.5  # a point spectrum: give the grid some width
    density = np.zeros(num_points)
    grid = np.zeros(num_points)
    for evals, evecs in iters:
        if len(evals) < 2:  # invariant after one step: pad so the smoothing width is defined
            evals = torch.cat([evals, evals])
            evecs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        g, d = lanczos_approximate_spectrum_from_iter(
            (evals, evecs), (low, high), num_points, kappa, margin
        )
        grid, density = g.numpy(), density + d.numpy() / num_repeats
    matvecs = sum(len(t) for t in nodes)
    return SpectralDensity(nodes, weights, grid, density, dim, matvecs)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    num_steps: int = 80,
    num_repeats: int = 1,
    dist: Distribution = "rademacher",
    *,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
    num_points: int = 1024,
) -> SpectralDensity:
    """SLQ spectral density of H = ∇²L over ``batches`` (``num_steps × num_repeats`` products)."""
    H = HessianOperator(model, loss_fn, batches, params)
    return density_of(H, num_steps, num_repeats, dist, seed=seed, num_points=num_points)


def plot_spectral_density(
    density: SpectralDensity,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    log_scale: bool = True,
) -> Path:
    """PNG of the smoothed density (log scale by default) with the Ritz values as a rug."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    values = np.maximum(density.density, 1e-12) if log_scale else density.density
    ax.plot(density.grid, values, lw=1.5)
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, float(values.max()) * 1e-8))
    for t, w in zip(density.nodes, density.weights):
        ax.plot(t, np.full_like(t, ax.get_ylim()[0]), "|", color="k", ms=8, alpha=0.5)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density φ(λ)")
    steps = max(len(t) for t in density.nodes)
    ax.set_title(title or f"Hessian spectral density (SLQ, {len(density.nodes)}×{steps} steps)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
