"""The curvature method's explicit closed form for ReLU stacks (flatness._relu_stack_sq_norms).

Against the generic per-example engine (autograd δ-pass and double backward) on the same
dropout-off function: the norms and their gradient; the method's step with and without the fast
path; the cases where it must not apply.
"""

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from flatness._relu_stack_sq_norms import relu_stack_layers, relu_stack_sq_norms
from flatness.experiments.running.distributed import EmulatedRanks
from flatness.methods import make_method
from flatness.passes import curvature_pass
from flatness.per_example import per_example_sq_grad_norms
from flatness.probes import rank_seed


def mlp(*widths, dropout=0.3):
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*mods).double()


def batch(n=12, d=6, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def generic(model, loss_fn, x, y):
    with curvature_pass(model, exact_norms=False):
        return per_example_sq_grad_norms(model, loss_fn, x, y, impl="closed-form", create_graph=True).sq_norms


@pytest.mark.parametrize("widths", [(6, 8, 4), (6, 9, 7, 4), (6, 5, 7, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_norms_and_their_gradient_equal_the_generic_engine(widths, reduction):
    model, loss_fn = mlp(*widths), nn.CrossEntropyLoss(reduction=reduction)
    x, y = batch()
    weights = torch.rand(x.shape[0], dtype=torch.float64)  # a generic upstream gradient
    layers = relu_stack_layers(model, 2, loss_fn)
    assert layers is not None
    fast = relu_stack_sq_norms(layers, x, model[1](model[0](x)), y)
    fast_grads = torch.autograd.grad((weights * fast).sum(), list(model.parameters()))
    reference = generic(model, loss_fn, x, y)
    reference_grads = torch.autograd.grad((weights * reference).sum(), list(model.parameters()))
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradcheck_of_the_explicit_backward():
    from flatness._relu_stack_sq_norms import _ReluStackSqNorms

    model = mlp(3, 4, 3, 2)
    x, y = batch(5, 3, 2)
    # away from the masks' kink at 0 (gradcheck's finite differences would cross it)
    shared = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shared = (shared + 0.2 * shared.sign()).requires_grad_()
    linears = [m for m in list(model)[3:] if isinstance(m, nn.Linear)]
    params = [p.detach().requires_grad_() for m in linears for p in (m.weight, m.bias)]
    assert torch.autograd.gradcheck(
        lambda s, *ps: _ReluStackSqNorms.apply(s, x.square().sum(1) + 1, y, -100, *ps), (shared, *params)
    )


def test_ignored_targets_have_zero_norm_and_leave_the_others_unchanged():
    model, loss_fn = mlp(6, 8, 4), nn.CrossEntropyLoss(ignore_index=-100)
    x, y = batch()
    layers = relu_stack_layers(model, 2, loss_fn)
    shared = model[1](model[0](x))
    full = relu_stack_sq_norms(layers, x, shared, y)
    masked = y.clone()
    masked[[1, 4]] = -100
    partial = relu_stack_sq_norms(layers, x, shared, masked)
    assert partial[1] == 0 and partial[4] == 0
    keep = masked != -100
    torch.testing.assert_close(partial[keep], full[keep])


def test_method_step_with_and_without_the_fast_path_are_equal(monkeypatch):
    base = mlp(6, 8, 7, 4).train()
    x, y = batch()
    grads = []
    for fast in (True, False):
        model = copy.deepcopy(base)
        method = make_method("curvature", model, nn.CrossEntropyLoss(), alpha=0.3, impl="closed-form")
        if not fast:
            monkeypatch.setattr(type(method.term), "_relu_stack", staticmethod(lambda *a: None))
        torch.manual_seed(1)  # the same dropout masks
        info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
        grads.append((torch.cat([p.grad.flatten() for p in model.parameters()]), info["mean_sq_grad_norm"]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12)
    assert float(grads[0][1]) == pytest.approx(float(grads[1][1]), rel=1e-12)


def test_used_by_the_method_on_the_papers_mlp(monkeypatch):
    from flatness import _relu_stack_sq_norms as fast_module
    from flatness.methods import curvature

    calls = []
    real = fast_module.relu_stack_sq_norms
    monkeypatch.setattr(curvature, "relu_stack_sq_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = mlp(6, 8, 7, 4).train()
    x, y = batch()
    method = make_method("curvature", model, nn.CrossEntropyLoss(), alpha=0.3)
    method.step(x, y, torch.optim.SGD(model.parameters(), 0.1))
    assert calls == [1]


@pytest.mark.parametrize(
    "change",
    ["tanh", "label_smoothing", "class_weights", "frozen", "no_bias", "hook", "mse", "prefix"],
)
def test_does_not_apply_outside_its_models(change):
    model, loss_fn, prefix = mlp(6, 8, 7, 4), nn.CrossEntropyLoss(), 2
    if change == "tanh":
        model[4] = nn.Tanh()
    elif change == "label_smoothing":
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    elif change == "class_weights":
        loss_fn = nn.CrossEntropyLoss(weight=torch.ones(4, dtype=torch.float64))
    elif change == "frozen":
        model[3].weight.requires_grad_(False)
    elif change == "no_bias":
        model[6] = nn.Linear(7, 4, bias=False).double()
    elif change == "hook":
        model[3].register_forward_hook(lambda m, a, o: o * 2)
    elif change == "mse":
        loss_fn = nn.MSELoss()
    elif change == "prefix":
        prefix = 3
    assert relu_stack_layers(model, prefix, loss_fn) is None


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, {tests!r})
    from test_relu_stack_sq_norms import batch, mlp
    from flatness import _relu_stack_sq_norms as fast_module
    from flatness.experiments.running.distributed import take_shard
    from flatness.methods import curvature, make_method
    from flatness.probes import rank_seed
    calls = []
    real = fast_module.relu_stack_sq_norms
    curvature.relu_stack_sq_norms = lambda *a, **k: calls.append(1) or real(*a, **k)  # a spy
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = mlp(6, 8, 7, 4).train()
    ddp = DistributedDataParallel(model)
    method = make_method("curvature", ddp, nn.CrossEntropyLoss(), alpha=0.3, impl="closed-form")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(rank_seed(1, rank))  # this rank's dropout stream, as the twin draws it
    x, y = batch(16)
    for _ in range(3):
        method.step(*take_shard(x, y, rank, world), opt)
    if rank == 0:
        torch.save({{"state": model.state_dict(), "fast_calls": len(calls)}}, {out!r})
    del method, ddp  # DDP's reducer before its process group (see test_finite_difference)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_under_two_gloo_ranks_the_fast_path_runs_and_equals_the_one_process_twin(tmp_path, monkeypatch):
    """DDP: the explicit backward's gradients are averaged like the task loss's (one reducer pass)."""
    out, script = tmp_path / "ddp.pt", tmp_path / "ddp_curvature.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", str(script)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["fast_calls"] == 3  # the explicit closed form ran at every step under DDP

    from flatness import _relu_stack_sq_norms as fast_module
    from flatness.methods import curvature

    calls = []
    real = fast_module.relu_stack_sq_norms
    monkeypatch.setattr(curvature, "relu_stack_sq_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = mlp(6, 8, 7, 4).train()
    initial = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    methods = [make_method("curvature", model, nn.CrossEntropyLoss(), alpha=0.3, impl="closed-form")
               for _ in range(2)]
    twin = EmulatedRanks(methods, [rank_seed(1, r) for r in range(2)])
    x, y = batch(16)
    for _ in range(3):
        twin.step(x, y, opt)
    assert len(calls) == 6
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=0, atol=1e-12)
    assert float((ddp["state"]["3.weight"] - initial["3.weight"]).abs().max()) > 1e-3  # it trained
