"""The per-example gradient engine: closed forms == vmap == explicit per-example autograd, in
value and in gradient (float64), on Linear, SparseLinear (CSR/COO), Conv1d/Conv2d (stride,
padding, dilation, groups), BatchNorm (running and batch statistics), in-place activations,
sequence inputs and mixed models.
"""

import copy

import pytest
import torch
from torch import nn

from flatness._layer_sq_norms import matrix_sq_norms
from flatness.layers import SparseLinear
from flatness.per_example import (
    ClosedFormUnavailable,
    closed_form_sq_grad_norms,
    per_example_sq_grad_norms,
)

CE = nn.CrossEntropyLoss()


class Gain(nn.Module):
    """A parametrised module without a closed form."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.gain


class Residual(nn.Module):
    """``out = f(x); out += x``: a layer's output modified in place (ResNet style)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.f = nn.Linear(d, d)

    def forward(self, x):
        out = self.f(x)
        out += x
        return torch.tanh(out)


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), (5,)),
        "inplace_relu": (nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), (5,)),
        "residual_inplace": (nn.Sequential(Residual(5), nn.Linear(5, 3)), (5,)),
        "sequence": (nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 8), nn.Tanh(),
                                   nn.Linear(8, 8), nn.Flatten(), nn.Linear(32, 3)), (4, 3)),
        "conv2d": (nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 4, 2, groups=2, dilation=2, bias=False), nn.Tanh(),
                                 nn.Flatten(), nn.Linear(4, 3)), (2, 6, 6)),
        # explicit per-example route (batch as groups) with groups, dilation and padding
        "conv2d_groups": (nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), nn.Tanh(),
                                        nn.Flatten(), nn.Linear(150, 3)), (4, 5, 5)),
        "conv2d_same": (nn.Sequential(nn.Conv2d(1, 3, 3, padding="same"), nn.ReLU(inplace=True),
                                      nn.Flatten(), nn.Linear(48, 3)), (1, 4, 4)),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(15, 3)), (2, 8)),
        "cnn_bn_eval": (nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(12, 3)), (1, 4, 4)),
        "mlp_bn_eval": (nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(),
                                      nn.Linear(4, 3)), (5,)),
        "mixed_vmap_only": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(8, 4), Gain(4), nn.Linear(4, 3)), (1, 4, 4)),
    }


MODELS = list(_models())


def _setup(name, n=7):
    model, shape = _models()[name]
    model = model.double()
    if name in ("cnn_bn_eval", "mlp_bn_eval"):  # non-trivial running statistics
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _loop(model, x, y, create_graph=False):
    """‖∇θ ℓ_i‖² one example at a time with plain autograd (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), params, create_graph=create_graph)
        out.append(sum((g * g).sum() for g in grads))
    return torch.stack(out)


def _grad_of_mean(model, sq):
    return torch.autograd.grad(sq.mean(), [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", MODELS)
def test_closed_form_equals_vmap_and_the_per_example_loop(name):
    model, x, y = _setup(name)
    reference = _loop(model, x, y)
    vmapped = per_example_sq_grad_norms(model, CE, x, y, impl="vmap")
    torch.testing.assert_close(vmapped.sq_norms, reference, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(vmapped.loss, CE(model(x), y), rtol=1e-12, atol=0)
    auto = per_example_sq_grad_norms(model, CE, x, y)
    if name == "mixed_vmap_only":
        assert auto.impl == "vmap"
        with pytest.raises(ClosedFormUnavailable, match="closed form"):
            closed_form_sq_grad_norms(model, CE, x, y)
    else:
        assert auto.impl == "closed-form"
    torch.testing.assert_close(auto.sq_norms, reference, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(auto.loss, CE(model(x), y), rtol=1e-12, atol=0)
    assert not auto.sq_norms.requires_grad
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "name", ["mlp", "inplace_relu", "conv2d", "conv1d", "cnn_bn_eval", "mlp_bn_eval", "sequence"]
)
def test_closed_form_is_differentiable_like_the_loop(name):
    model, x, y = _setup(name)
    fast = per_example_sq_grad_norms(model, CE, x, y, impl="closed-form", create_graph=True)
    slow = per_example_sq_grad_norms(model, CE, x, y, impl="vmap", create_graph=True)
    expected = _grad_of_mean(model, _loop(model, x, y, create_graph=True))
    for got in (_grad_of_mean(model, fast.sq_norms), _grad_of_mean(model, slow.sq_norms)):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_linear_with_sparse_inputs(layout):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(9, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(6, 9, generator=g, dtype=torch.float64).clamp_min(0.3) - 0.3
    y = torch.randint(0, 3, (6,), generator=g)
    sparse = dense.to_sparse_csr() if layout == "csr" else dense.to_sparse()
    reference = _loop(model, dense, y)
    for impl in ("closed-form", "vmap"):  # vmap densifies chunk by chunk
        got = per_example_sq_grad_norms(model, CE, sparse, y, impl=impl, chunk=4, create_graph=True)
        torch.testing.assert_close(got.sq_norms, reference, rtol=1e-10, atol=1e-14)
        grads = _grad_of_mean(model, got.sq_norms)
        for a, b in zip(grads, _grad_of_mean(model, _loop(model, dense, y, create_graph=True)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _fixed_stats_reference(model, x):
    """A copy whose BatchNorm layers are in eval mode with the batch's statistics as running
    statistics: per example, the function the engine differentiates (built with torch's BN).
    """
    ref = copy.deepcopy(model)
    stats = {}

    def grab(module, inputs):
        a = inputs[0]
        dims = [0, *range(2, a.dim())]
        stats[module] = (a.mean(dims).detach(), a.var(dims, unbiased=False).detach())

    bns = [m for m in ref.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    handles = [m.register_forward_pre_hook(grab) for m in bns]
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    for m in bns:
        m.running_mean, m.running_var = stats[m]
        m.eval()
    return ref


def test_train_mode_batchnorm_holds_the_batch_statistics_fixed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
        nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
        nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3),
    ).double().train()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    buffers = [b.clone() for b in model.buffers()]
    ref = _fixed_stats_reference(model, x)
    reference = _loop(ref, x, y)
    for impl in ("closed-form", "vmap"):
        got = per_example_sq_grad_norms(model, CE, x, y, impl=impl, create_graph=True)
        assert got.impl == impl
        torch.testing.assert_close(got.sq_norms, reference, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got.loss, CE(ref(x), y), rtol=1e-12, atol=0)
        grads = _grad_of_mean(model, got.sq_norms)
        for a, b in zip(grads, _grad_of_mean(ref, _loop(ref, x, y, create_graph=True)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the engine itself never writes running statistics... except through the model's own BN
    # forward, which it replaces: buffers are bitwise unchanged
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_both_routes_of_the_matrix_norm_agree():
    g = torch.Generator().manual_seed(0)
    for t, d_out, d_in in ((1, 5, 7), (3, 2, 2), (9, 4, 6), (2, 16, 16)):
        delta = torch.randn(4, t, d_out, generator=g, dtype=torch.float64)
        patches = torch.randn(4, t, d_in, generator=g, dtype=torch.float64)
        explicit = (delta.transpose(-1, -2) @ patches).square().sum(dim=(-2, -1))
        torch.testing.assert_close(matrix_sq_norms(delta, patches), explicit, rtol=1e-12, atol=0)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


@pytest.mark.parametrize(
    "make, shape, reason",
    [
        (lambda: Twice(), (3,), "2 times"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)), (3,), "closed form"),
        (lambda: nn.Sequential(nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular"),
                               nn.Flatten(), nn.Linear(6, 3)), (1, 3), "padding_mode"),
    ],
)
def test_unavailable_closed_form_names_the_reason_and_auto_falls_back(make, shape, reason):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with pytest.raises(ClosedFormUnavailable, match=reason):
        closed_form_sq_grad_norms(model, CE, x, y)
    got = per_example_sq_grad_norms(model, CE, x, y)
    assert got.impl == "vmap"
    torch.testing.assert_close(got.sq_norms, _loop(model, x, y), rtol=1e-10, atol=1e-14)


def test_sequence_first_transformer_is_not_given_the_closed_form():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False).double().eval()

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer, nn.Linear(8, 3).double()

        def forward(self, x):  # x: (batch, seq, d) → the layer sees (seq, batch, d)
            return self.head(self.layer(x.transpose(0, 1)).mean(0))

    model = SeqFirst()
    x = torch.randn(4, 4, 8, dtype=torch.float64)  # seq length = batch size: no shape clue
    y = torch.randint(0, 3, (4,))
    got = per_example_sq_grad_norms(model, CE, x, y)
    assert got.impl == "vmap"
    torch.testing.assert_close(got.sq_norms, _loop(model, x, y), rtol=1e-9, atol=1e-12)


def test_unreduced_losses_and_bad_impl_are_refused():
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match="reduction|scalar"):
        per_example_sq_grad_norms(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    with pytest.raises(ValueError, match="impl"):
        per_example_sq_grad_norms(model, CE, x, y, impl="loop")
    total = per_example_sq_grad_norms(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    torch.testing.assert_close(total.sq_norms, _loop(model, x, y), rtol=1e-10, atol=0)


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.GroupNorm(2, 6)])
def test_differentiable_vmap_through_layer_and_group_norm_matches_the_loop(norm):
    """The batched backward of torch's fused norm kernels is wrong when differentiated again;
    the engine computes them from elementary ops there.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    got = per_example_sq_grad_norms(model, CE, x, y, create_graph=True)
    assert got.impl == "vmap"
    expected = _loop(model, x, y, create_graph=True)
    torch.testing.assert_close(got.sq_norms, expected, rtol=1e-10, atol=1e-14)
    for a, b in zip(_grad_of_mean(model, got.sq_norms), _grad_of_mean(model, expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
