"""The extra-pass policy (flatness.passes): BatchNorm on batch statistics with running
statistics bitwise unchanged, dropout off, modes restored (also on exceptions); the penalty on a
BatchNorm CNN estimates the Tr(H²) of the train-mode task loss; attention gets double backward.
"""

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
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_curvature_pass_is_the_train_function_with_dropout_off_and_frozen_statistics():
    model = nn.Sequential(tiny_cnn(), nn.Dropout(0.5))
    x, _ = cnn_batch()
    before = _buffers(model)
    with curvature_pass(model):
        out = model(x)
        assert not model[1].training
    assert _same(before, _buffers(model))
    reference = copy.deepcopy(model[0]).train()(x)  # train-mode BN, no dropout module
    # the same function; BN computed from primitives in the pass (ExactNormDerivatives) rounds
    # differently from the fused kernel
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
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
    penalty's estimates agree within 3 standard errors; running statistics never change.
    """
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


# ----------------------------------------------------------------- every method's extra passes

METHOD_SETTINGS = {
    "none": ("none", {}),
    "fa": ("fa", {"lam": 0.1, "probes": 2, "every": 1, "seed": 0}),
    "sam": ("sam", {"rho": 0.1}),
    "gnp": ("gnp", {"rho": 0.1}),
    "gnp_exact": ("gnp", {"rho": 0.1, "form": "exact"}),
    "curvature": ("curvature", {"alpha": 0.1}),
    "curvature_vmap": ("curvature", {"alpha": 0.1, "impl": "vmap"}),
    "nrs": ("nrs", {"eps": 0.3, "seed": 0}),
    "rpr_eps0": ("rpr", {"eps": 0.0, "seed": 0}),  # its one pass is at θ + δθ: at ε = 0, at θ
    "sam+fa": ("sam+fa", {"rho": 0.1, "lam": 0.1, "probes": 2, "every": 1, "seed": 0}),
    "curvature+nrs": ("curvature+nrs", {"alpha": 0.1, "eps": 0.3, "seed": 0}),
}


@pytest.mark.parametrize("label", list(METHOD_SETTINGS))
def test_each_method_updates_running_statistics_once_per_step(label):
    """After a step, BatchNorm's running statistics are those of one plain train-mode forward
    at θ: every extra pass (perturbed, neighbour, curvature) leaves them bitwise unchanged.
    """
    from flatness.methods import make_method

    name, hp = METHOD_SETTINGS[label]
    model = nn.Sequential(tiny_cnn(), nn.Dropout(0.2))
    x, y = cnn_batch()
    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        reference(x)
    torch.manual_seed(3)
    make_method(name, model, CE, **hp).step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    assert _same(_buffers(reference), _buffers(model))
    assert int(model[0][1].num_batches_tracked) == 8
    assert all(m.training for m in model.modules())



class _ManualNorm(nn.Module):
    """A norm layer from primitives over ``dims`` with its affine ``shape``: the reference."""

    def __init__(self, norm: nn.Module, dims: tuple[int, ...], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.dims, self.shape = dims, shape

    def forward(self, x):
        mean = x.mean(dim=self.dims, keepdim=True)
        var = (x - mean).square().mean(dim=self.dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(self.shape) + self.bias.view(self.shape)


def _penalty_grad(model, x, y):
    from flatness import FlatnessPenalty

    penalty = FlatnessPenalty(model, nn.functional.cross_entropy, lam=1.0, probes=2, backend="autograd", seed=0)
    value = penalty(x, y)
    return float(value.detach()), torch.autograd.grad(value, list(model.parameters()))


@pytest.mark.parametrize(
    "norm, dims, shape",
    [
        (nn.BatchNorm2d(3), (0, 2, 3), (1, 3, 1, 1)),
        (nn.LayerNorm([3, 4, 4]), (1, 2, 3), (3, 4, 4)),
        (nn.GroupNorm(1, 3), (1, 2, 3), (1, 3, 1, 1)),
    ],
    ids=["batchnorm", "layernorm", "groupnorm"],
)
def test_penalty_gradient_through_norm_layers_is_exact(norm, dims, shape):
    # the gradient of ‖Hv‖² is a third derivative: torch's fused norm kernels get it wrong
    # (pytorch/pytorch#186256, #175754); the curvature pass computes them from primitives
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    conv, head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(48, 5)
    fused = nn.Sequential(conv, norm, nn.Tanh(), nn.Flatten(), head).double().train()
    reference = nn.Sequential(conv, _ManualNorm(norm, dims, shape), nn.Tanh(), nn.Flatten(), head).double()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    v_fused, g_fused = _penalty_grad(fused, x, y)
    v_ref, g_ref = _penalty_grad(reference, x, y)
    assert len(g_fused) == len(g_ref) == 6
    assert v_fused == pytest.approx(v_ref, rel=1e-10)
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_second_derivatives_through_fused_norm_layers_are_exact():
    """Why the curvature method's pass keeps torch's fused BN/GN/LN kernels: the gradient of
    the mean squared per-example gradient norm (a second derivative) equals the one through
    norm layers decomposed into primitives, in float64.
    """
    from flatness.per_example import per_example_sq_grad_norms

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
            nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5),
            nn.Linear(5, 3),
        ).double().train()

    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for exact in (True, False):
        model = build()
        with curvature_pass(model, exact_norms=exact):
            sq = per_example_sq_grad_norms(model, nn.CrossEntropyLoss(), x, y, create_graph=True).sq_norms
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(sq.mean(), list(model.parameters()))]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)
