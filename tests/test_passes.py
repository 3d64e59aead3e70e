"""The extra-pass policy (flatness.passes): BatchNorm on batch statistics with running
statistics bitwise unchanged, dropout off, modes restored (also on exceptions); the penalty on a
BatchNorm CNN estimates the Tr(H²) of the train-mode task loss; attention gets double backward."""

import copy
import math

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty
from flatness.passes import curvature_pass, frozen_running_stats, measure_pass
from helpers import dense_hessian

CE = nn.CrossEntropyLoss()


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    bn = model[1]
    with torch.no_grad():  # running statistics far from any batch's: a wrong policy shows
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
        bn.num_batches_tracked.fill_(7)
    return model.train()


def cnn_batch(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _buffers(model):
    return [b.clone() for b in model.buffers()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_curvature_pass_is_the_train_function_with_dropout_off_and_frozen_statistics():
    model = nn.Sequential(tiny_cnn(), nn.Dropout(0.5))
    x, _ = cnn_batch()
    before = _buffers(model)
    with curvature_pass(model):
        out = model(x)
        assert not model[1].training
    assert _same(before, _buffers(model))
    reference = copy.deepcopy(model[0]).train()(x)  # train-mode BN, no dropout module
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert all(m.training for m in model.modules())


def test_a_batchnorm_kept_in_eval_mode_keeps_its_running_statistics():
    model = tiny_cnn()
    model[1].eval()  # frozen BN (fine-tuning): the task loss uses running statistics
    x, _ = cnn_batch()
    with torch.no_grad():
        expected = model(x)
        with curvature_pass(model):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


def test_everything_is_restored_when_the_body_raises():
    model = tiny_cnn()
    bn = model[1]
    refs = (bn.running_mean, bn.running_var)
    for manager in (curvature_pass(model), frozen_running_stats(model), measure_pass(model, "batch_stats")):
        with pytest.raises(RuntimeError, match="boom"):
            with manager:
                raise RuntimeError("boom")
        assert bn.track_running_stats and bn.running_mean is refs[0] and bn.running_var is refs[1]
        assert all(m.training for m in model.modules())


def test_frozen_running_stats_keep_dropout_and_batch_statistics():
    model = tiny_cnn()
    x, _ = cnn_batch()
    before = _buffers(model)
    reference = copy.deepcopy(model)(x)
    with frozen_running_stats(model):
        got = model(x)
        assert model.training
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert _same(before, _buffers(model))


def test_measure_pass_deployed_and_batch_statistics():
    model = tiny_cnn()
    x, _ = cnn_batch()
    before = _buffers(model)
    with torch.no_grad():
        deployed = copy.deepcopy(model).eval()(x)
        batch = copy.deepcopy(model).train()(x)
        with measure_pass(model):
            got_deployed = model(x)
        with measure_pass(model, "batch_stats"):
            got_batch = model(x)
    torch.testing.assert_close(got_deployed, deployed, rtol=0, atol=0)
    torch.testing.assert_close(got_batch, batch, rtol=0, atol=0)
    assert not torch.allclose(deployed, batch)
    assert _same(before, _buffers(model)) and model.training
    with pytest.raises(ValueError, match="function"):
        with measure_pass(model, "train"):
            pass


def test_penalty_on_a_batchnorm_cnn_estimates_the_train_mode_sq_trace():
    """Tr(H²) of the train-mode task loss (batch statistics) from a dense Hessian; the
    penalty's estimates agree within 3 standard errors; running statistics never change."""
    model = tiny_cnn()
    x, y = cnn_batch()
    hessian = dense_hessian(copy.deepcopy(model).train(), x, y)  # the copy's stats may move
    exact = float((hessian * hessian).sum())
    deployed = float((dense_hessian(copy.deepcopy(model).eval(), x, y) ** 2).sum())
    assert abs(deployed - exact) > 0.05 * exact  # the two functions differ here
    before = _buffers(model)
    penalty = FlatnessPenalty(model, CE, lam=1.0, probes=10, every=1, seed=0)
    estimates = []
    for _ in range(40):
        penalty(x, y)
        estimates.append(penalty.last_sq_trace)
    assert _same(before, _buffers(model))
    mean = sum(estimates) / len(estimates)
    stderr = math.sqrt(sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1) / len(estimates))
    assert abs(mean - exact) < 3 * stderr, (mean, exact, stderr)
    assert stderr < 0.1 * exact  # enough probes for the check to mean something


def test_penalty_works_on_a_transformer_through_the_math_attention_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
        nn.Flatten(), nn.Linear(32, 3),
    )
    x, y = torch.randn(5, 4, 8), torch.randint(0, 3, (5,))
    penalty = FlatnessPenalty(model, CE, lam=0.1, probes=1, seed=0)
    (CE(model(x), y) + penalty(x, y)).backward()
    assert math.isfinite(penalty.last_sq_trace) and penalty.last_sq_trace > 0
    assert all(p.grad is not None for p in model.parameters())
