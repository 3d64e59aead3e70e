"""Contract shared by every training method: one optimizer step, exact state restoration
(also when a step raises midway), validated hyper-parameters, a default grid, and training.
"""

import pytest
import torch
from torch import nn

from flatness.methods import METHODS, make_method, method_hparam
from helpers import tiny_batch

CE = nn.CrossEntropyLoss()

# method -> hyper-parameters for a quick step on the tiny model
SETTINGS = {
    "none": {},
    "fa": {"lam": 0.1, "probes": 2, "seed": 0},
    "sam": {"rho": 0.1},
    "gnp": {"rho": 0.1},
    "gnp_exact": {"rho": 0.1, "form": "exact"},
    "curvature": {"alpha": 0.1},
    "curvature_vmap": {"alpha": 0.1, "impl": "vmap"},
    "nrs": {"eps": 0.5, "seed": 0},
    "rpr": {"eps": 0.5, "seed": 0},
}
NEW_METHODS = ("sam", "gnp", "curvature", "nrs", "rpr")


def _method(label: str, model: nn.Module, loss_fn=CE):
    name = label.split("_")[0] if label not in METHODS else label
    return make_method(name, model, loss_fn, **SETTINGS[label])


class Scaled(nn.Module):
    """A module with a buffer, so restoration of buffers is checked too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def buffered_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.3), Scaled(), nn.Linear(5, 3)
    ).double()
    model[1].eval()  # a mixed-mode model: each flag must come back as it was
    return model


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _snapshot(model: nn.Module):
    return (
        [t.detach().clone() for t in model.parameters()],
        [t.detach().clone() for t in model.buffers()],
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("label", list(SETTINGS))
def test_step_calls_optimizer_step_once_and_keeps_modes(label):
    model = buffered_mlp()
    before = _snapshot(model)
    opt = CountingSGD(model.parameters(), lr=0.1)
    x, y = tiny_batch(n=8)
    info = _method(label, model).step(x, y, opt)
    assert opt.steps == 1
    # floats, or detached 0-d tensors (no per-step host synchronisation)
    assert all(
        isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad)
        for v in info.values()
    ) and "loss" in info
    params, buffers, modes = _snapshot(model)
    assert modes == before[2]
    assert all(torch.equal(a, b) for a, b in zip(buffers, before[1], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(params, before[0], strict=True))  # it did train
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("label", [k for k in SETTINGS if k not in ("none", "fa")])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_exception_mid_step_leaves_weights_buffers_and_modes_exactly(label, fail_at):
    """The model raises on its ``fail_at``-th forward (the perturbed pass when that is 2)."""
    model = buffered_mlp()
    calls = {"n": 0}

    def bomb(module, inputs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("boom")

    before = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = _method(label, model)
    x, y = tiny_batch(n=8)
    handle = model[4].register_forward_pre_hook(bomb)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            for _ in range(3):  # single-forward methods never reach call 2: allow a few steps
                method.step(x, y, opt)
                before = _snapshot(model)  # a step that completed may change the weights
    finally:
        handle.remove()
    params, buffers, modes = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, before[1], strict=True))
    assert modes == before[2]
    assert not any(m._forward_hooks for m in model.modules())


BAD = [
    ("sam", "rho", -0.1),
    ("gnp", "rho", -1.0),
    ("gnp", "fd_radius", 0.0),
    ("curvature", "alpha", -0.5),
    ("nrs", "eps", -0.1),
    ("nrs", "alpha", -1.0),
    ("rpr", "eps", -0.2),
    ("sam", "rho", float("nan")),
    ("curvature", "alpha", "0.1"),
]


@pytest.mark.parametrize("name,param,value", BAD)
def test_bad_hyperparameters_raise_a_clear_error(name, param, value):
    with pytest.raises(ValueError, match=param):
        make_method(name, nn.Linear(2, 2), CE, **{param: value})


def test_bad_choices_raise_a_clear_error():
    with pytest.raises(ValueError, match="unknown method"):
        make_method("sam+adam", nn.Linear(2, 2), CE)
    with pytest.raises(ValueError, match="at most one"):
        make_method("sam+rpr", nn.Linear(2, 2), CE)
    with pytest.raises(TypeError, match="probes"):
        make_method("sam+nrs", nn.Linear(2, 2), CE, probes=3)
    with pytest.raises(ValueError, match="form"):
        make_method("gnp", nn.Linear(2, 2), CE, form="spectral")
    with pytest.raises(ValueError, match="impl"):
        make_method("curvature", nn.Linear(2, 2), CE, impl="loop")


@pytest.mark.parametrize("name", NEW_METHODS)
def test_registry_hparam_and_default_grid(name):
    cls = METHODS[name]
    hparam = method_hparam(name)
    assert hparam in {"rho", "alpha", "eps"}
    grid = cls.default_grid
    assert len(grid) >= 2 and all(v > 0 for v in grid)
    for value in grid:  # every grid value is accepted
        make_method(name, nn.Linear(2, 2), CE, **{hparam: value})


@pytest.mark.parametrize("label", [k for k in SETTINGS if k != "fa"])
def test_each_method_fits_a_small_problem(label):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    method = _method(label, model)
    with torch.no_grad():
        start = float(CE(model(x), y))
    for _ in range(40):
        method.step(x, y, opt)
    with torch.no_grad():
        assert float(CE(model(x), y)) < 0.6 * start



# --- no host synchronisation in a step -----------------------------------------------------

from torch.overrides import TorchFunctionMode  # noqa: E402

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value on the host (on a device each one waits for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_host_read_detector_sees_each_kind_of_read():
    t = torch.ones(())
    with HostReads() as seen:
        float(t), t.item(), bool(t), int(t), t.tolist(), [0, 1][t.long()]
    assert len(seen.reads) == 6


def bn_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("label", sorted(SETTINGS) + ["sam+fa", "fa_every2"])
def test_a_step_reads_nothing_on_the_host_but_the_fa_guard(label):
    """Method.step never reads a tensor on the host (float(), .item(), bool(), ...): each read waits for the device.

    The one exception is the FA penalty's curvature step, whose non-finite guard must decide before
    the update: exactly one read there (the first step's check of the closed form against autograd
    aside).
    """
    every = 2 if label == "fa_every2" else 1
    settings = {"lam": 0.1, "probes": 2, "seed": 0, "every": every} if label.startswith("fa") else None
    model = bn_mlp()
    if label == "sam+fa":
        method = make_method("sam+fa", model, CE, rho=0.1, lam=0.1, probes=2, seed=0)
    else:
        method = make_method("fa", model, CE, **settings) if settings else _method(label, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = tiny_batch(n=8)
    method.step(x, y, opt)  # the first step: FA's backend="auto" checks the closed form once
    uses_fa = label.startswith("fa") or label == "sam+fa"
    for step in range(1, 5):
        with HostReads() as seen:
            method.step(x, y, opt)
        guard = uses_fa and step % every == 0
        assert seen.reads == (["tolist"] if guard else []), f"step {step}: {seen.reads}"
