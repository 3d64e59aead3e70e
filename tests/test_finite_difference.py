"""First-order FA (flatness.finite_difference, FlatnessPenalty(backend="finite-difference")):
exact in the limit (float64, against autograd and against the derivative of the exact value),
ReLU kinks frozen at θ, the model never modified, torch.compile, fused attention, DDP.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty
from flatness.experiments.running.distributed import EmulatedRanks, take_shard
from flatness.experiments.world.architectures import VisionTransformer
from flatness.finite_difference import (
    fd_sq_trace,
    relative_step,
    same_function_in_train_mode,
    step_sizes,
)
from flatness.hutchinson import sq_trace
from flatness.methods import make_method
from flatness.passes import curvature_pass
from flatness.probes import rank_seed, sample_probes

CE = nn.functional.cross_entropy


def smooth_cnn(seed: int = 0) -> nn.Sequential:
    """No norm layer, smooth activation: autograd's third derivatives are exact here."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()


def relu_bn_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    return model.double().train()


def images(n: int = 8, seed: int = 1, shape=(1, 4, 4), classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def rel_err(a, b) -> float:
    num = sum(float(((u - w) ** 2).sum()) for u, w in zip(a, b, strict=True))
    return (num / sum(float((w**2).sum()) for w in b)) ** 0.5


def exact_value_and_grad(model, x, y, probes):
    params = list(model.parameters())
    with curvature_pass(model):
        est = sq_trace(CE(model(x), y), params, probe_vectors=probes)
    return float(est.detach()), torch.autograd.grad(est, params)


def test_value_and_gradient_converge_to_autograd_as_the_step_shrinks():
    model = smooth_cnn()
    x, y = images(6)
    params = list(model.parameters())
    probes = sample_probes(params, 2, seed=0)
    value, grads = exact_value_and_grad(model, x, y, probes)
    errors = []
    for h in (1e-2, 1e-3, 1e-4, 1e-5):
        fd = fd_sq_trace(model, CE, x, y, params, probes, h=h)
        errors.append((abs(float(fd.values.mean()) / value - 1), rel_err(fd.grads, grads)))
    # first-order convergence: each 10x smaller step gives a ~10x smaller error
    for (v0, g0), (v1, g1) in zip(errors, errors[1:], strict=False):
        assert v1 < 0.2 * v0 and g1 < 0.2 * g0, errors
    assert errors[-1][0] < 1e-5 and errors[-1][1] < 1e-4, errors


def test_the_default_step_is_accurate_in_float64():
    model = smooth_cnn()
    x, y = images(6)
    params = list(model.parameters())
    probes = sample_probes(params, 3, seed=4)
    value, grads = exact_value_and_grad(model, x, y, probes)
    fd = fd_sq_trace(model, CE, x, y, params, probes)
    assert abs(float(fd.values.mean()) / value - 1) < 1e-4 and rel_err(fd.grads, grads) < 1e-3
    assert fd.evaluations == 1 + 3 * 3
    r, s = fd.steps[0]
    theta_norm = float(torch.cat([p.detach().flatten() for p in params]).norm())
    v_norm = float(torch.cat([v[0].flatten() for v in probes]).norm())
    assert r == pytest.approx(1e-5 * (1 + theta_norm) / v_norm) and s > 0
    assert step_sizes(params, [torch.zeros_like(p) for p in params], 1e-3) == 0.0


def test_relu_kinks_are_frozen_at_theta():
    """Units whose sign flips within the step would add a term growing like 1/r."""
    model = relu_bn_cnn()
    x, y = images(8)
    params = list(model.parameters())
    probes = sample_probes(params, 2, seed=0)
    value, _ = exact_value_and_grad(model, x, y, probes)
    frozen = [abs(float(fd_sq_trace(model, CE, x, y, params, probes, h=h, with_grad=False).values.mean()) / value - 1)
              for h in (1e-2, 1e-3, 1e-4)]
    loose = fd_sq_trace(model, CE, x, y, params, probes, h=1e-2, with_grad=False, freeze_kinks=False)
    assert frozen[2] < 0.2 * frozen[1] < 0.04 * frozen[0] and frozen[2] < 1e-4, frozen
    assert abs(float(loose.values.mean()) / value - 1) > 1.0  # kinks crossed: far off


def _directional_derivative_of_exact_value(model, x, y, probes, direction, eps=1e-5):
    """(f(θ + εd) − f(θ − εd)) / 2ε of the autograd value f (second order: exact through BN)."""
    params = list(model.parameters())
    out = []
    for sign in (1, -1):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction, strict=True):
                p.add_(d, alpha=sign * eps)
        out.append(exact_value_and_grad(shifted, x, y, probes)[0])
    del params
    return (out[0] - out[1]) / (2 * eps)


def test_gradient_through_batchnorm_matches_the_derivative_of_the_exact_value():
    # autograd's own third derivative through train-mode BatchNorm/LayerNorm is wrong in torch
    # (pytorch/pytorch#186256, #175754): the reference is the derivative of the exact value.
    model = relu_bn_cnn()
    x, y = images(8)
    params = list(model.parameters())
    probes = sample_probes(params, 2, seed=0)
    fd = fd_sq_trace(model, CE, x, y, params, probes)  # float64 default h = 1e-5
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        expected = _directional_derivative_of_exact_value(model, x, y, probes, direction)
        got = sum(float((a * d).sum()) for a, d in zip(fd.grads, direction, strict=True))
        assert got == pytest.approx(expected, rel=1e-3)


def test_the_model_and_the_random_state_are_left_alone():
    model = nn.Sequential(relu_bn_cnn(), nn.Dropout(0.5))
    x, y = images(8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    params = list(model.parameters())
    fd_sq_trace(model, CE, x, y, params, sample_probes(params, 2, seed=0))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes and all(p.grad is None for p in params)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not same_function_in_train_mode(model) and same_function_in_train_mode(model.eval())


def test_penalty_backend_value_gradient_and_objective():
    model = smooth_cnn()
    x, y = images(6)
    params = list(model.parameters())
    grads, values = {}, {}
    for backend in ("autograd", "finite-difference"):
        penalty = FlatnessPenalty(model, CE, lam=0.5, probes=3, seed=0, backend=backend)
        term = penalty(x, y)
        values[backend] = (float(term.detach()), penalty.last_sq_trace, penalty.last_penalty)
        grads[backend] = torch.autograd.grad(CE(model(x), y) + term, params)
    auto, fd = values["autograd"], values["finite-difference"]
    assert fd[0] == pytest.approx(auto[0], rel=1e-4) and fd[2] == pytest.approx(fd[0], rel=1e-12)
    assert fd[1] == pytest.approx(auto[1], rel=1e-4) and fd[0] == pytest.approx(0.5 * fd[1] / 6, rel=1e-12)
    assert rel_err(grads["finite-difference"], grads["autograd"]) < 1e-3
    # objective(): the task gradient shared as g(θ) — the same result, one evaluation fewer
    penalty = FlatnessPenalty(model, CE, lam=0.5, probes=3, seed=0, backend="finite-difference")
    loss, total = penalty.objective(x, y)
    assert float(loss) == pytest.approx(float(CE(model(x), y).detach()), rel=1e-12)
    assert float(total.detach()) == pytest.approx(float(loss) + fd[0], rel=1e-12)
    shared = torch.autograd.grad(total, params)
    assert rel_err(shared, grads["finite-difference"]) < 1e-9
    # a step without curvature: the plain task loss
    penalty = FlatnessPenalty(model, CE, lam=0.5, probes=1, every=2, seed=0, backend="finite-difference")
    penalty.objective(x, y)
    loss, total = penalty.objective(x, y)
    assert float(total) == float(loss)


def test_step_settings_are_checked():
    assert relative_step(torch.float32) == (3e-3, 1e-4) and relative_step(torch.float64, 1e-3) == (1e-3, 1e-3)
    with pytest.raises(ValueError, match="relative steps"):
        relative_step(torch.float32, (1e-3, 0.0))
    for bad in (0.0, (1e-3,), (1e-3, float("nan"))):
        with pytest.raises(ValueError, match="fd_step"):
            FlatnessPenalty(smooth_cnn(), CE, backend="finite-difference", fd_step=bad)
    FlatnessPenalty(smooth_cnn(), CE, backend="finite-difference", fd_step=(1e-4, 1e-5))
    with pytest.raises(ValueError, match="backend"):
        FlatnessPenalty(smooth_cnn(), CE, backend="finite-differences")


def test_fa_training_step_with_the_fd_backend_trains_and_keeps_running_statistics_out():
    model = relu_bn_cnn()
    x, y = images(8)
    bn = model[1]
    before = bn.running_mean.clone()
    ref = copy.deepcopy(model)
    method = make_method("fa", model, CE, lam=0.1, probes=2, every=1, seed=0, backend="finite-difference")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    info = method.step(x, y, opt)
    assert info["sq_trace"] > 0 and info["penalty"] > 0
    # one task pass updated the running statistics once, as a plain step does
    ref(x)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=0, atol=0)
    assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


def test_torch_compiled_model():
    model = smooth_cnn()
    x, y = images(6)
    reference = FlatnessPenalty(model, CE, lam=1.0, probes=2, seed=0, backend="finite-difference")(x, y)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(RuntimeError):  # what the first-order path is for
        loss = CE(compiled(x), y)
        sq_trace(loss, list(compiled.parameters()), probes=1, seed=0)
    penalty = FlatnessPenalty(compiled, CE, lam=1.0, probes=2, seed=0, backend="finite-difference")
    loss, total = penalty.objective(x, y)
    total.backward()
    assert float(total - loss) == pytest.approx(float(reference), rel=1e-8)
    assert all(p.grad is not None for p in model.parameters())


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(5, dim=8, depth=1, heads=2, mlp_ratio=2.0, patch=4, image_shape=(3, 8, 8)).double()


def test_vit_with_the_fused_attention_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_vit()
    x, y = images(4, shape=(3, 8, 8), classes=5)
    params = list(model.parameters())
    probes = sample_probes(params, 2, seed=0)
    value, _ = exact_value_and_grad(model, x, y, probes)  # math kernel (double backward)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(RuntimeError, match="not implemented"):
            sq_trace(CE(model(x), y), params, probe_vectors=probes)
        fd = fd_sq_trace(model, CE, x, y, params, probes, h=1e-6)  # strongly curved: a small step
    assert float(fd.values.mean()) == pytest.approx(value, rel=1e-4)
    direction = [torch.randn_like(p) for p in params]
    expected = _directional_derivative_of_exact_value(model, x, y, probes, direction)
    got = sum(float((a * d).sum()) for a, d in zip(fd.grads, direction, strict=True))
    assert got == pytest.approx(expected, rel=1e-3)


def test_two_emulated_ranks_average_the_shard_gradients():
    x, y = images(10)
    model = smooth_cnn()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hp = {"lam": 0.5, "probes": 2, "every": 1, "backend": "finite-difference"}
    methods = [make_method("fa", model, CE, seed=rank_seed(1, r), **hp) for r in range(2)]
    EmulatedRanks(methods, [rank_seed(1, r) for r in range(2)]).step(x, y, opt)
    grads = []
    for r in range(2):
        xs, ys = take_shard(x, y, r, 2)
        penalty = FlatnessPenalty(ref, CE, seed=rank_seed(1, r), **{k: v for k, v in hp.items()})
        grads.append(torch.autograd.grad(CE(ref(xs), ys) + penalty(xs, ys), list(ref.parameters())))
    with torch.no_grad():
        for p, q, g0, g1 in zip(model.parameters(), ref.parameters(), *grads, strict=True):
            torch.testing.assert_close(p, q - 0.1 * (g0 / 2 + g1 / 2), rtol=0, atol=1e-9)


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, {tests!r})
    from test_finite_difference import CE, images, smooth_cnn
    from flatness.experiments.running.distributed import take_shard
    from flatness.methods import make_method
    from flatness.probes import rank_seed
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = smooth_cnn()
    ddp = DistributedDataParallel(model)
    method = make_method("fa", ddp, CE, lam=0.5, probes=2, every=1, seed=rank_seed(1, rank),
                         backend="finite-difference")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = images(10)
    for _ in range(2):
        method.step(*take_shard(x, y, rank, world), opt)
    if rank == 0:
        torch.save(model.state_dict(), {out!r})
    # release DDP's reducer before its process group: freed after it, at interpreter exit, its
    # threads abort the process ("terminate called without an active exception")
    del method, ddp
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_one_process_twin(tmp_path):
    out = tmp_path / "ddp.pt"
    script = tmp_path / "ddp_fd.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = torch.load(out, weights_only=True)
    x, y = images(10)
    model = smooth_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    methods = [make_method("fa", model, CE, lam=0.5, probes=2, every=1, seed=rank_seed(1, r),
                           backend="finite-difference") for r in range(2)]
    twin = EmulatedRanks(methods, [rank_seed(1, r) for r in range(2)])
    for _ in range(2):
        twin.step(x, y, opt)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-9)
    assert float((ddp["3.weight"] - smooth_cnn()[3].weight).abs().max()) > 1e-4  # it trained


@pytest.mark.parametrize("build", [smooth_cnn, relu_bn_cnn])
def test_fa_method_shares_the_task_gradient_as_g_theta(build):
    """The method's step takes g(θ) from its task pass (one forward pass fewer) and updates the
    weights as the unshared step does.
    """
    from flatness.methods.base import Here
    from flatness.methods.fa import SharedTaskGradient

    x, y = images(8)
    results = {}
    for shared in (True, False):
        model = build().double()
        method = make_method("fa", model, CE, lam=0.1, probes=2, every=1, seed=0, backend="finite-difference")
        assert isinstance(method.point, SharedTaskGradient)
        if not shared:
            method.point = Here()
        calls = []
        model.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        info = method.step(x.double(), y, opt)
        results[shared] = (torch.cat([p.detach().flatten() for p in model.parameters()]), len(calls), info)
    (w_shared, n_shared, info), (w_plain, n_plain, plain_info) = results[True], results[False]
    assert n_shared == n_plain - 1
    assert torch.allclose(w_shared, w_plain, rtol=1e-9, atol=1e-12)
    assert info["sq_trace"] == pytest.approx(plain_info["sq_trace"], rel=1e-9)
    assert float(info["loss"]) == pytest.approx(float(plain_info["loss"]), rel=1e-12)


def test_fa_method_with_dropout_does_not_share_the_task_gradient():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    x, y = images(8)
    method = make_method("fa", model, CE, lam=0.1, probes=1, every=1, seed=0, backend="finite-difference")
    assert not method.penalty.shares_task_gradient()
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.05))
    assert info["sq_trace"] > 0
