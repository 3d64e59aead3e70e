"""The closed-form layer-wise Tr(H²) equals the generic autograd estimate, value and gradient."""

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty, sample_probes, sq_trace
from flatness.layerwise import layerwise_sq_trace, supports

CE = nn.CrossEntropyLoss()


def _bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)


def _mse(out, y):
    return ((out - y) ** 2).mean()


ACTS = [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1)]


def _model(act, out=3, bias=True, flatten=False):
    torch.manual_seed(0)
    layers = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(12, 9, bias=bias), act(), nn.Dropout(0.4), nn.Linear(9, 6), act(),
               nn.Linear(6, 5, bias=bias), nn.Identity(), nn.Linear(5, out)]
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_value_and_gradient_equal_the_autograd_estimator(act, bias, loss):
    out = {"ce": 3, "bce": 1, "mse": 2}[loss]
    model = _model(act, out=out, bias=bias, flatten=(loss == "ce"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 4, generator=g, dtype=torch.float64) if loss == "ce" else torch.randn(
        7, 12, generator=g, dtype=torch.float64)
    loss_fn, y = {
        "ce": (CE, torch.randint(0, 3, (7,), generator=g)),
        "bce": (_bce, torch.randint(0, 2, (7,), generator=g).double()),
        "mse": (_mse, torch.randn(7, 2, generator=g, dtype=torch.float64)),
    }[loss]
    params = list(model.parameters())
    probes = sample_probes(params, 4, "gaussian", seed=1)
    fast = layerwise_sq_trace(model, loss_fn, x, y, probe_vectors=probes)
    slow = sq_trace(loss_fn(model(x), y), params, probe_vectors=probes)
    assert float((fast - slow).abs() / slow.abs()) <= 1e-10
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gram_route_on_a_wide_input_layer_matches():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(8, 300, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    params = list(model.parameters())
    probes = sample_probes(params, 3, seed=0)
    fast = layerwise_sq_trace(model, CE, x, y, probe_vectors=probes)
    slow = sq_trace(CE(model(x), y), params, probe_vectors=probes)
    assert float((fast - slow).abs() / slow) <= 1e-10


def test_supports_rejects_what_it_cannot_do():
    x = torch.randn(4, 12)
    assert supports(nn.Sequential(nn.Linear(12, 3)), x)
    assert not supports(nn.Linear(12, 3), x)  # not a Sequential
    assert not supports(nn.Sequential(nn.Linear(12, 3), nn.GELU()), x)  # unsupported activation
    assert not supports(nn.Sequential(nn.Linear(12, 3), nn.Dropout(0.5)).train(), x)  # live dropout
    assert not supports(nn.Sequential(nn.Linear(12, 3)), x.to_sparse())  # sparse input
    assert not supports(nn.Sequential(nn.Linear(12, 4), nn.Flatten(), nn.Linear(4, 2)), x)
    frozen = nn.Sequential(nn.Linear(12, 3))
    frozen[0].bias.requires_grad_(False)
    assert not supports(frozen, x)


def test_penalty_backends_agree_and_auto_picks_layerwise():
    model = _model(nn.ReLU).train()
    x = torch.randn(6, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    a = FlatnessPenalty(model, CE, lam=0.3, probes=3, seed=4)(x, y)
    b = FlatnessPenalty(model, CE, lam=0.3, probes=3, seed=4, backend="autograd")(x, y)
    c = FlatnessPenalty(model, CE, lam=0.3, probes=3, seed=4, backend="layerwise")(x, y)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-10)
    assert float(a.detach()) == float(c.detach())
    assert model.training


def test_layerwise_backend_refuses_unsupported_models():
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    pen = FlatnessPenalty(model, CE, lam=1.0, backend="layerwise")
    with pytest.raises(ValueError, match="nn.Sequential"):
        pen(torch.randn(5, 4), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="backend"):
        FlatnessPenalty(model, CE, backend="fast")
