"""Gaussian probes drawn in the data's image (flatness.layerwise.input_tangent_in_image): the
estimate is Gaussian Hutchinson's, exactly, for a reconstructed probe — value and gradient.
"""

import statistics

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness import FlatnessPenalty, sample_probes, sq_trace
from flatness import layerwise as lw
from flatness.layerwise import input_tangent_in_image, layerwise_sq_trace

CE = nn.CrossEntropyLoss()


def _wide_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()


def _batch(rows: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (rows,), generator=g)


def _dense_sq_trace(model, x, y):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss_of(theta):
        chunks = theta.split([p.numel() for p in params])
        shaped = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return CE(functional_call(model, shaped, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().flatten() for p in params]))
    return float((hessian @ hessian).trace())


def test_image_draw_is_the_estimate_of_a_reconstructed_gaussian_probe():
    """Re-drawing the same stream, V₁ = (X⁺ L Ξ)ᵀ satisfies X V₁ᵀ = L Ξ: with it as an explicit
    probe, generic double backward gives the image route's value and gradient (float64).
    """
    model, (x, y) = _wide_mlp(), _batch()
    params = list(model.parameters())
    fast = layerwise_sq_trace(model, CE, x, y, 3, "gaussian", seed=5)

    gen = torch.Generator().manual_seed(5)
    rest = sample_probes(params[1:], 3, "gaussian", generator=gen)  # every block but W₁, in order
    tangent = input_tangent_in_image(x, 3, 7, gen)  # (3, B, 7)
    v1 = torch.linalg.pinv(x) @ tangent  # (3, 12, 7): X V₁ᵀ = L Ξ (X has full row rank)
    torch.testing.assert_close(x @ v1, tangent, rtol=1e-10, atol=1e-12)
    probes = [v1.transpose(1, 2), *rest]
    slow = sq_trace(CE(model(x), y), params, probe_vectors=probes)
    assert float((fast - slow).abs().detach() / slow.abs().detach()) <= 1e-10
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_image_draw_is_unbiased_against_the_dense_hessian():
    model, (x, y) = _wide_mlp(), _batch()
    exact = _dense_sq_trace(model, x, y)
    values = [float(layerwise_sq_trace(model, CE, x, y, 20, "gaussian", seed=s).detach()) for s in range(150)]
    mean, stderr = statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5
    assert abs(mean - exact) <= 4 * stderr, (mean, stderr, exact)


def test_singular_gram_uses_a_square_root_from_the_eigendecomposition():
    x = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x[3] = x[1]  # repeated row: X Xᵀ is singular, Cholesky fails
    x[4] = 0.0
    t = input_tangent_in_image(x, 4000, 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t[:, 3], t[:, 1])  # the same data row gets the same tangent
    assert float(t[:, 4].abs().max()) < 1e-6
    cov = torch.einsum("mbj,mcj->bc", t, t) / (4000 * 5)
    gram = x @ x.T
    assert float((cov - gram).abs().max() / gram.abs().max()) < 0.06


def test_rademacher_and_narrow_inputs_keep_sample_probes_draws():
    """Only Gaussian probes with fewer rows than input features take the image route; the rest
    draw exactly as sample_probes does.
    """
    model, (x, y) = _wide_mlp(), _batch()
    params = list(model.parameters())
    rad = layerwise_sq_trace(model, CE, x, y, 2, "rademacher", seed=3).detach()
    ref = sq_trace(CE(model(x), y), params, probe_vectors=sample_probes(params, 2, seed=3)).detach()
    assert float(rad) == pytest.approx(float(ref), rel=1e-10)
    tall_x, tall_y = _batch(rows=20)  # B = 20 > 12 input features: direct draw
    gau = layerwise_sq_trace(model, CE, tall_x, tall_y, 2, "gaussian", seed=3).detach()
    probes = sample_probes(params, 2, "gaussian", seed=3)
    ref = sq_trace(CE(model(tall_x), tall_y), params, probe_vectors=probes).detach()
    assert float(gau) == pytest.approx(float(ref), rel=1e-10)


def test_penalty_with_gaussian_probes_takes_the_image_route_after_its_check(monkeypatch):
    model, (x, y) = _wide_mlp(), _batch()
    calls = []
    real = lw.input_tangent_in_image
    monkeypatch.setattr(lw, "input_tangent_in_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    penalty = FlatnessPenalty(model, CE, lam=0.1, probes=2, dist="gaussian", seed=0)
    first = penalty(x, y)  # backend="auto": the check against autograd on shared explicit probes
    assert calls == [] and penalty._layerwise_agrees
    second = penalty(x, y)
    assert calls == [1]
    assert float(first.detach()) > 0 and float(second.detach()) > 0
    second.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_control_variate_with_the_image_draw_is_unbiased():
    from flatness.control_variate import cv_sq_trace

    model, (x, y) = _wide_mlp(), _batch()
    exact = _dense_sq_trace(model, x, y)
    values = []
    for s in range(150):
        gen = torch.Generator().manual_seed(s)
        engine = lambda v, gen=gen: layerwise_sq_trace(model, CE, x, y, dist="gaussian", generator=gen, probe_vectors=v)  # noqa: E731
        values.append(float(cv_sq_trace(model, CE, x, y, 20, "gaussian", generator=gen, sq_norm_mean=engine,
                                        drawn_by_engine=model[0].weight).detach()))
    mean, stderr = statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5
    assert abs(mean - exact) <= 4 * stderr, (mean, stderr, exact)
    with pytest.raises(ValueError, match="drawn_by_engine"):
        cv_sq_trace(model, CE, x, y, 2, "gaussian", sq_norm_mean=engine, drawn_by_engine=model[4].weight)


def test_a_none_block_is_drawn_after_the_given_ones_and_only_the_input_weight_may_be_none():
    model = _wide_mlp()
    x, y = _batch(rows=20)  # B = 20 > 12 inputs: the missing block is drawn directly
    params = list(model.parameters())
    rest = sample_probes(params[1:], 2, "gaussian", seed=1)
    gen = torch.Generator().manual_seed(7)
    with_none = layerwise_sq_trace(model, CE, x, y, dist="gaussian", generator=gen, probe_vectors=[None, *rest])
    w1 = torch.randn((2, *params[0].shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    explicit = layerwise_sq_trace(model, CE, x, y, probe_vectors=[w1, *rest])
    assert float(with_none.detach()) == pytest.approx(float(explicit.detach()), rel=1e-12)
    with pytest.raises(ValueError, match="only the first Linear"):
        layerwise_sq_trace(model, CE, x, y, probe_vectors=[w1, None, *rest[1:]])


def test_penalty_cv_with_gaussian_probes_uses_the_image_draw(monkeypatch):
    model, (x, y) = _wide_mlp(), _batch()
    calls = []
    real = lw.input_tangent_in_image
    monkeypatch.setattr(lw, "input_tangent_in_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    penalty = FlatnessPenalty(model, CE, lam=0.1, probes=2, dist="gaussian", seed=0, estimator="cv")
    penalty(x, y)  # auto's check, explicit probes
    assert calls == []
    value = penalty(x, y)
    assert calls == [1] and float(value.detach()) > 0
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
