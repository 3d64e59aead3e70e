"""K-FAC Tr(H²): the Kronecker identity on dense factors, sampled-label Fisher, gradients, sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty
from flatness.kfac import kfac_sq_trace, kronecker_factors
from flatness.linear_io import share_prefix
from flatness.probes import categorical
from flatness.utils import eval_mode
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def test_product_of_traces_is_the_trace_of_the_dense_kronecker_square():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, _ = tiny_batch(seed=2, n=6, d_in=4)
    (f,) = kronecker_factors(model, CE, x, seed=5)
    n = x.shape[0]
    a_rows = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    A = a_rows.T @ a_rows / n
    # G from the sampled labels by hand: for softmax cross-entropy g_i = p_i − onehot(ŷ_i)
    p = model(x).softmax(1).detach()
    labels = categorical(p, torch.Generator().manual_seed(5))
    g_rows = p - nn.functional.one_hot(labels, 3).double()
    assert torch.allclose(f.grads.detach(), g_rows, atol=1e-12)
    G = g_rows.T @ g_rows / n
    kron = torch.kron(A, G)
    dense = torch.trace(kron @ kron)
    assert float((f.sq_trace_a() * f.sq_trace_g()).detach()) == pytest.approx(float(dense), rel=1e-12)
    assert float(kfac_sq_trace(model, CE, x, seed=5).detach()) == pytest.approx(float(dense), rel=1e-12)


def test_one_example_equals_the_sampled_fisher_of_autograd():
    torch.manual_seed(1)
    model = nn.Linear(5, 4).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    value = kfac_sq_trace(model, CE, x, seed=3)
    label = categorical(model(x).softmax(1), torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(CE(model(x), label), list(model.parameters()))
    flat = torch.cat([g.flatten() for g in grads])
    fisher = torch.outer(flat, flat)  # the one-sample Fisher, exactly Kronecker for one example
    assert float(value.detach()) == pytest.approx(float(fisher.square().sum()), rel=1e-12)


def test_one_logit_samples_bernoulli_labels():
    torch.manual_seed(2)
    model = nn.Linear(3, 1).double()
    x = torch.randn(64, 3, dtype=torch.float64)

    def bce(out, y):
        return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype))

    (f,) = kronecker_factors(model, bce, x, seed=0)
    p = torch.sigmoid(model(x)).detach()
    labels = categorical(torch.cat([1 - p, p], dim=1), torch.Generator().manual_seed(0))
    assert 0 < int(labels.sum()) < 64  # both labels drawn
    assert torch.allclose(f.grads.detach(), p - labels.unsqueeze(1).double(), atol=1e-12)


def test_gradient_matches_finite_differences():
    model = tiny_mlp(seed=2)
    x, y = tiny_batch(seed=3)
    params = list(model.parameters())
    (grad,) = torch.autograd.grad(kfac_sq_trace(model, CE, x, y, seed=0), [params[0]])
    step = 1e-6
    for index in [(0, 0), (2, 1), (3, 2)]:
        with torch.no_grad():
            params[0][index] += step
            up = float(kfac_sq_trace(model, CE, x, y, seed=0))
            params[0][index] -= 2 * step
            down = float(kfac_sq_trace(model, CE, x, y, seed=0))
            params[0][index] += step
        assert float(grad[index]) == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-9)


def test_shared_prefix_gives_the_same_value_and_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    x, y = tiny_batch(seed=4, n=10, d_in=6)
    params = list(model.parameters())
    with eval_mode(model):
        alone = kfac_sq_trace(model, CE, x, y, seed=1)
    grads_alone = torch.autograd.grad(alone, params)
    model.train()
    with share_prefix(model) as prefix:
        CE(model(x), y)  # the task's train-mode forward, dropout on
    assert prefix.length == 2 and prefix.output is not None
    with eval_mode(model):
        shared = kfac_sq_trace(model, CE, x, y, seed=1, prefix=prefix)
    assert torch.isclose(shared, alone, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(shared, params), grads_alone, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # a prefix recorded on another batch is not used
    with share_prefix(model) as stale:
        model(x + 1)
    with eval_mode(model):
        assert torch.isclose(kfac_sq_trace(model, CE, x, y, seed=1, prefix=stale), alone, rtol=1e-12)


def test_refusals():
    x, y = tiny_batch()
    extra = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="not covered"):
        kfac_sq_trace(extra, CE, x, y, seed=0)
    shared = nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match="once per forward"):
        kfac_sq_trace(nn.Sequential(shared, nn.Tanh(), shared), CE, x, y, seed=0)
    with pytest.raises(ValueError, match="logits"):
        kfac_sq_trace(nn.Sequential(nn.Linear(3, 6), nn.Unflatten(1, (2, 3))).double(), CE, x, y, seed=0)


def test_in_place_activations_give_the_same_value_and_gradient():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inplace = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    inplace.load_state_dict(plain.state_dict())
    x, _ = tiny_batch(seed=6, n=10, d_in=4)
    a, b = kfac_sq_trace(plain, CE, x, seed=0), kfac_sq_trace(inplace, CE, x, seed=0)
    assert torch.isclose(a, b, rtol=1e-12)
    for ga, gb in zip(torch.autograd.grad(a, list(plain.parameters())),
                      torch.autograd.grad(b, list(inplace.parameters())), strict=True):
        assert torch.allclose(ga, gb, rtol=1e-10)
    with share_prefix(inplace) as prefix:  # nothing is shared past an in-place module
        inplace(x)
    assert prefix.length == 0 and prefix.output is None


def test_regression_losses_are_refused_with_the_reason():
    """Issue 30, finding 3: MSE gave a meaningless number for one output and an unnamed shape
    mismatch for two; K-FAC's factors are those of the cross-entropy of the logits only.
    """
    x, _ = tiny_batch(seed=2, n=8, d_in=3)
    for outputs in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()
        y = torch.randn(8, outputs, dtype=torch.float64)
        with pytest.raises(ValueError, match="cross-entropy of the model's logits"):
            kfac_sq_trace(model, nn.MSELoss(), x, y, seed=0)
        penalty = FlatnessPenalty(model, nn.MSELoss(), lam=0.1, backend="kfac")
        with pytest.raises(ValueError, match="MSELoss is a regression loss"):
            penalty(x, y)
        with pytest.raises(ValueError, match="cross-entropy of the model's logits"):  # any function
            kfac_sq_trace(model, lambda out, t: ((out - t.unsqueeze(1)) ** 2).mean(), x, seed=0)
    model = tiny_mlp()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    penalised = lambda out, y: CE(out, y) + 0.1 * out.square().mean()  # noqa: E731
    for other in (nn.CrossEntropyLoss(label_smoothing=0.1), weighted, penalised):
        with pytest.raises(ValueError, match="cross-entropy"):
            kfac_sq_trace(model, other, x, seed=0)


def test_a_summed_cross_entropy_is_n_squared_times_the_mean_like_the_other_backends():
    """Issue 30, finding 4: reduction="sum" came out N² too large against the other backends."""
    model = tiny_mlp(seed=4)
    x, y = tiny_batch(seed=5, n=6)
    n = x.shape[0]
    mean_loss, sum_loss = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    with eval_mode(model):
        k_mean = kfac_sq_trace(model, mean_loss, x, y, seed=3)
        k_sum = kfac_sq_trace(model, sum_loss, x, y, seed=3)
        summed = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
        functional = kfac_sq_trace(model, summed, x, y, seed=3)
    assert float(k_sum) == pytest.approx(n**2 * float(k_mean), rel=1e-12)
    assert float(functional) == pytest.approx(float(k_sum), rel=1e-12)
    ratios = []
    for loss_fn in (mean_loss, sum_loss):
        kfac = FlatnessPenalty(model, loss_fn, lam=1.0, seed=3, backend="kfac")(x, y)
        exact = FlatnessPenalty(model, loss_fn, lam=1.0, probes=4, seed=3, backend="autograd")(x, y)
        ratios.append(float(kfac) / float(exact))
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-10)  # the same approximation either way
    grads = torch.autograd.grad(k_sum, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
