"""Mode connectivity (flatness.connectivity, flatness connect) and BatchNorm re-estimation
(flatness.norm_statistics, landscape interpolation).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatness import FlatnessError
from flatness.cli import main
from flatness.connectivity import barrier, bezier_path, connect, linear_path, plot_connectivity, train_bezier
from flatness.experiments.running.checkpoints import save_checkpoint
from flatness.experiments.world.data import iterate_batches
from flatness.experiments.world.tasks import get_task
from flatness.landscape import interpolate
from flatness.norm_statistics import reestimate_norm_statistics

CE = nn.functional.cross_entropy


def accuracy(logits, y):
    return (logits.argmax(-1) == y).double().mean()


def bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    model.train()
    model(torch.randn(16, 4, dtype=torch.float64))  # running statistics that are not the data's
    return model


def data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[:25], y[:25]), (x[25:], y[25:])]


class Ring(nn.Module):
    """Two basins on a ring: margin 1 − 2(‖w‖² − 1)² of the right class (label 1), so the loss
    softplus(−margin) is lowest on the unit circle and highest at its centre.
    """

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        margin = 1 - 2 * (self.w.pow(2).sum() - 1) ** 2
        return torch.stack([torch.zeros(len(x), dtype=torch.float64), margin.expand(len(x))], dim=1)


def ring_loss(w):
    margin = 1 - 2 * (w[0] ** 2 + w[1] ** 2 - 1) ** 2
    return math.log1p(math.exp(-margin))


RING_DATA = [(torch.zeros(4, 1), torch.ones(4, dtype=torch.long))]


def test_barrier_definition():
    t = np.linspace(0, 1, 5)
    assert barrier(t, [0, 0.5, 1, 0.5, 0]) == 1.0
    assert barrier(t, 2 + 3 * t) == 0.0  # a straight line has none
    assert barrier(t, [1.0, 0.2, 0.1, 0.3, 0.5]) == 0.0  # below the chord everywhere
    assert barrier(t, [0.0, 0.5, 0.5, 0.9, 1.0]) == pytest.approx(0.25)  # above the chord 0 → 1
    assert math.isnan(barrier(t, [0, math.nan, 0, 0, 0]))
    with pytest.raises(FlatnessError, match="from 0 to 1"):
        barrier([0.0, 0.5], [1.0, 2.0])


def test_two_copies_of_one_model_have_barrier_zero_and_are_left_alone():
    model = bn_model()
    twin = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = connect(model, twin, CE, data(), data(seed=2), num=11, accuracy=accuracy, curve_steps=0)
    assert result.linear.barrier_loss == 0.0 and result.linear.barrier_error == 0.0
    assert result.bezier is None and result.info["distance"] == 0.0 and result.info["norm_stats"] == "reestimated"
    assert np.all(result.linear.loss == result.linear.loss[0])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.training


def test_statistics_are_re_estimated_at_each_point():
    model, other = bn_model(0), bn_model(1)
    stats = data(seed=3)
    path = linear_path(model, other, CE, data(), num=3, stat_batches=stats)
    # reference at t = 0.5: a copy with the mean weights, statistics re-estimated by hand
    mid = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(mid.parameters(), other.parameters(), strict=True):
            p.copy_(0.5 * (p + q))
        h = torch.cat([mid[0](x) for x, _ in stats])
        mid[1].running_mean.copy_(h.mean(0))
        sizes = [len(x) for x, _ in stats]
        variances = [mid[0](x).var(0, unbiased=True) for x, _ in stats]
        mid[1].running_var.copy_(sum(n * v for n, v in zip(sizes, variances, strict=True)) / sum(sizes))
        mid.eval()
        expected = sum(len(x) * float(CE(mid(x), y)) for x, y in data()) / 40
    assert path.loss[1] == pytest.approx(expected, rel=1e-10)
    # the landscape's interpolation now does the same by default, the old way on request
    surface = interpolate(model, other, CE, data(), alphas=[0.0, 0.5, 1.0], stat_batches=stats)
    assert np.allclose(surface.loss, path.loss, rtol=1e-12)
    old = interpolate(model, other, CE, data(), alphas=[0.0, 0.5, 1.0], norm_stats="interpolate")
    assert not np.isclose(old.loss[1], path.loss[1])
    with pytest.raises(FlatnessError, match="norm_stats"):
        interpolate(model, other, CE, data(), norm_stats="nope")


def test_reestimation_is_the_size_weighted_batch_statistics_and_restores_flags():
    model = bn_model()
    model[1].momentum = 0.3
    model.eval()
    batches = [(torch.randn(n, 4, dtype=torch.float64), None) for n in (30, 10, 7)]
    reestimate_norm_statistics(model, batches)
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches]
    assert torch.allclose(model[1].running_mean, torch.cat(h).mean(0), atol=1e-12)
    expected_var = sum(len(b) * b.var(0, unbiased=True) for b in h) / 47
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-12)
    assert model[1].momentum == 0.3 and not model.training and not model[1].training


def test_a_barrier_between_two_basins_is_found_and_the_bezier_curve_goes_around_it():
    a, b = Ring([-0.98, 0.2]), Ring([0.98, 0.2])  # on the ring, off-axis (the midpoint is not a saddle)
    line = linear_path(a, b, CE, RING_DATA, num=21, accuracy=accuracy)
    # the line passes closest to the centre at t = 0.5, w = (0, 0.2): the ridge's height there
    assert line.barrier_loss == pytest.approx(ring_loss([0.0, 0.2]) - ring_loss([0.98, 0.2]), rel=1e-9)
    assert line.barrier_loss > 0.8 and line.barrier_error == 1.0
    control, history = train_bezier(a, b, CE, RING_DATA, steps=300, lr=0.02, seed=0)
    curve = bezier_path(a, b, control, CE, RING_DATA, num=21, accuracy=accuracy)
    assert curve.barrier_loss < 0.1 * line.barrier_loss and curve.barrier_error == 0.0
    assert history[-1] < history[0] and float(control["w"][1]) > 0.5  # bent up around the centre
    again, _ = train_bezier(a, b, CE, RING_DATA, steps=300, lr=0.02, seed=0)
    assert torch.equal(again["w"], control["w"])  # seeded


def test_connect_plot_and_json(tmp_path):
    a, b = Ring([-0.98, 0.2]), Ring([0.98, 0.2])
    result = connect(a, b, CE, RING_DATA, RING_DATA, num=11, accuracy=accuracy, curve_steps=100, curve_lr=0.02)
    assert result.bezier is not None and result.bezier.barrier_loss < result.linear.barrier_loss
    png = plot_connectivity(result, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(result.save_json(tmp_path / "c.json").read_text())
    assert saved["linear"]["barrier_loss"] == result.linear.barrier_loss and len(saved["bezier"]["t"]) == 11
    with pytest.raises(FlatnessError, match="different parameters|shape"):
        linear_path(a, bn_model(), CE, RING_DATA)


@pytest.fixture(scope="module")
def bc_checkpoints(tmp_path_factory):
    """Two breast-cancer models of different seeds, saved as the runner saves them."""
    root = tmp_path_factory.mktemp("ckpts")
    task = get_task("breast-cancer-mlp")
    splits = task.load()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = task.build_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for x, y in list(iterate_batches(splits.x_train, splits.y_train, 32, shuffle=False))[:8]:
            opt.zero_grad()
            task.loss_fn(model(x), y).backward()
            opt.step()
        paths.append(root / f"none_seed{seed}.pt")
        save_checkpoint(paths[-1], model, task="breast-cancer-mlp", meta={"seed": seed}, model_kwargs={})
    return paths


def test_flatness_connect_prints_both_barriers_and_writes_plot_and_json(bc_checkpoints, tmp_path, capsys):
    a, b = bc_checkpoints
    argv = ["connect", str(a), str(b), "--task", "breast-cancer-mlp", "--out", str(tmp_path), "--num", "5",
            "--examples", "64", "--curve-steps", "10", "--threads", "1"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("linear_barrier_loss", "linear_barrier_error", "bezier_barrier_loss", "bezier_barrier_error"):
        assert out[key] >= 0
    assert out["examples"] == 64 and out["distance"] > 0
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
    saved = json.loads(open(out["json"]).read())
    assert saved["linear"]["barrier_loss"] == pytest.approx(out["linear_barrier_loss"])
    assert main(argv) == 0
    assert "bezier_barrier_loss" in capsys.readouterr().out  # the plain listing too


@pytest.mark.parametrize("extra, message", [(["--num", "1"], "--num must be >= 2"),
                                            (["--curve-lr", "0"], "--curve-lr"),
                                            (["--task", "cifar100-mlp"], "is a checkpoint of task")])
def test_flatness_connect_bad_input_is_one_line(bc_checkpoints, tmp_path, capsys, extra, message):
    a, b = bc_checkpoints
    argv = ["connect", str(a), str(b), "--task", "breast-cancer-mlp", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
