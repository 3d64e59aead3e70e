"""Mixed precision and torch.compile: the penalty (every backend) and SAM under bf16 autocast on the
CPU; compiled models get the penalty through their eager module, or one clear error.
"""

import warnings

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty
from flatness.methods import make_method
from flatness.methods.sam import SAM

F = nn.functional
BACKENDS = [("auto", "hutchinson"), ("autograd", "hutchinson"), ("layerwise", "hutchinson"),
            ("finite-difference", "hutchinson"), ("kfac", "hutchinson"), ("auto", "cv")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _penalty_and_grads(backend: str, estimator: str, autocast: bool) -> tuple[float, list[torch.Tensor], list]:
    model = _model()
    x, y = _batch()
    penalty = FlatnessPenalty(model, F.cross_entropy, lam=0.1, probes=4, seed=0, backend=backend, estimator=estimator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second call: the closed-form check is done, warnings said once
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                value = penalty(x, y)
            value.backward()
    return float(value), [p.grad.clone() for p in model.parameters()], caught


@pytest.mark.parametrize("backend,estimator", BACKENDS)
def test_every_backend_runs_under_bf16_autocast_close_to_full_precision(backend, estimator):
    full, full_grads, _ = _penalty_and_grads(backend, estimator, autocast=False)
    low, low_grads, caught = _penalty_and_grads(backend, estimator, autocast=True)
    assert low == pytest.approx(full, rel=0.05)  # the same probes; bf16 keeps ~3 digits
    for a, b in zip(low_grads, full_grads, strict=True):
        assert torch.isfinite(a).all()
        assert torch.linalg.vector_norm(a - b) <= 0.1 * torch.linalg.vector_norm(b) + 1e-6
    messages = [str(w.message) for w in caught]
    if backend == "finite-difference":  # it cannot: one line, once, and full precision instead
        assert len(messages) == 1 and "cannot run under torch.bfloat16 autocast" in messages[0]
        assert low == full
    else:  # auto's closed-form check compares in full precision: no false alarm
        assert messages == []


def test_auto_keeps_the_closed_form_under_autocast():
    model = _model()
    penalty = FlatnessPenalty(model, F.cross_entropy, lam=0.1, probes=2, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty(*_batch())
    assert penalty._layerwise_agrees is True


def _sam_steps(autocast: bool, wrapper: bool) -> list[torch.Tensor]:
    model = _model()
    x, y = _batch()
    if wrapper:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, lr=0.1)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.zero_grad()
            closure()
            opt.step(closure)
    else:
        sam = make_method("sam", model, nn.CrossEntropyLoss(), rho=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                sam.step(x, y, opt)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("wrapper", [False, True], ids=["method", "wrapper"])
def test_sam_under_bf16_autocast_follows_the_full_precision_run(wrapper):
    start = [p.detach().clone() for p in _model().parameters()]
    full, low = _sam_steps(False, wrapper), _sam_steps(True, wrapper)
    for s, a, b in zip(start, low, full, strict=True):
        assert torch.isfinite(a).all() and a.dtype == torch.float32  # the weights stay float32
        moved = torch.linalg.vector_norm(b - s)
        assert torch.linalg.vector_norm(a - b) <= 0.25 * moved  # bf16 forward: a few % per step


def test_a_compiled_part_is_one_clear_error_naming_the_first_order_backend():
    model = _model()
    model[0] = torch.compile(model[0])  # lazy: nothing is compiled here
    message = r"backend='autograd' differentiates twice .* \['0'\] .* backend='finite-difference'"
    with pytest.raises(ValueError, match=message):
        FlatnessPenalty(model, F.cross_entropy, backend="autograd")
    FlatnessPenalty(model, F.cross_entropy, backend="finite-difference")  # first-order: accepted
    inplace = _model()
    inplace.compile()
    with pytest.raises(ValueError, match=r"compiled part\(s\) \[''\]"):
        FlatnessPenalty(inplace, F.cross_entropy)


def test_a_compiled_model_is_penalised_through_its_eager_module():
    model = _model()
    compiled = torch.compile(model)
    x, y = _batch()
    via_compiled = FlatnessPenalty(compiled, F.cross_entropy, lam=0.1, probes=3, seed=0, backend="autograd")
    plain = FlatnessPenalty(model, F.cross_entropy, lam=0.1, probes=3, seed=0, backend="autograd")
    assert via_compiled.local_model is model
    a = via_compiled(x, y)  # the curvature pass runs eagerly: nothing gets compiled here
    a.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    b = plain(x, y)
    b.backward()
    assert float(a) == float(b)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@pytest.mark.slow
def test_a_training_step_of_a_compiled_model_with_the_penalty():
    model = _model()
    compiled = torch.compile(model)
    x, y = _batch()
    penalty = FlatnessPenalty(compiled, F.cross_entropy, lam=0.1, probes=2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (F.cross_entropy(compiled(x), y) + penalty(x, y)).backward()  # compiled forward, eager curvature
    opt.step()
    assert penalty.last_sq_trace > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def _fp16_sam_recipe(scaled: bool) -> list[torch.Tensor]:
    """docs/integrations.md's fp16 + GradScaler sequence for the SAM wrapper (on the CPU)."""
    model = _model()
    x, y = _batch()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
    for _ in range(3):
        sam.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaled):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        sam.first_step(zero_grad=True)  # ε̂ does not depend on the gradient's scale
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaled):
            perturbed_loss = F.cross_entropy(model(x), y)
        scaler.scale(perturbed_loss).backward()
        sam.restore()
        scaler.step(sam.base_optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def test_the_documented_fp16_gradscaler_sequence_for_sam():
    start = [p.detach().clone() for p in _model().parameters()]
    full, scaled = _fp16_sam_recipe(False), _fp16_sam_recipe(True)
    for s, a, b in zip(start, scaled, full, strict=True):
        assert torch.linalg.vector_norm(a - b) <= 0.05 * torch.linalg.vector_norm(b - s)
