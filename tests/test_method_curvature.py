"""Curvature regularization: the per-layer closed form (Geng et al. eq. 12) equals the vmap
per-example fallback and a plain loop over examples, in value and in gradient; the method's
step follows the gradient of loss + α·mean ‖∇ℓ_i‖² (also on BatchNorm CNNs and attention).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from flatness.methods import make_method
from flatness.per_example import (
    ClosedFormUnavailable,
    closed_form_sq_grad_norms,
    per_example_sq_grad_norms,
    vmap_sq_grad_norms,
)
from helpers import tiny_batch, tiny_mlp


def linear_sq_grad_norms(model, loss_fn, x, y):
    return closed_form_sq_grad_norms(model, loss_fn, x, y, create_graph=True)


def _engine(model, loss_fn, x, y, impl="auto"):
    return per_example_sq_grad_norms(model, loss_fn, x, y, impl=impl, create_graph=True)

CE = nn.CrossEntropyLoss()


def _loop_sq_grad_norms(model, x, y):
    """‖∇θ ℓ_i‖² one example at a time, with a graph (the obvious, slow reference)."""
    params = list(model.parameters())
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), params, create_graph=True)
        out.append(sum((g * g).sum() for g in grads))
    return torch.stack(out)


def _penalty_grad(model, sq):
    return torch.autograd.grad(sq.mean(), list(model.parameters()))


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)
    ).double()


@pytest.mark.parametrize("make_model", [tiny_mlp, relu_mlp])
def test_closed_form_equals_vmap_and_loop_in_value_and_gradient(make_model):
    model = make_model()
    d_in = model[0].in_features
    d_out = model[-1].out_features
    x, y = tiny_batch(n=9, d_in=d_in, d_out=d_out)
    loss_c, sq_c = linear_sq_grad_norms(model, CE, x, y)
    loss_v, sq_v = vmap_sq_grad_norms(model, CE, x, y, create_graph=True)
    sq_loop = _loop_sq_grad_norms(model, x, y)
    torch.testing.assert_close(sq_c, sq_v, rtol=1e-6, atol=0)
    torch.testing.assert_close(sq_c, sq_loop, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_c, loss_v, rtol=1e-12, atol=0)
    for a, b in zip(_penalty_grad(model, sq_c), _penalty_grad(model, sq_v), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_method_step_follows_the_gradient_of_loss_plus_alpha_mean_sq_norm():
    model = relu_mlp()
    x, y = tiny_batch(n=9, d_in=5, d_out=4)
    alpha = 0.7
    total = CE(model(x), y) + alpha * _loop_sq_grad_norms(model, x, y).mean()
    expected = torch.autograd.grad(total, list(model.parameters()))
    method = make_method("curvature", model, CE, alpha=alpha)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert method.last_impl == "closed-form"
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    assert float(info["penalty"]) == pytest.approx(alpha * float(info["mean_sq_grad_norm"]), rel=1e-12)


class Gain(nn.Module):
    """A parametrised module that is not nn.Linear: the closed form does not cover it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.gain


def test_auto_falls_back_to_vmap_for_other_parametrised_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = tiny_batch()
    with pytest.raises(ClosedFormUnavailable):
        linear_sq_grad_norms(model, CE, x, y)
    _, sq, used = _engine(model, CE, x, y, impl="auto")
    assert used == "vmap"
    torch.testing.assert_close(sq, _loop_sq_grad_norms(model, x, y), rtol=1e-10, atol=0)
    method = make_method("curvature", model, CE, alpha=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="vmap"):
        method.step(x, y, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then vmap directly
        method.step(x, y, opt)
    assert method.impl == "vmap" and method.last_impl == "vmap"


def _assert_closed_form_refused_and_vmap_exact(model: nn.Module, reason: str) -> None:
    """The closed form refuses ``model`` naming ``reason``; the fallback is vmap, equal to a loop."""
    x, y = tiny_batch()
    with pytest.raises(ClosedFormUnavailable, match=reason):
        linear_sq_grad_norms(model, CE, x, y)
    _, sq, used = _engine(model, CE, x, y)
    assert used == "vmap"
    torch.testing.assert_close(sq, _loop_sq_grad_norms(model, x, y), rtol=1e-10, atol=0)


def test_a_linear_layer_used_twice_is_not_given_the_closed_form():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(torch.tanh(self.inner(x)))

    torch.manual_seed(0)
    model = Twice().double()
    _assert_closed_form_refused_and_vmap_exact(model, "2 times")
    assert not model.inner._forward_hooks


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_inputs_give_the_same_closed_form_as_dense(layout):
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x, y = tiny_batch(n=5, d_in=6)
    x = x.clamp_min(0)  # some exact zeros
    sparse = x.to_sparse_csr() if layout == "csr" else x.to_sparse()
    _, dense_sq = linear_sq_grad_norms(model, CE, x, y)
    _, sparse_sq = linear_sq_grad_norms(model, CE, sparse, y)
    torch.testing.assert_close(sparse_sq, dense_sq, rtol=1e-12, atol=0)
    grads = []
    for inputs in (x, sparse):  # a whole training step on sparse inputs, same gradient
        model.zero_grad()
        make_method("curvature", model, CE, alpha=0.5).step(
            inputs, y, torch.optim.SGD(model.parameters(), lr=0.0)
        )
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sum_reduction_and_unreduced_losses():
    model = tiny_mlp()
    x, y = tiny_batch()
    _, mean_sq = linear_sq_grad_norms(model, CE, x, y)
    _, sum_sq = linear_sq_grad_norms(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    torch.testing.assert_close(sum_sq, mean_sq, rtol=1e-12, atol=0)  # per-example: same ℓ_i
    with pytest.raises(ValueError, match="reduction|scalar"):
        linear_sq_grad_norms(model, nn.CrossEntropyLoss(reduction="none"), x, y)


def test_in_place_activation_after_a_linear_layer_keeps_the_closed_form_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x, y = tiny_batch()
    _, sq, used = _engine(model, CE, x, y)
    assert used == "closed-form"  # the modified output is detected; the pass re-run on copies
    torch.testing.assert_close(sq, _loop_sq_grad_norms(model, x, y), rtol=1e-10, atol=0)
    expected = torch.autograd.grad(CE(model(x), y) + 0.3 * _loop_sq_grad_norms(model, x, y).mean(),
                                   list(model.parameters()))
    method = make_method("curvature", model, CE, alpha=0.3)
    method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert method.last_impl == "closed-form"
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_linear_impl_refuses_models_it_does_not_cover():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = tiny_batch()
    method = make_method("curvature", model, CE, alpha=0.1, impl="closed-form")
    with pytest.raises(ClosedFormUnavailable, match="nn.Linear"):
        method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------- BatchNorm nets and attention


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, identity skip added in place, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return torch.relu_(out)


def small_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        Block(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().train()


def _fixed_statistics_copy(model, x):
    """The model with every BatchNorm in eval mode on the batch's (dropout-off) statistics."""
    ref = copy.deepcopy(model).eval()
    bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = {}

    def grab(module, inputs):
        a = inputs[0]
        stats[module] = (a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False))

    for m in bns:
        m.train()
    handles = [m.register_forward_pre_hook(grab) for m in bns]
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    for m in bns:
        m.eval()
        m.running_mean, m.running_var = stats[m]
    return ref


@pytest.mark.parametrize("impl", ["closed-form", "vmap"])
def test_on_a_resnet_block_the_step_holds_batch_statistics_fixed(impl):
    model = small_resnet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    alpha = 0.2
    fixed = _fixed_statistics_copy(model, x)
    train_copy = copy.deepcopy(model)
    expected = [
        a + b for a, b in zip(
            torch.autograd.grad(CE(train_copy(x), y), list(train_copy.parameters())),
            torch.autograd.grad(alpha * _loop_sq_grad_norms(fixed, x, y).mean(), list(fixed.parameters())), strict=True,
        )
    ]
    method = make_method("curvature", model, CE, alpha=alpha, impl=impl)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert method.last_impl == impl
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    assert info["mean_sq_grad_norm"] == pytest.approx(
        float(_loop_sq_grad_norms(fixed, x, y).mean()), rel=1e-10)
    for a, b in zip(model.buffers(), train_copy.buffers(), strict=True):  # one BN update: the task loss's
        assert torch.equal(a, b)


def test_on_a_transformer_the_vmap_fallback_uses_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
        nn.Flatten(), nn.Linear(24, 3),
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    alpha = 0.1
    reference = copy.deepcopy(model)
    torch.manual_seed(7)  # the task loss's dropout mask, as the method will draw it
    task = torch.autograd.grad(CE(reference(x), y), list(reference.parameters()))
    reference.eval()  # the curvature pass: dropout off
    with sdpa_kernel([SDPBackend.MATH]):
        penalty = torch.autograd.grad(
            alpha * _loop_sq_grad_norms(reference, x, y).mean(), list(reference.parameters()))
    method = make_method("curvature", model, CE, alpha=alpha)
    torch.manual_seed(7)
    with pytest.warns(RuntimeWarning, match="vmap"):
        method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert method.last_impl == "vmap" and model.training
    for p, a, b in zip(model.parameters(), task, penalty, strict=True):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-8, atol=1e-11)


def test_on_a_multihead_attention_model_training_reduces_the_loss():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.attn(x, x, x, need_weights=False)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = Attend()
    x, y = torch.randn(16, 4, 6), torch.randint(0, 3, (16,))
    method = make_method("curvature", model, CE, alpha=0.01, impl="vmap")
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    start = float(CE(model(x), y))
    for _ in range(15):
        method.step(x, y, opt)
    assert float(CE(model(x), y)) < 0.8 * start


@pytest.mark.data
@pytest.mark.slow
def test_curvature_trains_newsgroups_logreg_on_sparse_inputs(real_data_dir, tmp_path):
    """The supported task × method pair that used to fail ("the vmap per-example form does not
    support sparse inputs"): SparseLinear on CSR batches gets the closed form.
    """
    import json

    from flatness.cli import main

    code = main([
        "run", "newsgroups-logreg", "--method", "curvature", "--lambdas", "0.001",
        "--seeds", "1", "--epochs", "1", "--data-dir", str(real_data_dir),
        "--out", str(tmp_path), "--quiet", "--no-plots",
    ])
    assert code == 0
    [path] = (tmp_path / "newsgroups-logreg").glob("curvature_alpha0.001_seed0*.json")
    record = json.loads(path.read_text())
    assert record["method"] == "curvature" and record["final_test_acc"] > 0.5


@pytest.mark.parametrize("dropout, passes", [(0.0, 1), (0.3, 2)])
def test_the_task_loss_pass_doubles_as_the_curvature_pass_when_it_can(dropout, passes):
    """No active dropout or BatchNorm: one forward per step; else a separate (dropout-off)
    curvature pass, which starts from the task pass's output of the layers before the first
    dropout (they compute the same either way): the input layer runs once.
    """
    model = tiny_mlp(dropout=dropout)
    first, last = [], []
    model[0].register_forward_hook(lambda *args: first.append(1))
    model[-1].register_forward_hook(lambda *args: last.append(1))
    x, y = tiny_batch()
    make_method("curvature", model, CE, alpha=0.1).step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    assert (len(first), len(last)) == (1, passes)


def _dropout_mlp(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Dropout(0.4), nn.Linear(7, 6), nn.Tanh(),
        nn.Dropout(0.2), nn.Linear(6, 4),
    ).double()


@pytest.mark.parametrize("inplace", [False, True])
def test_with_dropout_the_step_is_the_dropout_task_loss_plus_the_dropout_off_penalty(inplace):
    """The shared prefix (or, with an in-place activation, a whole pass on copies) gives the
    gradient of L(dropout on, the step's mask) + α·mean ‖∇ℓ_i‖² (dropout off).
    """
    model = _dropout_mlp(inplace)
    x, y = tiny_batch(n=9, d_in=5, d_out=4)
    alpha = 0.7
    torch.manual_seed(3)
    task = CE(model(x), y)  # the step's dropout mask, drawn from the global generator
    model.eval()
    penalty = alpha * _loop_sq_grad_norms(model, x, y).mean()
    model.train()
    expected = torch.autograd.grad(task + penalty, list(model.parameters()))
    method = make_method("curvature", model, CE, alpha=alpha)
    torch.manual_seed(3)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert method.last_impl == "closed-form" and all(m.training for m in model.modules())
    assert info["penalty"] == pytest.approx(float(penalty), rel=1e-10)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
