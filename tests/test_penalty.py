"""FlatnessPenalty: scaling, schedule, eval-mode pass, state restoration, bad input."""

import copy
import math

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty, NonFiniteCurvatureError, sample_probes, sq_trace
from flatness.methods import make_method
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_penalty_is_lambda_times_estimate_over_batch_size():
    model = tiny_mlp(dropout=0.3)
    x, y = tiny_batch(n=6)
    pen = FlatnessPenalty(model, CE, lam=0.5, probes=4, every=1, seed=7)
    value = pen(x, y)
    params = list(model.parameters())
    probes = sample_probes(params, 4, "rademacher", seed=7)
    model.eval()
    expected = 0.5 * sq_trace(CE(model(x), y), params, probe_vectors=probes) / 6
    model.train()
    assert value.requires_grad
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    assert pen.last_sq_trace == pytest.approx(float(expected.detach()) * 6 / 0.5, rel=1e-12)


def test_curvature_pass_runs_in_eval_mode_and_restores_modes():
    model = tiny_mlp(dropout=0.5)
    model[0].eval()  # a mixed-mode model: every submodule's flag must come back as it was
    before = [m.training for m in model.modules()]
    seen = []

    def loss_fn(out, y):
        seen.append([m.training for m in model.modules()])
        return CE(out, y)

    x, y = tiny_batch()
    FlatnessPenalty(model, loss_fn, lam=1.0, probes=2)(x, y)
    # one loss evaluation per estimate (backend="auto" checks its first pass against autograd)
    assert seen and all(modes == [False] * len(before) for modes in seen)
    assert [m.training for m in model.modules()] == before


def test_curvature_pass_is_deterministic_despite_dropout():
    model = tiny_mlp(dropout=0.5)
    x, y = tiny_batch()
    a = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=1)(x, y)
    b = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=1)(x, y)
    assert float(a) == float(b)


def test_lambda_zero_gives_exactly_the_plain_gradient():
    model = tiny_mlp(dropout=0.0)
    x, y = tiny_batch()
    CE(model(x), y).backward()
    plain = _grads(model)
    model.zero_grad()
    pen = FlatnessPenalty(model, CE, lam=0.0, probes=3, every=1)
    (CE(model(x), y) + pen(x, y)).backward()
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(model), strict=True))
    assert pen.last_sq_trace is None  # nothing was computed


def test_every_skips_exactly_the_right_calls():
    model = tiny_mlp()
    x, y = tiny_batch()
    CE(model(x), y).backward()
    plain = _grads(model)
    pen = FlatnessPenalty(model, CE, lam=1.0, probes=2, every=3, seed=0)
    active = []
    for _ in range(10):
        model.zero_grad()
        value = pen(x, y)
        (CE(model(x), y) + value).backward()
        same_as_plain = all(torch.equal(a, b) for a, b in zip(plain, _grads(model), strict=True))
        active.append(not same_as_plain)
        if not active[-1]:
            assert float(value) == 0.0 and not value.requires_grad
    assert active == [c % 3 == 0 for c in range(10)]
    assert pen.calls == 10


def test_penalty_gradient_descends_the_curvature():
    # Descending the penalty alone must lower Tr(H²) (same fixed batch, same probes).
    model = tiny_mlp(seed=3)
    x, y = tiny_batch(seed=4, n=16)
    params = list(model.parameters())
    probes = sample_probes(params, 8, seed=0)
    opt = torch.optim.SGD(params, lr=0.01)
    values = []
    for _ in range(20):
        opt.zero_grad()
        value = sq_trace(CE(model(x), y), params, probe_vectors=probes)
        value.backward()
        opt.step()
        values.append(float(value))
    assert values[-1] < 0.9 * values[0]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trains_with_any_optimizer_and_dtype(opt_cls, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)).to(dtype)
    x = torch.randn(64, 5, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = opt_cls(model.parameters(), lr=0.05)
    method = make_method("fa", model, CE, lam=0.1, probes=2, every=2, seed=0)
    first = None
    for _ in range(60):
        info = method.step(x, y, opt)
        first = info["loss"] if first is None else first
    assert math.isfinite(info["loss"]) and info["loss"] < first
    assert all(p.dtype == dtype for p in model.parameters())
    assert method.penalty.last_sq_trace is not None and model.training


def test_sub_batch_uses_the_first_samples_and_divides_by_full_batch():
    model = tiny_mlp()
    x, y = tiny_batch(n=8)
    pen = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=2, sub_batch=0.5)
    value = pen(x, y)
    params = list(model.parameters())
    probes = sample_probes(params, 3, seed=2)
    expected = sq_trace(CE(model(x[:4]), y[:4]), params, probe_vectors=probes) / 8
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def test_a_raising_call_leaves_mode_and_parameters_unchanged():
    model = tiny_mlp(dropout=0.3)
    model.train()
    state = copy.deepcopy(model.state_dict())

    def bad_loss(out, y):
        if not model.training:
            raise RuntimeError("boom in the curvature pass")
        return CE(out, y)

    pen = FlatnessPenalty(model, bad_loss, lam=1.0, probes=2)
    x, y = tiny_batch()
    with pytest.raises(RuntimeError, match="boom"):
        pen(x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_non_finite_estimate_raises_or_skips_with_warning():
    model = tiny_mlp()
    x, y = tiny_batch()
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteCurvatureError, match="non-finite"):
        FlatnessPenalty(model, CE, lam=1.0)(x, y)
    pen = FlatnessPenalty(model, CE, lam=1.0, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        value = pen(x, y)
    assert float(value) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=-0.1), "lam"),
        (dict(lam=float("nan")), "lam"),
        (dict(probes=0), "probes"),
        (dict(every=0), "every"),
        (dict(dist="cauchy"), "distribution"),
        (dict(sub_batch=1.5), "sub_batch"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_bad_hyper_parameters_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatnessPenalty(tiny_mlp(), CE, **kwargs)


def test_model_without_trainable_parameters_is_rejected():
    model = tiny_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = tiny_batch()
    with pytest.raises(ValueError, match="require grad"):
        FlatnessPenalty(model, CE, lam=1.0)(x, y)


def test_state_dict_resumes_schedule_and_probes():
    model = tiny_mlp()
    x, y = tiny_batch()
    a = FlatnessPenalty(model, CE, lam=1.0, every=2, seed=5)
    a(x, y), a(x, y)
    state = a.state_dict()
    b = FlatnessPenalty(model, CE, lam=1.0, every=2, seed=99)
    b.load_state_dict(state)
    assert float(a(x, y)) == float(b(x, y)) and a.calls == b.calls == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_mlp()
    x, y = tiny_batch()
    cpu = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0)(x, y)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = FlatnessPenalty(gpu_model, CE, lam=1.0, probes=3, seed=0)(x.cuda(), y.cuda())
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-10)
