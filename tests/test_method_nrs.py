"""NRS and RPR: the KL term vanishes at ε = 0, the gradient matches a two-model hand
computation, δθ is uniform in the ε-ball, and the model divergence is the KL divergence.
"""

import copy
import math

import pytest
import torch
from torch import nn

from flatness.methods import make_method
from flatness.methods.nrs import model_divergence, sample_in_ball
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _step(name, model, x, y, lr=0.0, **hp):
    method = make_method(name, model, CE, **hp)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=lr))
    return info, [p.grad.clone() for p in model.parameters()]


def test_kl_term_is_exactly_zero_at_eps_zero_even_with_dropout():
    model = tiny_mlp(dropout=0.5)
    x, y = tiny_batch(n=8)
    torch.manual_seed(2)
    info, grads = _step("nrs", model, x, y, eps=0.0, alpha=1.0, seed=0)
    assert info["kl"] == 0.0
    assert info["perturbed_loss"] == info["loss"]
    plain = tiny_mlp(dropout=0.5)
    torch.manual_seed(2)
    _, plain_grads = _step("none", plain, x, y)
    for g, pg in zip(grads, plain_grads, strict=True):  # L(θ) + 0 + L(θ): twice the plain gradient
        torch.testing.assert_close(g, 2 * pg, rtol=1e-12, atol=1e-14)


def test_rpr_at_eps_zero_is_the_plain_step():
    x, y = tiny_batch(n=8)
    results = []
    for name, hp in (("none", {}), ("rpr", {"eps": 0.0, "seed": 0})):
        model = tiny_mlp(dropout=0.5)
        torch.manual_seed(4)
        _step(name, model, x, y, lr=0.3, **hp)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_nrs_gradient_matches_a_two_model_hand_computation():
    model = tiny_mlp()
    x, y = tiny_batch()
    eps, alpha = 0.5, 1.7
    gen = torch.Generator().manual_seed(9)
    delta = sample_in_ball(list(model.parameters()), eps, gen)
    near, far = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for q, d in zip(far.parameters(), delta, strict=True):
            q.add_(d)
    p_near = torch.softmax(near(x), dim=1)
    p_far = torch.softmax(far(x), dim=1)
    kl = (p_near * (p_near.log() - p_far.log())).sum(dim=1).mean()
    (CE(near(x), y) + alpha * kl + CE(far(x), y)).backward()
    expected = [a.grad + b.grad for a, b in zip(near.parameters(), far.parameters(), strict=True)]

    info, grads = _step("nrs", model, x, y, eps=eps, alpha=alpha, seed=9)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert info["kl"] == pytest.approx(float(kl.detach()), rel=1e-10)


def test_rpr_gradient_is_the_gradient_at_the_neighbour():
    model = tiny_mlp()
    x, y = tiny_batch()
    gen = torch.Generator().manual_seed(3)
    delta = sample_in_ball(list(model.parameters()), 0.4, gen)
    far = copy.deepcopy(model)
    with torch.no_grad():
        for q, d in zip(far.parameters(), delta, strict=True):
            q.add_(d)
    CE(far(x), y).backward()
    _, grads = _step("rpr", model, x, y, eps=0.4, seed=3)
    for g, q in zip(grads, far.parameters(), strict=True):
        torch.testing.assert_close(g, q.grad, rtol=1e-10, atol=1e-12)


def test_sample_in_ball_is_uniform_in_the_ball():
    params = [torch.zeros(1), torch.zeros(1)]  # d = 2: P(‖δ‖ < ε/2) = 1/4
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [torch.cat(sample_in_ball(params, 2.0, gen, dist="gaussian")) for _ in range(4000)]
    )
    radii = samples.norm(dim=1)
    assert float(radii.max()) <= 2.0 + 1e-6
    assert abs(float((radii < 1.0).float().mean()) - 0.25) < 0.03
    assert abs(float((radii < 2.0 * math.sqrt(0.5)).float().mean()) - 0.5) < 0.03
    assert samples.mean(dim=0).abs().max() < 0.1  # no preferred direction
    angles = torch.atan2(samples[:, 1], samples[:, 0])  # uniform direction on the circle
    assert abs(float((angles.abs() < math.pi / 4).float().mean()) - 0.25) < 0.03


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_sample_in_ball_in_high_dimension_lies_near_the_sphere(dist):
    gen = torch.Generator().manual_seed(0)
    big = [torch.zeros(300, 200), torch.zeros(77)]
    delta = torch.cat([d.reshape(-1) for d in sample_in_ball(big, 0.1, gen, dist=dist)])
    assert 0.0999 < float(delta.double().norm()) <= 0.1 * (1 + 1e-4)  # float32 entries
    if dist == "rademacher":  # random signs: every entry has the same magnitude
        torch.testing.assert_close(delta.abs(), delta.abs()[:1].expand_as(delta))
        assert abs(float((delta > 0).float().mean()) - 0.5) < 0.01
    assert abs(float(delta.double().sum())) < 5 * 0.1  # isotropic: the sum has std ‖δ‖ ≈ ε


def test_model_divergence_is_the_kl_divergence_of_the_predicted_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    torch.testing.assert_close(
        model_divergence(a, b), (p * (p / q).log()).sum(1).mean(), rtol=1e-12, atol=0
    )
    a1, b1 = a[:, :1], b[:, :1]  # one logit: Bernoulli
    s, t = torch.sigmoid(a1), torch.sigmoid(b1)
    bern = (s * (s / t).log() + (1 - s) * ((1 - s) / (1 - t)).log()).mean()
    torch.testing.assert_close(model_divergence(a1, b1), bern, rtol=1e-10, atol=0)
    assert float(model_divergence(a, a)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        model_divergence(a, b[:, :3])


def test_generator_state_round_trip_reproduces_the_perturbations():
    x, y = tiny_batch()
    a = tiny_mlp()
    method = make_method("nrs", a, CE, eps=0.3, seed=1)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    method.step(x, y, opt)
    b = copy.deepcopy(a)
    twin = make_method("nrs", b, CE, eps=0.3)
    twin.load_state_dict(copy.deepcopy(method.state_dict()))
    method.step(x, y, opt)
    twin.step(x, y, torch.optim.SGD(b.parameters(), lr=0.1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
