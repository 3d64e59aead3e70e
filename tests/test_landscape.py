"""Loss-landscape surfaces, interpolation and trajectory PCA (flatness.landscape)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatness import FlatnessError
from flatness.landscape import (
    filter_normalize,
    interpolate,
    pca_surface,
    plot_surface,
    random_direction,
    surface_1d,
    surface_2d,
    trajectory_pca,
)

CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(6, 3)).double()
    model.train()
    model(torch.randn(16, 4, dtype=torch.float64))  # running statistics that are not the init
    return model


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, [(x[:10], y[:10]), (x[10:], y[10:])]


def _loss_with(model, x, y, delta=None, scale=1.0):
    """Reference: the loss of a perturbed deep copy, in eval mode."""
    other = copy.deepcopy(model).eval()
    if delta is not None:
        with torch.no_grad():
            for n, p in other.named_parameters():
                p.add_(scale * delta[n])
    return float(CE(other(x), y).detach())


def _accuracy(logits, y):
    return (logits.argmax(1) == y).double().mean()


def test_filter_normalisation_matches_filter_norms():
    model = _model()
    d = random_direction(model, seed=3)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.testing.assert_close(d[name].norm(dim=1), p.detach().norm(dim=1))
        else:
            assert torch.count_nonzero(d[name]) == 0  # biases and BN parameters left out
    d1 = random_direction(model, seed=3, include_1d=True)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert float(d1[name].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-10)
    with pytest.raises(FlatnessError, match="shape"):
        filter_normalize({"0.weight": torch.ones(2, 2)}, {"0.weight": torch.ones(3, 3)})
    assert not torch.equal(random_direction(model, seed=3)["0.weight"],
                           random_direction(model, seed=4)["0.weight"])


def test_surface_1d_matches_a_perturbed_copy_and_has_the_metric():
    model = _model()
    x, y, data = _data()
    d = random_direction(model, seed=0)
    s = surface_1d(model, CE, data, d, alphas=[-0.5, 0.0, 0.25], metric=_accuracy)
    for alpha, value in zip(s.xs, s.loss, strict=True):
        assert value == pytest.approx(_loss_with(model, x, y, d, alpha), rel=1e-10)
    assert s.metric_name == "_accuracy" and 0 <= s.metric.min() <= s.metric.max() <= 1
    assert s.loss.shape == (3,) and s.kind == "1d"


def test_surface_2d_layout_is_rows_of_y():
    model = _model()
    x, y, data = _data()
    gen = torch.Generator().manual_seed(5)
    d1 = random_direction(model, generator=gen)
    d2 = random_direction(model, generator=gen)
    xs, ys = np.array([-1.0, 0.0, 0.5]), np.array([0.0, 0.3])
    s = surface_2d(model, CE, data, (d1, d2), xs=xs, ys=ys)
    assert s.loss.shape == (2, 3)
    combined = {n: 0.5 * d1[n] + 0.3 * d2[n] for n in d1}
    assert s.loss[1, 2] == pytest.approx(_loss_with(model, x, y, combined), rel=1e-10)
    assert s.loss[0, 1] == pytest.approx(_loss_with(model, x, y), rel=1e-10)


def test_interpolation_ends_are_the_two_models():
    a, b = _model(0), _model(1)
    x, y, data = _data()
    s = interpolate(a, b, CE, data, alphas=[0.0, 0.5, 1.0], metric=_accuracy, norm_stats="interpolate")
    assert s.loss[0] == pytest.approx(_loss_with(a, x, y), rel=1e-10)
    assert s.loss[2] == pytest.approx(_loss_with(b, x, y), rel=1e-10)  # buffers interpolated too
    assert s.info["distance"] > 0
    other = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    with pytest.raises(FlatnessError, match="different parameters|shape"):
        interpolate(a, other, CE, data)


def test_trajectory_pca_recovers_a_planar_trajectory():
    model = _model()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    e1 = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()}
    e2 = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()}
    steps = [(3.0, 1.0), (2.0, 1.5), (1.2, 1.1), (0.5, 0.4), (0.1, 0.05)]
    ckpts = [{n: theta[n] + a * e1[n] + b * e2[n] for n in theta} for a, b in steps]
    d1, d2, coords, explained = trajectory_pca(model, ckpts)
    assert coords.shape == (6, 2) and np.allclose(coords[-1], 0)
    assert explained.sum() == pytest.approx(1.0, abs=1e-8)  # the path lies in a plane
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in theta])  # noqa: E731
    assert float(flat(d1).norm()) == pytest.approx(1.0) and float(flat(d2).norm()) == pytest.approx(1.0)
    for (c1, c2), ckpt in zip(coords[:-1], ckpts, strict=True):  # the projection reconstructs each checkpoint
        rebuilt = flat(theta) + c1 * flat(d1) + c2 * flat(d2)
        torch.testing.assert_close(rebuilt, flat(ckpt), rtol=1e-8, atol=1e-8)
    with pytest.raises(FlatnessError, match="at least 2"):
        trajectory_pca(model, ckpts[:1])
    with pytest.raises(FlatnessError, match="fewer than 2 directions"):
        trajectory_pca(model, [ckpts[0], ckpts[0], ckpts[0]])
    with pytest.raises(FlatnessError, match="lacks parameter"):
        trajectory_pca(model, [{"nope": torch.zeros(1)}, ckpts[0]])


def test_pca_surface_covers_the_trajectory(tmp_path):
    model = _model()
    x, y, data = _data()
    theta = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    ckpts = [{n: t + 0.1 * k * torch.randn(t.shape, generator=gen, dtype=t.dtype)
              for n, t in theta.items()} for k in range(1, 5)]
    s = pca_surface(model, CE, data, ckpts, num=5)
    assert s.kind == "pca" and s.loss.shape == (5, 5)
    assert s.xs.min() < s.trajectory[:, 0].min() and s.xs.max() > s.trajectory[:, 0].max()
    png = plot_surface(s, tmp_path / "pca.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    saved = np.load(s.save(tmp_path / "pca.npz"))
    assert saved["trajectory"].shape == (5, 2) and str(saved["kind"]) == "pca"


def test_non_finite_points_are_marked_and_the_rest_computed(tmp_path):
    model = _model()
    x, y, data = _data()
    d = random_direction(model, seed=0)

    def loss_fn(out, target):  # infinite beyond some distance: a "diverged" region
        value = CE(out, target)
        return value if float(out.abs().max()) < 3.0 else value * math.inf

    with pytest.warns(RuntimeWarning, match="not finite at"):
        s = surface_1d(model, loss_fn, data, d, span=4.0, num=9)
    assert 0 < s.num_nonfinite < 9
    assert np.isfinite(s.loss[4]) and np.isnan(s.loss[0])
    with pytest.warns(RuntimeWarning):
        s2 = surface_2d(model, loss_fn, data, span=4.0, num=5)
    assert 0 < s2.num_nonfinite < 25
    for surf, name in [(s, "a.png"), (s2, "b.png")]:
        assert plot_surface(surf, tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def _assert_unchanged(model, snap):
    state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind", ["1d", "2d", "interp", "pca", "direction"])
def test_functions_leave_the_models_unchanged_also_after_an_exception(kind):
    a, b = _model(0), _model(1)
    a[3].eval()  # mixed modes must come back as they were (BatchNorm stays in train mode)
    x, y, data = _data()
    gen = torch.Generator().manual_seed(2)
    ckpts = [{n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
              for n, p in a.named_parameters()} for _ in range(3)]
    snaps = (_snapshot(a), _snapshot(b))

    def run(loss_fn):
        if kind == "1d":
            surface_1d(a, loss_fn, data, num=3)
        elif kind == "2d":
            surface_2d(a, loss_fn, data, num=3)
        elif kind == "interp":
            interpolate(a, b, loss_fn, data, num=3)
        elif kind == "pca":
            pca_surface(a, loss_fn, data, ckpts, num=3)
        else:
            random_direction(a, seed=0)

    run(CE)
    _assert_unchanged(a, snaps[0]), _assert_unchanged(b, snaps[1])
    calls = {"n": 0}

    def failing(out, target):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Boom("loss failed mid-surface")
        return CE(out, target)

    if kind != "direction":
        with pytest.raises(Boom):
            run(failing)
    _assert_unchanged(a, snaps[0]), _assert_unchanged(b, snaps[1])
