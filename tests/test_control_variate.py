"""The output-layer control variate: exact identities against a dense float64 Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatness.control_variate import cv_sq_trace, output_layer
from flatness.hutchinson import sq_trace
from flatness.layerwise import layerwise_sq_trace
from flatness.linear_io import share_prefix
from flatness.probes import sample_probes
from flatness.utils import eval_mode
from helpers import dense_hessian, flat_params, loss_of_flat, tiny_batch, tiny_mlp

CE = nn.functional.cross_entropy


def _last_block(model: nn.Module, H: torch.Tensor) -> torch.Tensor:
    """The rows/columns of the dense Hessian that belong to the output layer (the last params)."""
    sizes = [p.numel() for p in model.parameters()]
    last = sizes[-2] + sizes[-1]
    return H[-last:, -last:]


def test_closed_forms_match_the_dense_block():
    model = tiny_mlp(seed=3)
    x, y = tiny_batch(n=7)
    H = dense_hessian(model, x, y)
    block = _last_block(model, H)
    layer = output_layer(model, CE, x, y)
    assert float(layer.sq_norm().detach()) == pytest.approx(float(block.square().sum()), rel=1e-10)
    params = list(model.parameters())
    v = sample_probes(params, 4, seed=0)
    got = layer.sq_norms(v[-2], v[-1])
    flat_last = torch.cat([v[-2].flatten(1), v[-1]], dim=1)  # (M, C·n + C), parameter order
    want = (flat_last @ block).square().sum(1)
    assert torch.allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize(
    "loss_fn, softmax_form",
    [
        (lambda out, y: CE(out, y, label_smoothing=0.1), True),
        (lambda out, y: CE(out, y, reduction="sum"), True),
        (lambda out, y: CE(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype)), False),
        (lambda out, y: (out - nn.functional.one_hot(y, 3).to(out.dtype)).pow(4).mean(), False),
    ],
)
def test_softmax_and_generic_output_hessians(loss_fn, softmax_form):
    model = tiny_mlp(seed=8)
    x, y = tiny_batch(seed=9, n=5)
    block = _last_block(model, dense_hessian(model, x, y, loss_fn))
    layer = output_layer(model, loss_fn, x, y)
    assert (layer.probs is not None) == softmax_form
    assert float(layer.sq_norm().detach()) == pytest.approx(float(block.square().sum()), rel=1e-9)
    v = sample_probes(list(model.parameters()), 2, seed=1)
    want = (torch.cat([v[-2].flatten(1), v[-1]], dim=1) @ block).square().sum(1)
    assert torch.allclose(layer.sq_norms(v[-2], v[-1]).detach(), want, rtol=1e-9)


def test_each_draw_is_the_identity_and_the_mean_is_unbiased():
    model = tiny_mlp(seed=4)
    x, y = tiny_batch(seed=2, n=6)
    H = dense_hessian(model, x, y)
    block = _last_block(model, H)
    n_last = block.shape[0]
    params = list(model.parameters())

    def by_hand(v: torch.Tensor) -> torch.Tensor:  # (draws, M, d) probes -> (draws,) estimates
        cv = (v @ H).square().sum(-1) - (v[..., -n_last:] @ block).square().sum(-1)
        return block.square().sum() + cv.mean(-1)

    for seed in range(20):  # the library's estimate is the dense formula, draw by draw
        est = cv_sq_trace(model, CE, x, y, probes=2, seed=seed)
        v = torch.cat([b.flatten(1) for b in sample_probes(params, 2, seed=seed)], dim=1)
        assert float(est.detach()) == pytest.approx(float(by_hand(v[None])), rel=1e-9)
    # so its mean and variance are the dense formula's, over many Rademacher draws
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2, (20000, 1, H.shape[0]), generator=gen, dtype=torch.float64) * 2 - 1
    values = by_hand(v)
    plain = (v @ H).square().sum(-1)[:, 0]
    exact = torch.trace(H @ H)
    assert abs(float(values.mean() - exact)) < 4 * float(values.std() / math.sqrt(len(values)))
    assert float(values.var()) < 0.8 * float(plain.var())


def test_one_layer_model_is_exact_for_every_draw_with_exact_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = tiny_batch(seed=5, n=9, d_in=5)
    H = dense_hessian(model, x, y)
    exact = torch.trace(H @ H)
    draws = [cv_sq_trace(model, CE, x, y, probes=1, seed=s) for s in range(3)]
    for d in draws:
        assert float(d.detach()) == pytest.approx(float(exact), rel=1e-10)
    # the gradient of every draw is ∇Tr(H²), from the dense Hessian differentiated by autograd
    theta = flat_params(model).requires_grad_(True)
    f = loss_of_flat(model, x, y)
    dense_grad = torch.autograd.grad(
        torch.trace(torch.linalg.matrix_power(torch.autograd.functional.hessian(f, theta, create_graph=True), 2)),
        theta,
    )[0]
    grads = torch.autograd.grad(draws[1], list(model.parameters()))
    assert torch.allclose(torch.cat([g.flatten() for g in grads]), dense_grad, rtol=1e-8)


def test_layerwise_engine_gives_the_same_estimate():
    model = tiny_mlp(seed=6)
    x, y = tiny_batch(seed=7)
    default = cv_sq_trace(model, CE, x, y, probes=3, seed=11)
    fast = cv_sq_trace(
        model, CE, x, y, probes=3, seed=11,
        sq_norm_mean=lambda vecs: layerwise_sq_trace(model, CE, x, y, probe_vectors=vecs),
    )
    assert torch.isclose(default, fast, rtol=1e-10)
    # and the plain part agrees with sq_trace on the same probes
    v = sample_probes(list(model.parameters()), 3, seed=11)
    plain = sq_trace(CE(model(x), y), list(model.parameters()), probe_vectors=v)
    layer = output_layer(model, CE, x, y)
    assert torch.isclose(default, layer.sq_norm() + plain - layer.sq_norms(v[-2], v[-1]).mean(), rtol=1e-10)


def test_shared_prefix_gives_the_same_estimate_and_gradient():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x, y = tiny_batch(seed=3, n=8, d_in=4)
    params = list(model.parameters())
    with eval_mode(model):
        alone = cv_sq_trace(model, CE, x, y, probes=2, seed=4)
    grads_alone = torch.autograd.grad(alone, params)
    model.train()
    with share_prefix(model) as prefix:
        CE(model(x), y)  # the task's forward, dropout on
    with eval_mode(model):
        shared = cv_sq_trace(model, CE, x, y, probes=2, seed=4, prefix=prefix)
    assert torch.isclose(shared, alone, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(shared, params), grads_alone, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_refuses_models_without_an_output_linear():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    x, y = tiny_batch()
    with pytest.raises(ValueError, match="output of a Linear"):
        cv_sq_trace(model, CE, x, y, probes=1, seed=0)
    shared = nn.Linear(3, 3).double()
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ValueError, match="more than once"):
        cv_sq_trace(twice, CE, x, y, probes=1, seed=0)
    with pytest.raises(ValueError, match="probes"):
        cv_sq_trace(tiny_mlp(), CE, x, y, probes=0)


def test_in_place_activations_give_the_same_estimate():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    inplace = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    inplace.load_state_dict(plain.state_dict())
    x, y = tiny_batch(seed=3)
    a, b = cv_sq_trace(plain, CE, x, y, probes=2, seed=0), cv_sq_trace(inplace, CE, x, y, probes=2, seed=0)
    assert torch.isclose(a, b, rtol=1e-12)
