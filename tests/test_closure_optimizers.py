"""SAM, GNP and NRS as optimizer wrappers driven by ``step(closure)``: the same update as the methods,
BatchNorm running statistics updated once per step (by the pass at θ) when given the model.
"""

import copy

import pytest
import torch
from torch import nn

from flatness.methods import make_method
from flatness.methods.gnp import GNP
from flatness.methods.nrs import NRS
from flatness.methods.sam import SAM

F = nn.functional


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)
    ).double()


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(steps)]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(ta.double(), tb.double(), rtol=1e-10, atol=1e-12), name


def _closure_loop(model, opt, batches, sam_like: bool) -> None:
    for x, y in batches:
        if sam_like:
            def closure(x=x, y=y):  # bound now: called within this iteration only
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.zero_grad()
            closure()  # the pass at θ
            opt.step(closure)
        else:
            def closure(x=x, y=y):
                out = model(x)
                return F.cross_entropy(out, y), out
            opt.step(closure)


@pytest.mark.parametrize("name", ["sam", "gnp"])
def test_sam_and_gnp_wrappers_make_the_methods_update_and_update_bn_once(name):
    batches = _batches()
    a, b = _model(), _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    if name == "sam":
        method = make_method("sam", a, nn.CrossEntropyLoss(), rho=0.2)
        opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.2, model=b, lr=0.1, momentum=0.9)
    else:
        method = make_method("gnp", a, nn.CrossEntropyLoss(), rho=0.05, form="fd", fd_radius=0.2)
        opt_b = GNP(b.parameters(), torch.optim.SGD, rho=0.05, fd_radius=0.2, model=b, lr=0.1, momentum=0.9)
    for x, y in batches:
        method.step(x, y, opt_a)
    _closure_loop(b, opt_b, batches, sam_like=True)
    _assert_same_state(a, b)
    assert int(b[1].num_batches_tracked) == len(batches)


def test_without_the_model_the_closure_updates_bn_a_second_time():
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    _closure_loop(model, opt, _batches(2), sam_like=True)
    assert int(model[1].num_batches_tracked) == 4  # what model= is for


def test_bn_statistics_are_those_of_plain_training_on_the_clean_pass():
    x, y = _batches(1)[0]
    model, plain = _model(), _model()
    opt = GNP(model.parameters(), torch.optim.SGD, rho=0.05, fd_radius=0.2, model=model, lr=0.1)
    _closure_loop(model, opt, [(x, y)], sam_like=True)
    plain(x)  # one train-mode forward at θ
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert torch.equal(model[1].running_var, plain[1].running_var)


def test_nrs_wrapper_makes_the_methods_update_with_dropout_and_bn():
    batches = _batches()
    a, b = _model(dropout=0.3), _model(dropout=0.3)
    method = make_method("nrs", a, nn.CrossEntropyLoss(), eps=0.3, alpha=0.7, seed=5)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = NRS(b.parameters(), torch.optim.SGD, eps=0.3, alpha=0.7, seed=5, model=b, lr=0.1, momentum=0.9)
    torch.manual_seed(11)
    infos = [method.step(x, y, opt_a) for x, y in batches]
    stream_after_method = torch.get_rng_state()
    torch.manual_seed(11)  # the same global stream: the same dropout masks
    _closure_loop(b, opt_b, batches, sam_like=False)
    # the global stream afterwards is that of the method: one mask drawn per step
    assert torch.equal(torch.get_rng_state(), stream_after_method)
    _assert_same_state(a, b)
    assert int(b[1].num_batches_tracked) == len(batches)
    assert float(opt_b.last["kl"]) == pytest.approx(float(infos[-1]["kl"]), rel=1e-9)
    assert float(opt_b.last["perturbed_loss"]) == pytest.approx(float(infos[-1]["perturbed_loss"]), rel=1e-9)


def test_nrs_wrapper_resumes_its_draws_and_says_what_the_closure_must_return():
    model = _model()
    opt = NRS(model.parameters(), torch.optim.SGD, eps=0.1, seed=0, lr=0.1)
    state = copy.deepcopy(opt.state_dict())
    x, y = _batches(1)[0]

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    first = opt.draw([p for p in model.parameters()])[0][0].clone()
    opt.load_state_dict(state)
    assert torch.equal(opt.draw(list(model.parameters()))[0][0], first)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"closure must return \(loss, output\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))  # θ restored
    opt.step(closure)
    with pytest.raises(RuntimeError, match="needs a closure"):
        GNP(model.parameters(), torch.optim.SGD, lr=0.1).step()
