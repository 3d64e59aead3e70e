"""SAM: the method equals a hand-written two-step update; the optimizer wrapper agrees with it."""

import copy

import pytest
import torch
from torch import nn

from flatness.methods import make_method
from flatness.methods.sam import SAM
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _grad(model, x, y):
    model.zero_grad()
    CE(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _hand_sam_update(model, x, y, rho, lr, adaptive=False):
    """θ - lr·∇L(θ + ε̂), ε̂ = ρ T²g/‖Tg‖, written out on a copy of the model."""
    params = [p.detach().clone() for p in model.parameters()]
    g = _grad(copy.deepcopy(model), x, y)
    t = [p.abs() if adaptive else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
    far = copy.deepcopy(model)
    with torch.no_grad():
        for q, ti, gi in zip(far.parameters(), t, g, strict=True):
            q.add_(rho * ti * ti * gi / norm)
    g_far = _grad(far, x, y)
    return [p - lr * gf for p, gf in zip(params, g_far, strict=True)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_hand_written_two_step_update(adaptive):
    model = tiny_mlp()
    x, y = tiny_batch()
    expected = _hand_sam_update(model, x, y, rho=0.3, lr=0.1, adaptive=adaptive)
    method = make_method("sam", model, CE, rho=0.3, adaptive=adaptive)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert info["perturbed_loss"] > info["loss"]  # the ascent step went uphill


def test_sam_with_rho_zero_and_dropout_is_the_plain_step_and_keeps_the_rng_stream():
    """The perturbed pass replays the clean pass's dropout mask and draws nothing itself."""
    x, y = tiny_batch(n=8)
    results = []
    for name, hp in (("none", {}), ("sam", {"rho": 0.0})):
        model = tiny_mlp(dropout=0.5)
        torch.manual_seed(11)
        make_method(name, model, CE, **hp).step(x, y, torch.optim.SGD(model.parameters(), lr=0.5))
        results.append(([p.detach().clone() for p in model.parameters()], torch.get_rng_state()))
    (plain, rng_plain), (sam, rng_sam) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, sam, strict=True))
    assert torch.equal(rng_plain, rng_sam)


def test_optimizer_wrapper_matches_the_method_over_several_steps():
    x, y = tiny_batch(n=8)
    a, b = tiny_mlp(), tiny_mlp()
    method = make_method("sam", a, CE, rho=0.2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for _ in range(3):
        method.step(x, y, opt_a)
        opt_b.zero_grad()
        CE(b(x), y).backward()
        opt_b.step(lambda: CE(b(x), y).backward())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_optimizer_wrapper_restores_exactly_when_the_closure_raises():
    model = tiny_mlp()
    x, y = tiny_batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    CE(model(x), y).backward()

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    CE(model(x), y).backward()
    opt.step(lambda: CE(model(x), y).backward())  # usable again after the failure


def test_optimizer_wrapper_first_and_second_step_contract():
    model = tiny_mlp()
    x, y = tiny_batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="backward"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    CE(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    CE(model(x), y).backward()
    opt.second_step(zero_grad=True)
    state = opt.state_dict()
    assert any("momentum_buffer" in s for s in state["state"].values())
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)


def test_optimizer_wrapper_state_dict_round_trip_resumes_identically():
    x, y = tiny_batch()
    a = tiny_mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def sam_step(model, opt):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step(lambda: CE(model(x), y).backward())

    sam_step(a, opt_a)
    b = copy.deepcopy(a)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    sam_step(a, opt_a)
    sam_step(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
