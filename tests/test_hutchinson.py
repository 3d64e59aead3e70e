"""Exactness of the Hutchinson Tr(H²) estimator against dense Hessians (float64)."""

import copy

import pytest
import torch
from torch import nn

from flatness import hvp, measure_sq_trace, sample_probes, sq_trace, sq_trace_samples
from helpers import dense_hessian, flat_params, loss_of_flat, tiny_batch, tiny_mlp


def _split_like(model, flat):
    """A flat (M, d) tensor as one (M, *p.shape) block per parameter."""
    out, start = [], 0
    for p in model.parameters():
        out.append(flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape))
        start += p.numel()
    return out


def _flat_blocks(blocks):
    return torch.cat([b.flatten(1) for b in blocks], dim=1)


@pytest.mark.parametrize("batched", [True, False])
def test_hvp_matches_dense_hessian(batched):
    model = tiny_mlp()
    x, y = tiny_batch()
    H = dense_hessian(model, x, y)
    V = torch.randn(4, H.shape[0], dtype=torch.float64)
    loss = nn.functional.cross_entropy(model(x), y)
    prods = hvp(loss, list(model.parameters()), _split_like(model, V), batched=batched)
    torch.testing.assert_close(_flat_blocks(prods), V @ H, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_each_probe_equals_vT_H2_v(dist):
    model = tiny_mlp()
    x, y = tiny_batch()
    H = dense_hessian(model, x, y)
    params = list(model.parameters())
    probes = sample_probes(params, 7, dist, seed=3)
    loss = nn.functional.cross_entropy(model(x), y)
    samples = sq_trace_samples(loss, params, probe_vectors=probes)
    V = _flat_blocks(probes)
    exact = torch.einsum("md,de,ef,mf->m", V, H, H, V)
    rel = ((samples - exact).abs() / exact.abs()).max()
    assert rel <= 1e-10


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_mean_over_many_probes_is_within_one_percent(dist):
    model = tiny_mlp(seed=2)
    x, y = tiny_batch(seed=5)
    H = dense_hessian(model, x, y)
    exact = torch.trace(H @ H)
    loss = nn.functional.cross_entropy(model(x), y)
    est = sq_trace(loss, list(model.parameters()), probes=40_000, dist=dist, seed=11,
                   create_graph=False)
    assert abs(float(est) - float(exact)) / float(exact) <= 0.01


def test_rademacher_probes_are_pm_one_and_gaussian_has_unit_variance():
    p = torch.zeros(1000, 10, dtype=torch.float64, requires_grad=True)
    rad = sample_probes([p], 3, "rademacher", seed=0)[0]
    assert rad.shape == (3, 1000, 10) and rad.dtype == torch.float64
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    gau = sample_probes([p], 3, "gaussian", seed=0)[0]
    assert abs(float(gau.var()) - 1.0) < 0.05


def test_seed_and_generator_reproduce_the_same_probes():
    p = torch.zeros(5, 4, requires_grad=True)
    a = sample_probes([p], 3, seed=123)[0]
    b = sample_probes([p], 3, generator=torch.Generator().manual_seed(123))[0]
    c = sample_probes([p], 3, seed=124)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_penalty_gradient_matches_central_finite_differences():
    model = tiny_mlp(seed=4)
    x, y = tiny_batch(seed=6)
    params = list(model.parameters())
    probes = sample_probes(params, 3, "rademacher", seed=9)
    f = loss_of_flat(model, x, y)

    def estimate(theta):
        theta = theta.detach().requires_grad_(True)
        loss = f(theta)
        g = torch.autograd.grad(loss, theta, create_graph=True)[0]
        V = _flat_blocks(probes)
        # (M, d) Hessian-vector products of the flat function with the same probes
        Hv = torch.stack([torch.autograd.grad(g @ v, theta, retain_graph=True, create_graph=True)[0]
                          for v in V])
        return Hv.pow(2).sum(1).mean(), theta

    # autograd gradient through the library's estimator (third order)
    loss = nn.functional.cross_entropy(model(x), y)
    value = sq_trace(loss, params, probe_vectors=probes)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
    # the same quantity, central differences, coordinate by coordinate
    theta0 = flat_params(model)
    h = 1e-5
    fd = torch.empty_like(theta0)
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[i] = h
        fd[i] = (estimate(theta0 + e)[0] - estimate(theta0 - e)[0]) / (2 * h)
    assert float(value.detach()) == pytest.approx(float(estimate(theta0)[0]), rel=1e-12)
    assert float((grad - fd).norm() / grad.norm()) <= 1e-5


def test_measurement_variant_builds_no_graph_and_reports_stderr():
    model = tiny_mlp()
    x, y = tiny_batch()
    H = dense_hessian(model, x, y)
    loss = nn.functional.cross_entropy(model(x), y)
    est = measure_sq_trace(loss, list(model.parameters()), probes=2000, seed=0, batch_probes=256)
    assert est.num_samples == 2000 and est.stderr > 0
    exact = float(torch.trace(H @ H))
    assert abs(est.value - exact) <= 4 * est.stderr
    detached = sq_trace(loss, list(model.parameters()), probes=2, seed=0, create_graph=False)
    assert not detached.requires_grad


def test_linear_model_parameters_without_curvature_give_zero():
    # MSE of a linear model: the gradient w.r.t. the bias of a constant-offset term is linear.
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, dtype=torch.float64, requires_grad=True)  # enters linearly: no curvature
    x = torch.randn(10, 3, dtype=torch.float64)
    loss = ((x @ w) ** 2).mean() + c.sum()
    H = 2 * x.T @ x / 10
    est = sq_trace(loss, [w, c], probes=5000, seed=0, create_graph=False)
    assert float(est) == pytest.approx(float(torch.trace(H @ H)), rel=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dist="uniform"), "distribution"),
        (dict(probes=0), "probes must be >= 1"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    model = tiny_mlp()
    x, y = tiny_batch()
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match=match):
        sq_trace(loss, list(model.parameters()), **kwargs)


def test_non_scalar_loss_and_frozen_params_are_rejected():
    model = tiny_mlp()
    x, y = tiny_batch()
    per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(ValueError, match="scalar"):
        sq_trace(per_sample, list(model.parameters()))
    frozen = torch.zeros(3, dtype=torch.float64)
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="do not require grad"):
        sq_trace(loss, [frozen])


def test_float32_sq_trace_is_within_1e6_of_float64_on_the_paper_mlp():
    """The 1.6 M-entry input block of the CIFAR-100 MLP: float32 sums of squares stay accurate
    (``vector_norm(hv).square()`` came out 6e-5 low there).
    """
    from flatness.layerwise import layerwise_sq_trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 100))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3072, generator=g), torch.randint(0, 100, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    probes = sample_probes(params, 2, seed=0)
    model64 = copy.deepcopy(model).double()
    params64 = list(model64.parameters())
    reference = float(sq_trace(loss_fn(model64(x.double()), y), params64,
                               probe_vectors=[v.double() for v in probes], create_graph=False))
    values = {
        "autograd": sq_trace(loss_fn(model(x), y), params, probe_vectors=probes),
        "layerwise": layerwise_sq_trace(model, loss_fn, x, y, probe_vectors=probes),
        "per-probe": sq_trace_samples(loss_fn(model(x), y), params, probe_vectors=probes).mean(),
    }
    for name, value in values.items():
        assert value.dtype == torch.float32
        assert abs(float(value.detach()) - reference) <= 1e-6 * reference, name
