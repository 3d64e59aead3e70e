"""The Tr(H²) estimators: each against a dense float64 Hessian (or autograd), their declared
sharing and support (autocast, torch.compile, DDP) and the one registry that picks them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flatness import FlatnessPenalty, ModelLoss
from flatness.batch_loss import adapt, as_pair
from flatness.estimators import (
    BACKENDS,
    AutogradEstimator,
    ControlVariateEstimator,
    Estimator,
    FiniteDifferenceEstimator,
    KFACEstimator,
    LayerwiseEstimator,
    Share,
    estimate,
    make_estimator,
)
from flatness.kfac import kfac_sq_trace
from flatness.probes import sample_probes
from flatness.utils import eval_mode
from helpers import dense_hessian, tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()
HUTCHINSON = [("autograd", "hutchinson"), ("layerwise", "hutchinson"), ("auto", "hutchinson"),
              ("autograd", "cv"), ("layerwise", "cv"), ("auto", "cv")]
ALL = HUTCHINSON + [("finite-difference", "hutchinson"), ("kfac", "hutchinson")]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat_probes(model: nn.Module, num: int, seed: int) -> torch.Tensor:
    blocks = sample_probes(list(model.parameters()), num, generator=_gen(seed))
    return torch.cat([b.flatten(1) for b in blocks], dim=1)  # (M, d)


def _dense_expectation(model, x, y, num, seed, control_variate):
    """(1/M) Σ_j ‖H v_j‖² on the estimator's own probes, from the dense Hessian (eval mode);
    with the control variate, ‖H_LL‖² + (1/M) Σ_j (‖H v_j‖² − ‖H_LL v_j,L‖²).
    """
    with eval_mode(model):
        H = dense_hessian(model, x, y)
    V = _flat_probes(model, num, seed)
    sampled = (V @ H).square().sum(1).mean()
    if not control_variate:
        return float(sampled)
    last = sum(p.numel() for p in list(model.parameters())[-2:])
    H_LL = H[-last:, -last:]
    subtracted = (V[:, -last:] @ H_LL).square().sum(1).mean()
    return float(H_LL.square().sum() + sampled - subtracted)


@pytest.mark.parametrize("backend, kind", HUTCHINSON)
def test_hutchinson_estimators_equal_the_dense_hessian_on_their_probes(backend, kind):
    model = tiny_mlp(seed=1, dropout=0.3).train()  # dropout: off in the curvature pass
    x, y = tiny_batch(seed=2)
    est = make_estimator(backend, kind, model, CE, probes=3, generator=_gen(5))
    assert isinstance(est, Estimator)
    value = estimate(est, x, y)
    assert float(value) == pytest.approx(_dense_expectation(model, x, y, 3, 5, kind == "cv"), rel=1e-10)
    # the gradient: the same as autograd's estimator on the same probes (third derivatives)
    reference = make_estimator("autograd", kind, model, CE, probes=3, generator=_gen(5))
    params = list(model.parameters())
    expected = torch.autograd.grad(estimate(reference, x, y), params)
    for a, b in zip(torch.autograd.grad(value, params), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert model.training  # modes restored


def test_finite_difference_estimator_approaches_the_dense_hessian():
    model = tiny_mlp(seed=1)
    x, y = tiny_batch(seed=2)
    est = make_estimator("finite-difference", "hutchinson", model, CE, probes=3, generator=_gen(5))
    assert isinstance(est, FiniteDifferenceEstimator)
    value = estimate(est, x, y)
    assert float(value) == pytest.approx(_dense_expectation(model, x, y, 3, 5, False), rel=1e-4)
    assert all(g is not None for g in torch.autograd.grad(value, list(model.parameters())))


def test_kfac_estimator_is_the_sampled_fisher_of_autograd_for_one_example_and_both_reductions():
    torch.manual_seed(1)
    model = nn.Linear(5, 4).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        value = estimate(KFACEstimator(model, nn.CrossEntropyLoss(reduction=reduction), generator=_gen(3)), x, None)
        label = torch.multinomial(model(x).softmax(1).detach(), 1, generator=_gen(3)).squeeze(1)
        grads = torch.autograd.grad(CE(model(x), label), list(model.parameters()))
        flat = torch.cat([g.flatten() for g in grads])
        assert float(value) == pytest.approx(float(torch.outer(flat, flat).square().sum()), rel=1e-12)
    x, y = tiny_batch(seed=4)
    mlp = tiny_mlp(seed=2)
    with eval_mode(mlp):
        ref = kfac_sq_trace(mlp, CE, x, y, seed=0)
    assert torch.equal(estimate(KFACEstimator(mlp, CE, generator=_gen(0)), x, y), ref)


def test_declared_sharing():
    model = tiny_mlp()
    x, y = tiny_batch()
    declared = {b: make_estimator(b, "hutchinson", model, CE).shares for b in BACKENDS}
    assert declared == {"auto": Share.FIRST_LAYER, "autograd": Share.NOTHING, "layerwise": Share.FIRST_LAYER,
                        "finite-difference": Share.TASK_GRADIENT, "kfac": Share.PREFIX}
    assert make_estimator("auto", "cv", model, CE).shares == Share.PREFIX
    auto = make_estimator("auto", "hutchinson", model, CE)
    assert auto.ready() == Share.NOTHING  # not before its check against autograd
    estimate(auto, x, y)
    assert auto.ready() == Share.FIRST_LAYER and auto.state_dict() == {"layerwise_agrees": True}
    fd = make_estimator("finite-difference", "hutchinson", tiny_mlp(dropout=0.5).train(), CE)
    assert fd.ready() == Share.NOTHING  # dropout in train mode: the task pass is another function


def _float32_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("backend, kind", ALL)
def test_declared_autocast_support(backend, kind):
    """Supported: under CPU bfloat16 autocast the estimate is the autocast function's (close to
    float32's, and differentiable); not supported: computed with autocast off, exactly float32's.
    """
    model = _float32_model()
    g = _gen(1)
    x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
    ref, est = (make_estimator(backend, kind, model, CE, probes=4, generator=_gen(0)) for _ in range(2))
    for e in (ref, est):  # a first call: backend="auto" checks the closed form (in full precision)
        estimate(e, x, y)
    full = estimate(ref, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = estimate(est, x, y)
    value.backward()
    messages = [str(w.message) for w in caught]
    if est.supports.autocast:
        assert float(value) == pytest.approx(float(full), rel=0.02) and float(value) != float(full)
        assert messages == []
    else:  # and says so
        assert float(value) == float(full)
        assert len(messages) == 1 and "its passes run in full precision" in messages[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_declared_compile_support(backend):
    """A whole compiled model: every estimator differentiates its eager module.

    A model with a compiled part: refused in one line naming the first-order backend unless the
    estimator declares compile support, and then computed through the compiled part.
    """
    model = tiny_mlp()
    whole = FlatnessPenalty(torch.compile(model, backend="aot_eager"), CE, backend=backend)
    assert whole.local_model is model and whole.estimator.model is model
    part = tiny_mlp()  # the same weights, its first layer compiled
    part[0] = torch.compile(part[0], backend="aot_eager")
    if not make_estimator(backend, "hutchinson", model, CE).supports.compile:
        refusal = r"differentiates twice .* compiled part\(s\) \['0'\] .* backend='finite-difference'"
        with pytest.raises(ValueError, match=refusal):
            make_estimator(backend, "hutchinson", part, CE)
        with pytest.raises(ValueError, match=refusal):
            FlatnessPenalty(part, CE, backend=backend)
        return
    x, y = tiny_batch()
    plain = estimate(make_estimator(backend, "hutchinson", model, CE, probes=2, generator=_gen(0)), x, y)
    on_part = estimate(make_estimator(backend, "hutchinson", part, CE, probes=2, generator=_gen(0)), x, y)
    assert float(on_part) == pytest.approx(float(plain), rel=1e-8)


@pytest.mark.parametrize("backend, kind", ALL)
def test_declared_model_loss_support(backend, kind):
    """A ModelLoss (the model and its loss as one module): supported, the estimate is that of the
    (output, target) form on the same probes; not supported, one line saying the output is needed.
    """
    x, y = tiny_batch()
    wrapped = ModelLoss(lambda m, batch: CE(m(batch[0]), batch[1]))
    module, output_is_loss = adapt(tiny_mlp(), wrapped)
    plain = make_estimator(backend, kind, tiny_mlp(), CE, probes=2, generator=_gen(0))
    if kind == "cv" or backend in ("layerwise", "kfac"):  # they start from the model output
        assert not plain.supports.model_loss
        with pytest.raises(ValueError, match="needs the model output, and a ModelLoss gives only the loss"):
            make_estimator(backend, kind, module, output_is_loss)
        return
    adapted = make_estimator(backend, kind, module, output_is_loss, probes=2, generator=_gen(0))
    assert adapted.supports.model_loss  # "auto": autograd (the closed form needs the output)
    value = estimate(adapted, *as_pair((x, y)))
    assert float(value) == pytest.approx(float(estimate(plain, x, y)), rel=1e-10)


def test_declared_ddp_support(tmp_path):
    """Every estimator declares DDP support: inside a (one-rank, gloo) DistributedDataParallel
    model the penalty's gradient is the unwrapped model's.
    """
    assert all(make_estimator(b, k, tiny_mlp(), CE).supports.ddp for b, k in ALL)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for backend, kind in ALL:
            grads = []
            for wrap in (False, True):
                model = tiny_mlp(seed=3)
                net = nn.parallel.DistributedDataParallel(model) if wrap else model
                x, y = tiny_batch(seed=4)
                penalty = FlatnessPenalty(net, CE, lam=0.5, probes=2, seed=0, backend=backend, estimator=kind)
                (CE(net(x), y) + penalty(x, y)).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    finally:
        dist.destroy_process_group()


def test_the_registry_refuses_what_an_estimator_cannot_do():
    model = tiny_mlp()
    some = list(model.parameters())[:2]
    assert isinstance(make_estimator("auto", "hutchinson", model, CE, params=some), AutogradEstimator)
    assert isinstance(make_estimator("auto", "hutchinson", model, CE), LayerwiseEstimator)
    assert isinstance(make_estimator("kfac", "hutchinson", model, CE), KFACEstimator)
    assert isinstance(make_estimator("layerwise", "cv", model, CE), ControlVariateEstimator)
    for backend, kind in (("layerwise", "hutchinson"), ("kfac", "hutchinson"), ("autograd", "cv")):
        with pytest.raises(ValueError, match="drop params"):
            make_estimator(backend, kind, model, CE, params=some)
    for backend in ("kfac", "finite-difference"):
        with pytest.raises(ValueError, match="has its own estimator"):
            make_estimator(backend, "cv", model, CE)
    with pytest.raises(ValueError, match="fd_step"):
        make_estimator("autograd", "hutchinson", model, CE, fd_step=1e-3)
    with pytest.raises(ValueError, match="fd_step"):
        make_estimator("finite-difference", "hutchinson", model, CE, fd_step=(1e-3, -1.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        make_estimator("hessian", "hutchinson", model, CE)
    with pytest.raises(ValueError, match="probes"):
        make_estimator("autograd", "hutchinson", model, CE, probes=0)


def test_the_generator_is_shared_with_the_engines_and_restored_by_the_penalty():
    model = tiny_mlp()
    x, y = tiny_batch()
    a = FlatnessPenalty(model, CE, lam=1.0, probes=2, seed=3, estimator="cv")
    a(x, y)
    b = FlatnessPenalty(model, CE, lam=1.0, probes=2, estimator="cv")  # torch's global generator
    b.load_state_dict(a.state_dict())
    assert b.estimator.engine.generator is b.generator is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(a(x, y)) == float(b(x, y))

