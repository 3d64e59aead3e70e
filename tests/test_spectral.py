"""The spectral engines without curvlinops: thick-restart Lanczos (top eigenvalues), the operator's
SciPy adapter, Papyan's smoothing of SLQ quadratures (float64, exact references).
"""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from flatness.measures import HessianOperator, eigenvalues_of
from flatness.measures.density import smoothed_density
from helpers import dense_hessian, tiny_batch, tiny_mlp

CE = nn.functional.cross_entropy


def _spectrum_matrix(values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(values, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("num_vectors", [None, 12])  # 12: a small basis, so restarts happen
def test_thick_restart_lanczos_finds_a_repeated_top_eigenvalue(num_vectors):
    values = torch.cat([torch.tensor([10.0, 9.5, 9.5, 9.0]), torch.linspace(-1.0, 5.0, 196)])
    A = _spectrum_matrix(values)
    spec = eigenvalues_of(A, 4, num_vectors=num_vectors, return_eigenvectors=True)
    np.testing.assert_allclose(spec.eigenvalues, [10.0, 9.5, 9.5, 9.0], rtol=1e-9)
    U = spec.eigenvectors
    torch.testing.assert_close(A @ U, U * torch.tensor(spec.eigenvalues, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)


def test_lanczos_continues_past_an_invariant_subspace():
    A = torch.diag(torch.cat([torch.full((5,), 2.0), torch.ones(50)])).double()
    spec = eigenvalues_of(A, 3)
    np.testing.assert_allclose(spec.eigenvalues, [2.0, 2.0, 2.0], rtol=1e-12)


def test_lambda_max_tolerance_bounds_the_relative_error_and_the_products():
    values = torch.cat([torch.tensor([5.0]), 4.0 * torch.rand(499, generator=torch.Generator().manual_seed(1))])
    A = _spectrum_matrix(values, seed=3)
    loose = eigenvalues_of(A, 1, tol=1e-3)
    tight = eigenvalues_of(A, 1)
    assert abs(loose.lambda_max - 5.0) <= 1e-3 * 5.0 and tight.lambda_max == pytest.approx(5.0, rel=1e-10)
    assert loose.num_matvecs < tight.num_matvecs <= 100


def test_operator_to_scipy_is_the_same_operator():
    model = tiny_mlp(seed=0)
    x, y = tiny_batch(seed=1, n=16)
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, CE, [(x, y)])
    lin = op.to_scipy()
    v = np.random.default_rng(0).standard_normal((31, 2))
    np.testing.assert_allclose(lin @ v, (H @ torch.from_numpy(v)).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lin.rmatvec(v[:, 0]), H.numpy() @ v[:, 0], rtol=1e-10, atol=1e-12)
    top = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top)[::-1], torch.linalg.eigvalsh(H).flip(0)[:2].numpy(), rtol=1e-8)
    with pytest.raises(ValueError, match="expected a"):
        op @ torch.zeros(30, dtype=torch.float64)


def test_smoothing_is_papyans_gaussian_mixture():
    nodes = (np.array([-1.0, 0.0, 2.0]),)
    weights = (np.array([0.2, 0.5, 0.3]),)
    grid, dens = smoothed_density(nodes, weights, num_points=401, kappa=3.0, margin=0.1)
    assert grid[0] == pytest.approx(-1.3) and grid[-1] == pytest.approx(2.3)
    half = 1.8  # half-width of the grid [-1.3, 2.3]
    sigma = 2.0 / 2 / np.sqrt(8 * np.log(3.0)) * half  # m = 3 nodes, in units of λ
    expected = sum(
        w * np.exp(-0.5 * ((grid - t) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        for t, w in zip(nodes[0], weights[0], strict=True)
    )
    np.testing.assert_allclose(dens, expected, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="kappa"):
        smoothed_density(nodes, weights, kappa=1.0)
