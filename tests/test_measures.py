"""Flatness measures against dense Hessians of tiny float64 models (flatness.measures)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatness import FlatnessError
from flatness.measures import (
    HessianOperator,
    MeasureOptions,
    adaptive_sharpness,
    compute_measures,
    density_of,
    eps_sharpness,
    final_measures,
    fisher_trace,
    hessian_sq_trace,
    hessian_trace,
    hutchinson_trace,
    hutchpp_trace,
    kl_from_logits,
    lanczos,
    last_layer,
    layer_top_eigenvalues,
    model_divergence,
    noisy_loss,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from flatness.measures.divergence import divergence_at
from flatness.measures.functional import collect_batches
from flatness.probes import make_generator, rademacher, random_matrix
from helpers import dense_hessian, tiny_batch, tiny_mlp

CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread avoids thread-pool overhead on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    """A tiny tanh MLP (31 parameters), 16 examples in uneven batches, and its dense Hessian."""
    model = tiny_mlp(seed=0)
    x, y = tiny_batch(seed=1, n=16)
    H = dense_hessian(model, x, y)
    batches = list(zip(x.split(7), y.split(7), strict=True))  # 7 + 7 + 2: the weighting matters
    return model, x, y, batches, H


def _block(H, model, params):
    """Rows/columns of the dense Hessian that belong to ``params``."""
    idx, start = [], 0
    wanted = {id(p) for p in params}
    for p in model.parameters():
        if id(p) in wanted:
            idx.extend(range(start, start + p.numel()))
        start += p.numel()
    idx = torch.tensor(idx)
    return H[idx][:, idx]


# ------------------------------------------------------------------ operator


def test_operator_equals_dense_hessian_over_uneven_batches(problem):
    model, x, y, batches, H = problem
    op = HessianOperator(model, CE, batches)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == H.shape[0] + 5


def test_operator_block_of_the_last_layer(problem):
    model, x, y, batches, H = problem
    name, params = last_layer(model)
    assert name == "2"
    op = HessianOperator(model, CE, batches, params)
    torch.testing.assert_close(op.dense(), _block(H, model, params), rtol=1e-10, atol=1e-12)


def test_operator_loop_fallback_equals_batched(problem):
    model, x, y, batches, H = problem
    op = HessianOperator(model, CE, batches)
    op._batched = False
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)


class SparseLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) * 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=torch.float64))

    def forward(self, x):
        if x.is_sparse:
            return torch.sparse.mm(x, self.weight.T) + self.bias
        return x @ self.weight.T + self.bias


def test_sparse_inputs_give_the_dense_results():
    torch.manual_seed(0)
    model = SparseLinear(6, 3)
    x = torch.randn(10, 6, dtype=torch.float64) * (torch.rand(10, 6) < 0.4)
    y = torch.randint(0, 3, (10,))
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, CE, [(x.to_sparse(), y)])
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)
    dense = fisher_trace(model, CE, [(x, y)]).value
    sparse = fisher_trace(model, CE, [(x.to_sparse(), y)]).value
    assert sparse == pytest.approx(dense, rel=1e-12)


def test_non_finite_loss_is_a_clear_error(problem):
    model, x, y, batches, H = problem
    bad = [(x * float("nan"), y)]
    with pytest.raises(FlatnessError, match="not finite"):
        top_eigenvalues(model, CE, bad, k=1)
    with pytest.raises(FlatnessError, match="no data"):
        HessianOperator(model, CE, [])


# ------------------------------------------------------------------ eigenvalues


def test_top_three_eigenvalues_within_1e6_relative(problem):
    model, x, y, batches, H = problem
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    spec = top_eigenvalues(model, CE, batches, k=3, return_eigenvectors=True)
    got = torch.tensor(spec.eigenvalues, dtype=torch.float64)
    assert ((got - exact).abs() / exact.abs()).max() <= 1e-6
    # eigenvectors: H u = λ u
    torch.testing.assert_close(H @ spec.eigenvectors, spec.eigenvectors * got, rtol=1e-6, atol=1e-8)
    assert spec.condition_number == pytest.approx(float(exact[0] / exact[2]), rel=1e-6)
    lam = exact.clamp(min=0)
    assert spec.effective_dimension(0.5) == pytest.approx(float((lam / (lam + 0.5)).sum()), rel=1e-6)
    assert spec.num_params == 31 and spec.num_matvecs > 0


def test_last_layer_lambda_max_matches_its_dense_block(problem):
    model, x, y, batches, H = problem
    per_layer = layer_top_eigenvalues(model, CE, batches, k=2)
    assert list(per_layer) == ["0", "2"]
    for name, module in [("0", model[0]), ("2", model[2])]:
        block = _block(H, model, list(module.parameters()))
        exact = torch.linalg.eigvalsh(block).flip(0)[:2]
        got = torch.tensor(per_layer[name].eigenvalues, dtype=torch.float64)
        assert ((got - exact).abs() / exact.abs()).max() <= 1e-6


def test_k_versus_number_of_parameters(problem):
    model, x, y, batches, H = problem
    with pytest.raises(FlatnessError, match="larger than the number of parameters"):
        top_eigenvalues(model, CE, batches, k=32)
    with pytest.raises(ValueError, match="positive integer"):
        top_eigenvalues(model, CE, batches, k=0)
    full = top_eigenvalues(model, CE, batches, k=31)  # dense path
    exact = torch.linalg.eigvalsh(H).flip(0)
    np.testing.assert_allclose(full.eigenvalues, exact.numpy(), rtol=1e-8, atol=1e-10)
    assert math.isinf(full.condition_number) or full.eigenvalues[-1] > 0


# ------------------------------------------------------------------ traces


def test_hutchinson_trace_is_unbiased_within_its_standard_error(problem):
    model, x, y, batches, H = problem
    exact = float(torch.trace(H))
    for dist in ("rademacher", "gaussian"):
        est = hessian_trace(model, CE, batches, num_matvecs=300, dist=dist, seed=3)
        assert est.num_samples == 300 and est.stderr > 0
        assert abs(est.value - exact) <= 4 * est.stderr


def test_hutchinson_samples_are_exact_quadratic_forms(problem):
    model, x, y, batches, H = problem
    est = hutchinson_trace(H, num_matvecs=7, seed=5)  # a dense tensor as the operator
    G = random_matrix(31, 7, "rademacher", make_generator(5), torch.float64, "cpu")
    assert set(G.unique().tolist()) == {-1.0, 1.0}
    assert est.value == pytest.approx(float(torch.einsum("ij,ik,kj->", G, H, G)) / 7, rel=1e-10)


def test_operator_row_route_gives_exact_quadratic_forms_and_norms_with_reused_blocks(problem):
    """HessianOperator.quadratic_forms / sq_norms (rows, scratch blocks reused between calls of
    different widths) and Hutchinson's refilled probe block give the dense values, draw for draw.
    """
    model, x, y, batches, H = problem
    op = HessianOperator(model, CE, batches)
    gen = make_generator(2)
    for k in (5, 3, 5):  # a narrower call in between: the scratch blocks must not leak
        G = random_matrix(31, k, "gaussian", gen, torch.float64, "cpu")
        torch.testing.assert_close(op.quadratic_forms(G), torch.einsum("ij,ik,kj->j", G, H, G), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.sq_norms(G), (H @ G).square().sum(0), rtol=1e-10, atol=1e-12)
    est = hutchinson_trace(op, num_matvecs=11, chunk=4, seed=9)  # blocks of 4, 4 and 3 probes
    G = torch.cat(
        [random_matrix(31, k, "rademacher", g, torch.float64, "cpu") for g in [make_generator(9)] for k in (4, 4, 3)], 1
    )
    assert est.value == pytest.approx(float(torch.einsum("ij,ik,kj->", G, H, G)) / 11, rel=1e-10)


def test_single_batch_reductions_match_the_dense_hessian(problem):
    """One batch: each product is reduced as it comes out (no block of products kept), for
    probe blocks drawn as rows, contiguous (P, K) blocks, one or several vectors per backward.
    """
    model, x, y, batches, _ = problem
    H = dense_hessian(model, x, y)
    for max_vectors in (1, 3):
        op = HessianOperator(model, CE, [(x, y)], max_vectors=max_vectors)
        rows_view = random_matrix(31, 5, "gaussian", make_generator(3), torch.float64, "cpu")
        assert rows_view.T.is_contiguous()
        for G in (rows_view, rows_view.contiguous()):
            expected = torch.einsum("ij,ik,kj->j", G, H, G)
            torch.testing.assert_close(op.quadratic_forms(G), expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(op.sq_norms(G), (H @ G).square().sum(0), rtol=1e-10, atol=1e-12)
        assert op.num_matvecs == 20


def test_refilled_probe_blocks_hold_the_fresh_draws():
    for dist in ("rademacher", "gaussian"):
        fresh, refill = make_generator(4), make_generator(4)
        block = None
        for _ in range(3):
            expected = random_matrix(1001, 7, dist, fresh, torch.float32, "cpu")
            block = random_matrix(1001, 7, dist, refill, torch.float32, "cpu", out=block)
            assert torch.equal(block, expected), dist
    with pytest.raises(ValueError, match="contiguous float32"):
        rademacher((4, 3), out=torch.empty(3, 4).T)
    from flatness.measures.operator import rowwise_dots, transposed
    a, b = torch.randn(3, 40000), torch.randn(3, 40000)
    torch.testing.assert_close(rowwise_dots(a, b), (a.double() * b.double()).sum(1), rtol=1e-5, atol=1e-3)
    assert torch.equal(transposed(a.T), a) and torch.equal(transposed(a), a.T.contiguous())


def test_hutchpp_is_unbiased_over_seeds(problem):
    model, x, y, batches, H = problem
    exact = float(torch.trace(H))
    op = HessianOperator(model, CE, batches)
    values = np.array([hutchpp_trace(op, 12, seed=s).value for s in range(40)])
    sem = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - exact) <= 4 * sem + 1e-12
    # with a sketch as wide as the matrix the estimate is exact
    assert hutchpp_trace(op, 93, seed=0).value == pytest.approx(exact, rel=1e-8)


def test_hutchpp_has_lower_variance_than_hutchinson_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.arange(1, 301, dtype=torch.float64) ** -2.0) @ Q.T
    m = 30
    plain = np.array([hutchinson_trace(A, m, seed=s).value for s in range(150)])
    plus = np.array([hutchpp_trace(A, m, seed=s).value for s in range(150)])
    exact = float(torch.trace(A))
    assert abs(plus.mean() - exact) <= 4 * plus.std(ddof=1) / math.sqrt(150)
    assert plus.var(ddof=1) < 0.25 * plain.var(ddof=1)


def test_sq_trace_is_unbiased_and_accumulates_over_batches_first(problem):
    model, x, y, batches, H = problem
    exact = float(torch.trace(H @ H))
    est = hessian_sq_trace(model, CE, batches, num_matvecs=300, seed=1)
    assert abs(est.value - exact) <= 4 * est.stderr
    # the mean of per-batch Tr(H_b²) is a different (larger) number
    per_batch = sum(
        len(xb) / 16 * float(torch.trace(dense_hessian(model, xb, yb) @ dense_hessian(model, xb, yb)))
        for xb, yb in batches
    )
    assert per_batch > exact * 1.05


# ------------------------------------------------------------------ density


def test_lanczos_quadrature_is_exact_for_low_moments(problem):
    model, x, y, batches, H = problem
    op = HessianOperator(model, CE, batches)
    v = torch.randn(31, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    alphas, betas = lanczos(op, v, 5)
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    theta, U = torch.linalg.eigh(T)
    tau = U[0] ** 2
    u = v / v.norm()
    for k in range(10):  # Gauss quadrature with 5 nodes is exact up to degree 9
        exact = float(u @ torch.linalg.matrix_power(H, k) @ u)
        assert float((tau * theta**k).sum()) == pytest.approx(exact, rel=1e-8, abs=1e-12)


def test_density_moments_match_the_exact_spectrum(problem):
    model, x, y, batches, H = problem
    lam = torch.linalg.eigvalsh(H).numpy()
    dens = density_of(H, num_steps=12, num_repeats=300, seed=4)
    for k in range(4):
        per_repeat = np.array([np.sum(w * t**k) for t, w in zip(dens.nodes, dens.weights, strict=True)])
        sem = per_repeat.std(ddof=1) / math.sqrt(len(per_repeat))
        assert abs(dens.moment(k) - np.mean(lam**k)) <= 4 * sem + 1e-10
    # the smoothed density is a probability density over the grid
    assert np.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=0.02)
    low, high = dens.ritz_range
    assert lam.min() - 1e-8 <= low and high <= lam.max() + 1e-8


def test_spectral_density_of_a_model_and_its_plot(problem, tmp_path):
    model, x, y, batches, H = problem
    dens = spectral_density(model, CE, batches, num_steps=31, num_repeats=2, seed=0)
    # 31 steps on a 31-dimensional operator: each quadrature is the exact spectrum seen from v
    lam = torch.linalg.eigvalsh(H).numpy()
    assert dens.ritz_range[1] == pytest.approx(lam.max(), rel=1e-6)
    png = plot_spectral_density(dens, tmp_path / "density.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(dens.save(tmp_path / "density.npz"))
    assert saved["density"].shape == dens.density.shape


# ------------------------------------------------------------------ sharpness


def test_ball_sharpness_lies_between_curvature_bounds(problem):
    model, x, y, batches, H = problem
    eps = 1e-2
    s = eps_sharpness(model, CE, batches, eps, "ball", steps=30, seed=0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = torch.autograd.grad(CE(model(x), y), list(model.parameters()))
    gnorm = float(torch.cat([t.reshape(-1) for t in g]).norm())
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    upper = eps * gnorm + 0.5 * eps**2 * lam_max
    # lower bound: the loss increase along the gradient direction at radius ε
    from helpers import loss_of_flat

    f = loss_of_flat(model, x, y)
    step = torch.cat([t.reshape(-1) for t in g]) / gnorm * eps
    lower = float(f(theta + step) - f(theta))
    assert 0.99 * lower <= s.value <= 1.05 * upper
    assert s.base_loss == pytest.approx(float(CE(model(x), y).detach()), rel=1e-12)


def test_box_sharpness_exceeds_ball_sharpness(problem):
    model, x, y, batches, H = problem
    ball = eps_sharpness(model, CE, batches, 1e-2, "ball", steps=20)
    box = eps_sharpness(model, CE, batches, 1e-2, "box", steps=20)
    assert box.value > ball.value > 0
    assert box.keskar == pytest.approx(100 * box.value / (1 + box.base_loss))


def _relu_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _rescaled(model, a):
    """The same function with layer 1 × a and layer 2's weight / a (ReLU is homogeneous)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(a)
        other[0].bias.mul_(a)
        other[2].weight.div_(a)
    return other


@pytest.mark.parametrize("region", ["box", "ball"])
def test_adaptive_sharpness_is_invariant_to_rescaling_and_plain_is_not(region):
    model = _relu_net()
    x, y = tiny_batch(seed=7, n=20)
    data = [(x, y)]
    other = _rescaled(model, 4.0)
    torch.testing.assert_close(other(x), model(x))
    a1 = adaptive_sharpness(model, CE, data, 0.05, region, steps=10, seed=1)
    a2 = adaptive_sharpness(other, CE, data, 0.05, region, steps=10, seed=1)
    assert a2.value == pytest.approx(a1.value, rel=1e-6)
    p1 = eps_sharpness(model, CE, data, 0.05, region, steps=10, seed=1)
    p2 = eps_sharpness(other, CE, data, 0.05, region, steps=10, seed=1)
    assert abs(p2.value - p1.value) > 0.05 * p1.value


def test_sharpness_rejects_bad_arguments(problem):
    model, x, y, batches, H = problem
    with pytest.raises(ValueError, match="eps"):
        eps_sharpness(model, CE, batches, eps=0.0)
    with pytest.raises(ValueError, match="region"):
        eps_sharpness(model, CE, batches, region="cube")


# ------------------------------------------------------------------ noise, Fisher, divergence


def test_noisy_loss_matches_second_order_expansion(problem):
    model, x, y, batches, H = problem
    sigma = 0.02
    r = noisy_loss(model, CE, batches, sigma=sigma, samples=800, confidence=0.999, seed=2)
    # E L(θ + σξ) = L(θ) + σ²/2 Tr(H) + O(σ⁴)
    expected = r.base_loss + 0.5 * sigma**2 * float(torch.trace(H))
    assert r.ci_low <= expected <= r.ci_high
    assert r.ci_low < r.mean < r.ci_high and r.samples == 800
    again = noisy_loss(model, CE, batches, sigma=sigma, samples=800, confidence=0.999, seed=2)
    assert again.mean == r.mean


def test_fisher_trace_is_the_mean_per_example_squared_gradient_norm(problem):
    model, x, y, batches, H = problem
    loop = []
    for i in range(len(x)):
        g = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        loop.append(float(sum(t.pow(2).sum() for t in g)))
    est = fisher_trace(model, CE, batches)
    assert est.num_samples == 16
    assert est.value == pytest.approx(np.mean(loop), rel=1e-10)
    assert est.stderr == pytest.approx(np.std(loop, ddof=1) / 4, rel=1e-8)


def test_kl_from_logits_softmax_and_sigmoid():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q))
    torch.testing.assert_close(kl_from_logits(p, q), ref)
    a, b = torch.randn(5, 1, generator=gen), torch.randn(5, 1, generator=gen)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(logits=a[:, 0]), torch.distributions.Bernoulli(logits=b[:, 0]))
    torch.testing.assert_close(kl_from_logits(a, b), ref)


def test_model_divergence(problem):
    model, x, y, batches, H = problem
    data = collect_batches(batches)
    assert model_divergence(model, batches, eps=0.0, samples=3).value == 0.0
    delta = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    ref = float(kl_from_logits(model(x), moved(x)).mean().detach())
    assert divergence_at(model, data, delta) == pytest.approx(ref, rel=1e-10)
    small = model_divergence(model, batches, eps=0.05, samples=20, seed=1)
    large = model_divergence(model, batches, eps=0.1, samples=20, seed=1)
    assert large.value / small.value == pytest.approx(4.0, rel=0.1)  # KL is quadratic in δ


# ------------------------------------------------------------------ summaries


def test_compute_measures_and_final_measures(problem):
    model, x, y, batches, H = problem
    out = compute_measures(model, CE, batches, ["loss", "lambda_max", "hessian_trace",
                                                "fisher_trace", "last_layer_lambda_max"])
    assert out["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    assert len(out["top_eigenvalues"]) == 3 and out["last_layer"] == "2"
    with pytest.raises(FlatnessError, match="unknown measure"):
        compute_measures(model, CE, batches, ["flatness"])
    final = final_measures(model, CE, batches, seed=0)
    assert set(final) == {"loss", "lambda_max", "hessian_trace", "hessian_trace_stderr",
                          "fisher_trace"}
    assert final["lambda_max"] == pytest.approx(out["lambda_max"], rel=1e-3)


# ------------------------------------------------------------------ the model is left alone


def _bn_dropout_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(5, 3)).double()
    model.train()
    model(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    model[3].eval()  # mixed modes (BatchNorm in train mode) must come back per submodule
    return model


def _snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def _assert_unchanged(model, snap):
    state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def _measure_calls(model, data, loss_fn):
    return {
        "operator": lambda: HessianOperator(model, loss_fn, data)
        @ torch.ones(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64),
        "trace": lambda: hessian_trace(model, loss_fn, data, 6),
        "hutchpp": lambda: hessian_trace(model, loss_fn, data, 6, "hutch++"),
        "sq_trace": lambda: hessian_sq_trace(model, loss_fn, data, 4),
        "eigen": lambda: top_eigenvalues(model, loss_fn, data, 2),
        "density": lambda: spectral_density(model, loss_fn, data, 4),
        "sharpness": lambda: eps_sharpness(model, loss_fn, data, 0.01, steps=2),
        "adaptive": lambda: adaptive_sharpness(model, loss_fn, data, 0.01, steps=2),
        "noise": lambda: noisy_loss(model, loss_fn, data, samples=3),
        "fisher": lambda: fisher_trace(model, loss_fn, data),
        "divergence": lambda: model_divergence(model, data, samples=2),
        "final": lambda: final_measures(model, loss_fn, data),
    }


MEASURE_NAMES = sorted(_measure_calls(None, None, None))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", MEASURE_NAMES)
def test_measures_leave_the_model_unchanged_also_after_an_exception(name):
    model = _bn_dropout_model()
    x, y = tiny_batch(seed=3, n=12)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    snap = _snapshot(model)
    _measure_calls(model, data, CE)[name]()
    _assert_unchanged(model, snap)

    calls = {"n": 0}
    # fail on the 2nd batch of the first pass, or mid-way through the later ones
    fail_after = 1 if name in ("fisher", "operator", "trace", "sq_trace", "hutchpp", "eigen",
                               "density") else 3

    def failing_loss(out, target):
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise Boom("loss failed")
        return CE(out, target)

    if name == "divergence":  # no loss there: make the model's forward fail on the 4th batch
        data = data + [(x[:, :2], y)]
    with pytest.raises(RuntimeError):
        _measure_calls(model, data, failing_loss)[name]()
    _assert_unchanged(model, snap)


def test_fisher_linear_shortcut_equals_per_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.2), nn.Linear(7, 3)).double()
    model[0].bias.requires_grad_(False)  # a frozen bias is left out of both
    x, y = tiny_batch(seed=2, n=20, d_in=5)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    fast = fisher_trace(model, CE, data, method="closed-form")
    slow = fisher_trace(model, CE, data, method="vmap")
    assert fast.value == pytest.approx(slow.value, rel=1e-10)
    assert fast.stderr == pytest.approx(slow.stderr, rel=1e-8)
    ln = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double().eval()
    with pytest.raises(FlatnessError, match="does not apply"):
        fisher_trace(ln, CE, data, method="closed-form")
    assert fisher_trace(ln, CE, data).value == pytest.approx(  # auto: falls back to vmap
        fisher_trace(ln, CE, data, method="vmap").value, rel=1e-12)


def test_fisher_on_sparse_logistic_regression_both_ways():
    from flatness.layers import SparseLinear

    torch.manual_seed(0)
    model = SparseLinear(12, 4).double()
    x = torch.randn(9, 12, dtype=torch.float64) * (torch.rand(9, 12) < 0.3)
    y = torch.randint(0, 4, (9,))
    data = [(x.to_sparse_csr(), y)]
    fast = fisher_trace(model, CE, data, method="closed-form").value
    assert fast == pytest.approx(fisher_trace(model, CE, data, method="vmap").value, rel=1e-10)
    assert fast == pytest.approx(fisher_trace(model, CE, [(x, y)], method="vmap").value, rel=1e-10)
    op = HessianOperator(model, CE, data)
    torch.testing.assert_close(op.dense(), dense_hessian(model, x, y), rtol=1e-10, atol=1e-12)


def _per_example_loop(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        g = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), params)
        out.append(float(sum(t.pow(2).sum() for t in g)))
    return np.mean(out)


def test_fisher_with_in_place_relu_equals_fisher_without():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    inplace = copy.deepcopy(plain)
    inplace[1].inplace = inplace[3].inplace = True
    x, y = tiny_batch(seed=2, n=20, d_in=5)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    expected = _per_example_loop(plain, x, y)
    for method in ("auto", "closed-form", "vmap"):
        assert fisher_trace(plain, CE, data, method=method).value == pytest.approx(expected, rel=1e-10)
        assert fisher_trace(inplace, CE, data, method=method).value == pytest.approx(expected, rel=1e-10)


def test_fisher_of_a_batchnorm_cnn_deployed_or_with_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    state = copy.deepcopy(model.state_dict())
    deployed = fisher_trace(model, CE, [(x, y)])
    assert deployed.value == pytest.approx(_per_example_loop(copy.deepcopy(model).eval(), x, y), rel=1e-10)
    batch = fisher_trace(model, CE, [(x, y)], function="batch_stats")
    reference = copy.deepcopy(model).eval()  # each example normalised with the batch's statistics
    with torch.no_grad():
        h = model[0](x)
        reference[1].running_mean = h.mean(dim=(0, 2, 3))
        reference[1].running_var = h.var(dim=(0, 2, 3), unbiased=False)
    assert batch.value == pytest.approx(_per_example_loop(reference, x, y), rel=1e-10)
    assert batch.value != pytest.approx(deployed.value, rel=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    out = compute_measures(model, CE, [(x, y)], ["fisher_trace"],
                           options=MeasureOptions(function="batch_stats"))
    assert out["fisher_trace"] == pytest.approx(batch.value, rel=1e-12)
    with pytest.raises(FlatnessError, match="function"):
        MeasureOptions(function="train")
