"""The closed-form layer-wise Tr(H²) equals the generic autograd estimate, value and gradient."""

import copy
import warnings

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty, NonFiniteCurvatureError, sample_probes, sq_trace
from flatness.layerwise import layerwise_sq_trace, supports, unsupported_reason

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
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("labels", ["all", "some ignored", "all ignored"])
def test_closed_form_cross_entropy_equals_its_double_backward(labels):
    """nn.CrossEntropyLoss() takes the closed-form softmax gradient and Hessian; a wrapper of the
    same loss takes autograd's double backward: same value and gradient, ignored labels included
    (the mean over the kept rows), zero on both when every label is ignored (torch's backward of
    that NaN loss gives zero gradients).
    """
    model = _model(nn.Tanh, out=4)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (9,), generator=g)
    if labels != "all":
        y[::3] = -100
        if labels == "all ignored":
            y[:] = -100
    params = list(model.parameters())
    probes = sample_probes(params, 3, "rademacher", seed=2)
    fast = layerwise_sq_trace(model, CE, x, y, probe_vectors=probes)
    slow = layerwise_sq_trace(model, lambda out, t: nn.functional.cross_entropy(out, t), x, y, probe_vectors=probes)
    reference = sq_trace(CE(model(x), y), params, probe_vectors=probes)
    if labels == "all ignored":
        assert float(fast) == float(slow) == float(reference) == 0.0
        return
    assert float((fast - slow).abs() / slow.abs()) <= 1e-12
    assert float((fast - reference).abs() / reference.abs()) <= 1e-10
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for weighted in (nn.CrossEntropyLoss(weight=torch.rand(4, dtype=torch.float64)),
                     nn.CrossEntropyLoss(label_smoothing=0.1)):  # not the plain loss: double backward
        value = layerwise_sq_trace(model, weighted, x, y, probe_vectors=probes)
        reference = sq_trace(weighted(model(x), y), params, probe_vectors=probes)
        assert float((value - reference).abs()) <= 1e-10 * float(value)


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
    with pytest.raises(ValueError, match="GELU"):
        pen(torch.randn(5, 4), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="backend"):
        FlatnessPenalty(model, CE, backend="fast")


def test_wide_hidden_layers_take_the_gram_route_and_match():
    """B(d_in + d_out)(2M + 1) < 2M d_in d_out on the hidden layers: the Gram expansion is used."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 3)).double()
    x = torch.randn(5, 40, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    params = list(model.parameters())
    probes = sample_probes(params, 3, "gaussian", seed=2)
    fast = layerwise_sq_trace(model, CE, x, y, probe_vectors=probes)
    slow = sq_trace(CE(model(x), y), params, probe_vectors=probes)
    assert float(((fast - slow).abs() / slow).detach()) <= 1e-10
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- hostile models (issue 15)


class _OwnForward(nn.Sequential):
    def forward(self, x):  # not what Sequential computes
        return super().forward(2.0 * x) + x[:, :3]


def _mlp(cls=nn.Sequential):
    torch.manual_seed(0)
    return cls(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n=8, shape=(6,)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _auto_and_autograd(model, loss_fn, x, y, calls=1):
    """Penalty values of backend='auto' and backend='autograd' with the same seed, per call."""
    auto = FlatnessPenalty(model, loss_fn, lam=1.0, probes=3, seed=0)
    ref = FlatnessPenalty(model, loss_fn, lam=1.0, probes=3, seed=0, backend="autograd")
    return [(float(auto(x, y).detach()), float(ref(x, y).detach())) for _ in range(calls)]


def _tied_module():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), lin, nn.Tanh(), lin, nn.Linear(5, 3)).double()


def _tied_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5),
                          nn.Linear(5, 3)).double()
    model[4].weight = model[2].weight
    return model


def _hooked():
    model = _mlp()
    model.register_forward_hook(lambda mod, inp, out: out * 0.1)
    return model


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _mlp(_OwnForward), "not exactly an nn.Sequential"),
        (_hooked, "forward hook"),
        (_tied_module, "used twice"),
        (_tied_parameter, "shared"),
    ],
    ids=["sequential-subclass", "forward-hook", "module-used-twice", "shared-parameter"],
)
def test_hostile_models_fall_back_to_autograd_or_are_refused(build, match):
    model = build()
    x, y = _data()
    assert unsupported_reason(model, x) is not None and match in unsupported_reason(model, x)
    for auto, ref in _auto_and_autograd(model, CE, x, y):
        assert auto == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match=match):
        FlatnessPenalty(model, CE, lam=1.0, backend="layerwise")(x, y)


def test_a_global_module_hook_disables_the_closed_form():
    model = _mlp()
    x, y = _data()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: None)
    try:
        assert "global" in unsupported_reason(model, x)
        for auto, ref in _auto_and_autograd(model, CE, x, y):
            assert auto == pytest.approx(ref, rel=1e-12)
    finally:
        handle.remove()
    assert supports(model, x)


def test_backward_hooks_disable_the_closed_form():
    model = _mlp()
    model[2].register_full_backward_hook(lambda mod, gin, gout: None)
    assert "backward hook" in unsupported_reason(model, _data()[0])


def test_a_loss_with_a_parameter_term_is_caught_on_the_first_call():
    model = _mlp()
    x, y = _data()

    def loss_with_l2(out, y):
        return CE(out, y) + 0.5 * sum((p**2).sum() for p in model.parameters())

    with pytest.warns(RuntimeWarning, match="not a function of the model output") as record:
        values = _auto_and_autograd(model, loss_with_l2, x, y, calls=3)
    assert len([w for w in record if "closed form" in str(w.message)]) == 1  # warned once
    for auto, ref in values:
        assert auto == pytest.approx(ref, rel=1e-12)


def test_an_agreeing_first_call_keeps_the_closed_form_silently():
    model = _mlp()
    x, y = _data()
    pen = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pen(x, y), pen(x, y)
    assert pen._layerwise_agrees is True


def test_three_d_input_falls_back_and_layerwise_refuses():
    model = _mlp()
    x, y = _data(shape=(4, 6))  # (B, T, F): Linear acts on the last dimension

    def loss_fn(out, y):
        return CE(out.mean(1), y)

    assert "3-D" in unsupported_reason(model, x)
    for auto, ref in _auto_and_autograd(model, loss_fn, x, y):
        assert auto == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="3-D"):
        FlatnessPenalty(model, loss_fn, lam=1.0, backend="layerwise")(x, y)


@pytest.mark.parametrize("first", [nn.Tanh, lambda: nn.ReLU(inplace=True), nn.Flatten])
def test_modules_before_the_first_linear_and_inplace_activations_are_exact(first):
    torch.manual_seed(0)
    model = nn.Sequential(first(), nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4),
                          nn.LeakyReLU(0.2, inplace=True), nn.Linear(4, 3)).double()
    x, y = _data()
    assert supports(model, x)
    params = list(model.parameters())
    probes = sample_probes(params, 3, "gaussian", seed=1)
    fast = layerwise_sq_trace(model, CE, x.clone(), y, probe_vectors=probes)
    slow = sq_trace(CE(model(x.clone()), y), params, probe_vectors=probes)
    assert float(((fast - slow).abs() / slow).detach()) <= 1e-10
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_an_empty_batch_is_a_clear_error():
    model = _mlp()
    x, y = _data(n=0)
    pen = FlatnessPenalty(model, CE, lam=1.0)
    with pytest.raises(ValueError, match="empty batch"):
        pen(x, y)
    assert pen.calls == 0


def test_a_non_finite_penalty_is_caught_like_a_non_finite_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # float32
    x, y = _data()
    x = x.float() * 10
    lam = 3e38  # finite, but λ·Tr(H²)/B overflows float32
    est = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0)
    assert est(x, y) > 0 and 3e38 * est.last_sq_trace / len(x) > torch.finfo(torch.float32).max
    with pytest.raises(NonFiniteCurvatureError, match="penalty"):
        FlatnessPenalty(model, CE, lam=lam, probes=3, seed=0)(x, y)
    with pytest.warns(RuntimeWarning, match="skipped"):
        value = FlatnessPenalty(model, CE, lam=lam, probes=3, seed=0, on_nonfinite="skip")(x, y)
    assert float(value) == 0.0


@pytest.mark.parametrize("sub_batch", [None, 3])
def test_shared_first_layer_gives_the_separate_loss_and_penalty(sub_batch):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 5),
                         nn.Tanh(), nn.Linear(5, 3)).double().train()
    x, y = _data()
    grads, values = [], []
    for fused in (True, False):
        model = copy.deepcopy(base)
        pen = FlatnessPenalty(model, CE, lam=0.7, probes=3, seed=0, sub_batch=sub_batch)
        out = []
        for step in range(3):
            torch.manual_seed(10 + step)  # the same dropout masks on both sides
            model.zero_grad()
            if fused:
                with pen.sharing_first_layer():
                    loss = CE(model(x), y)
                shared = pen._shared is not None
            else:
                loss = CE(model(x), y)
            penalty = pen(x, y)
            if fused:  # the first call checks the closed form against autograd: nothing shared
                assert shared == (step > 0)
            (loss + penalty).backward()
            out.append([float(loss.detach()), float(penalty.detach())])
        grads.append([p.grad.clone() for p in model.parameters()])
        values.append(out)
        assert model.training and pen._layerwise_agrees
    assert sum(values[0], []) == pytest.approx(sum(values[1], []), rel=1e-12)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_fa_method_shares_the_first_layer_and_trains_like_the_plain_loop():
    from flatness.methods import make_method

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 3)).double()
    x, y = _data()
    method_model, loop_model = copy.deepcopy(base), copy.deepcopy(base)
    method = make_method("fa", method_model, CE, lam=0.5, probes=2, seed=0)
    opt_a = torch.optim.SGD(method_model.parameters(), lr=0.1)
    pen = FlatnessPenalty(loop_model, CE, lam=0.5, probes=2, seed=0)
    opt_b = torch.optim.SGD(loop_model.parameters(), lr=0.1)
    used = []
    original = method.penalty._penalty

    def spy(x, y, first, *rest):
        used.append(first is not None)
        return original(x, y, first, *rest)

    method.penalty._penalty = spy
    for step in range(3):
        torch.manual_seed(step)
        method.step(x, y, opt_a)
        torch.manual_seed(step)
        opt_b.zero_grad()
        (CE(loop_model(x), y) + pen(x, y)).backward()
        opt_b.step()
    assert used == [False, True, True]  # the first pass checks the closed form against autograd
    for a, b in zip(method_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
