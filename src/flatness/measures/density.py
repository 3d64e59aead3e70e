r"""Hessian spectral density by stochastic Lanczos quadrature (SLQ), with a plot.

For a unit probe v, m Lanczos steps give a tridiagonal :math:`T_m = U \Theta U^\top`; its
eigenvalues θ_j (Ritz values) and weights τ_j = (U_{1j})² are an m-node Gauss quadrature of the
spectral measure seen from v:

.. math::

    v^\top f(H) v \approx \sum_{j=1}^m \tau_j f(\theta_j), \qquad
    \phi(t) = \frac{1}{P}\sum_{i=1}^P \delta(t - \lambda_i)
    \approx \frac{1}{R}\sum_{r=1}^R \sum_{j=1}^m \tau_j^{(r)} g_\sigma(t - \theta_j^{(r)}),

exact for polynomials f of degree < 2m, and unbiased for :math:`\operatorname{Tr} f(H)/P` over
probes (Ghorbani, Krishnan & Xiao, 2019; Papyan, 2020). The smoothing g_σ is Papyan's (2020,
Algorithm 2 and §D.2): on the Ritz range widened by a relative ``margin`` and mapped to [-1, 1],
a Gaussian of width :math:`\sigma = \frac{2}{m-1} / \sqrt{8 \ln \kappa}` around each node.

Why not curvlinops' ``lanczos_approximate_spectrum``: its Lanczos (``fast_lanczos``) does not
reorthogonalise, which creates spurious copies of the outer eigenvalues in floating point, and
draws its start vector from torch's global random state. Here the Lanczos basis is a
preallocated ``(m, P)`` matrix, one contiguous row per vector (memory m × P), and every new
vector gets one full Gram-Schmidt pass against it (two matrix-vector products over the
basis), after the three-term recurrence; probes come from a seed.

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
from torch import Tensor, nn

from ..probes import Distribution, make_generator, random_matrix
from .functional import LossFn, accepts_model_loss
from .io import save_figure, save_npz
from .operator import HessianOperator
from .trace import Operator, operator_dim

__all__ = [
    "SpectralDensity",
    "lanczos",
    "smoothed_density",
    "density_of",
    "spectral_density",
    "plot_spectral_density",
]


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
        return float(np.mean([np.sum(w * t**power) for t, w in zip(self.nodes, self.weights, strict=True)]))

    @property
    def ritz_range(self) -> tuple[float, float]:
        """The smallest and largest Ritz value over all repeats."""
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
    basis = torch.empty(steps, dim, dtype=v0.dtype, device=v0.device)  # row j = v_j
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    torch.div(v0, torch.linalg.vector_norm(v0), out=basis[0])
    for j in range(steps):
        v = basis[j]
        w = (A @ v).to(v.dtype)
        alpha = torch.dot(w, v)
        alphas.append(alpha)
        if j == steps - 1:
            break
        w.sub_(v, alpha=float(alpha))
        if j > 0:
            w.sub_(basis[j - 1], alpha=float(betas[-1]))
        # One Gram-Schmidt pass against the whole basis keeps it orthogonal in floating point.
        known = basis[: j + 1]
        w.addmv_(known.T, known @ w, alpha=-1.0)
        beta = torch.linalg.vector_norm(w)
        if float(beta) <= breakdown_tol * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        torch.div(w, beta, out=basis[j + 1])
    return torch.stack(alphas), (torch.stack(betas) if betas else alphas[0].new_zeros(0))


def smoothed_density(
    nodes: tuple[np.ndarray, ...],
    weights: tuple[np.ndarray, ...],
    num_points: int = 1024,
    kappa: float = 3.0,
    margin: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Papyan's Gaussian-smoothed density of quadratures (nodes θ, weights τ), averaged.

    Returns ``(grid, density)``: the grid spans the nodes' range widened by ``margin`` of its
    width on each side; each quadrature of m nodes puts a Gaussian of width
    σ = 2 / (m - 1) / sqrt(8 ln κ) (in units of the half-width of the grid) on each node.
    """
    if kappa <= 1:
        raise ValueError(f"kappa must be > 1, got {kappa}")
    low = min(float(t.min()) for t in nodes)
    high = max(float(t.max()) for t in nodes)
    if high - low < 1e-12 * max(1.0, abs(high)):
        low, high = low - 0.5, high + 0.5  # a point spectrum: give the grid some width
    pad = margin * (high - low)
    low, high = low - pad, high + pad
    center, half = (high + low) / 2, (high - low) / 2
    unit_grid = np.linspace(-1.0, 1.0, num_points)
    density = np.zeros(num_points)
    for theta, tau in zip(nodes, weights, strict=True):
        # one node alone (an invariant start vector): the width of a two-node quadrature
        sigma = 2.0 / (max(len(theta), 2) - 1) / np.sqrt(8.0 * np.log(kappa))
        z = (unit_grid[None, :] - ((theta - center) / half)[:, None]) / sigma
        bumps = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2.0 * np.pi))
        density += (tau / half) @ bumps / len(nodes)
    return np.linspace(low, high, num_points), density


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
    nodes, weights = [], []
    for _ in range(num_repeats):
        v0 = random_matrix(dim, 1, dist, gen, A.dtype, A.device)[:, 0]
        alphas, betas = lanczos(A, v0, num_steps)
        T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        evals, evecs = torch.linalg.eigh(T.double().cpu())
        nodes.append(evals.numpy())
        weights.append((evecs[0, :] ** 2).numpy())
    grid, density = smoothed_density(tuple(nodes), tuple(weights), num_points, kappa, margin)
    matvecs = sum(len(t) for t in nodes)
    return SpectralDensity(tuple(nodes), tuple(weights), grid, density, dim, matvecs)


@accepts_model_loss
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
    for t in density.nodes:
        ax.plot(t, np.full_like(t, ax.get_ylim()[0]), "|", color="k", ms=8, alpha=0.5)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density φ(λ)")
    steps = max(len(t) for t in density.nodes)
    ax.set_title(title or f"Hessian spectral density (SLQ, {len(density.nodes)}×{steps} steps)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
