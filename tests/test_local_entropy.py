"""Local entropy (Entropy-SGD's F): its normalisation, the Langevin estimate against the closed
form on a quadratic, the measure policy, divergence, and ``flatness measure --measures local_entropy``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scipy import integrate
from torch import nn

from flatness.cli import main
from flatness.experiments.running.checkpoints import save_checkpoint
from flatness.experiments.world.tasks import get_task
from flatness.measures import MeasureOptions, compute_measures, local_entropy, quadratic_local_entropy
from flatness.utils import FlatnessError


def half_square(out, y):
    return 0.5 * out.pow(2).sum()


def quadratic_model(a: torch.Tensor, w: torch.Tensor):
    """f(w) = ½ Σ a_i w_i²: a linear map with rows √a_i, loss ½‖·‖² (minimum at 0)."""
    model = nn.Linear(len(a), 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model, [(torch.diag(a.sqrt()), torch.zeros(len(a)))]


@pytest.mark.parametrize("a, d, gamma, noise", [(2.0, 0.3, 1.0, 0.5), (50.0, -0.1, 5.0, 0.2), (0.1, 1.0, 2.0, 1.0)])
def test_closed_form_is_the_papers_F_without_its_gaussian_constant(a, d, gamma, noise):
    # LE = ε² [log ∫ exp(-(f(w') + γ/2 (w - w')²)/ε²) dw' - ½ log(2π ε²/γ)] in one dimension
    c, t = 0.7, noise**2
    f = lambda v: c + 0.5 * a * v**2  # noqa: E731  (minimum m = 0, w = d)
    z, _ = integrate.quad(lambda v: math.exp(-(f(v) + 0.5 * gamma * (d - v) ** 2) / t), -50, 50, points=[0, d],
                          epsabs=0, epsrel=1e-12, limit=200)
    numeric = t * (math.log(z) - 0.5 * math.log(2 * math.pi * t / gamma))
    closed = quadratic_local_entropy(torch.tensor([a], dtype=torch.float64), torch.tensor([d], dtype=torch.float64),
                                     gamma=gamma, noise=noise, constant=c)
    assert closed == pytest.approx(numeric, rel=1e-9)


def test_langevin_estimate_matches_the_closed_form_on_a_quadratic():
    # 400 curvatures from 0.01γ to 5γ and an offset from the minimum (both terms of LE matter).
    # Step 0.01: the unadjusted chain's variance is ε²/(k(1 - 0.005k)), within 3 % for k ≤ 6;
    # 8 nodes: quadrature error below 0.1 % here; tolerance 5 % (Monte Carlo ~1.5 %).
    gen = torch.Generator().manual_seed(0)
    a = torch.logspace(-2, 0.7, 400, dtype=torch.float64)
    d = 0.05 * torch.randn(400, generator=gen, dtype=torch.float64)
    model, data = quadratic_model(a, d)
    r = local_entropy(model, half_square, data, gamma=1.0, noise=0.1, steps=300, burn_in=60, step_size=0.01,
                      nodes=8, seed=0)
    exact = quadratic_local_entropy(a, d, gamma=1.0, noise=0.1)
    assert r.value == pytest.approx(exact, rel=0.05)
    assert r.loss == pytest.approx(0.5 * float((a * d * d).sum()))
    assert r.sharpness == pytest.approx(-r.value - r.loss) and r.sharpness > 0
    assert 0 < r.stderr < 0.05 * abs(exact)
    assert len(r.lambdas) == len(r.node_means) == 8 and 0 < min(r.lambdas) < max(r.lambdas) < 1
    # the chains' mean losses decrease with λ (d⟨f⟩/dλ = -Var(f)/ε² ≤ 0)
    assert r.node_means[0] > r.node_means[-1]
    again = local_entropy(model, half_square, data, gamma=1.0, noise=0.1, steps=300, burn_in=60, step_size=0.01,
                          nodes=8, seed=0)
    assert again == r  # seeded: reproducible


def test_flatter_minimum_has_larger_local_entropy():
    sharp, data_sharp = quadratic_model(
        torch.full((50,), 20.0, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    )
    flat, data_flat = quadratic_model(torch.full((50,), 0.2, dtype=torch.float64), torch.zeros(50, dtype=torch.float64))
    kw = dict(gamma=1.0, noise=0.1, steps=60, burn_in=20, step_size=0.02, seed=0)
    flat_value = local_entropy(flat, half_square, data_flat, **kw).value
    assert flat_value > local_entropy(sharp, half_square, data_sharp, **kw).value


def test_measure_policy_leaves_model_flags_statistics_and_rng_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    model.train()
    model(torch.randn(16, 4, dtype=torch.float64))  # non-trivial running statistics
    model[3].eval()  # a mixed mode the user chose
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = (model[1].track_running_stats, model[1].momentum)
    data = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)))]
    rng = torch.get_rng_state()
    options = MeasureOptions(entropy_steps=8, entropy_nodes=2)
    for function in ("deployed", "batch_stats"):
        out = compute_measures(model, nn.functional.cross_entropy, data, ["local_entropy"],
                               dataclasses.replace(options, function=function))
        assert math.isfinite(out["local_entropy"]) and out["local_entropy_gamma"] == 100.0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert (model[1].track_running_stats, model[1].momentum) == flags


def test_deployed_is_the_default_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 2)).double().train()
    data = [(torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))]
    kw = dict(gamma=10.0, noise=0.05, steps=8, burn_in=2, nodes=2, seed=3)
    a = local_entropy(model, nn.functional.cross_entropy, data, **kw)
    model.eval()
    assert local_entropy(model, nn.functional.cross_entropy, data, **kw) == a  # dropout off either way
    assert model.training is False


def test_a_diverging_chain_is_one_clear_error():
    model, data = quadratic_model(torch.full((20,), 1000.0, dtype=torch.float64), torch.zeros(20, dtype=torch.float64))
    with pytest.raises(FlatnessError, match="Langevin chain diverged.*lower the step size"):
        local_entropy(model, half_square, data, gamma=1.0, noise=0.1, step_size=0.05)


@pytest.mark.parametrize("kwargs, match", [({"gamma": 0.0}, "gamma"), ({"noise": math.nan}, "noise"),
                                           ({"steps": 5, "burn_in": 2}, "burn_in"), ({"nodes": 0}, "nodes"),
                                           ({"step_size": -1.0}, "step_size")])
def test_bad_options_are_refused(kwargs, match):
    model, data = quadratic_model(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        local_entropy(model, half_square, data, **kwargs)


def test_flatness_measure_prints_local_entropy(tmp_path, capsys):
    task = get_task("breast-cancer-mlp")
    task.load()
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, task.build_model(), task="breast-cancer-mlp", meta={})
    argv = ["measure", str(ckpt), "--task", "breast-cancer-mlp", "--examples", "64", "--threads", "1",
            "--measures", "local_entropy", "--entropy-steps", "6", "--entropy-nodes", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert math.isfinite(out["local_entropy"]) and out["local_entropy_sharpness"] == pytest.approx(
        -out["local_entropy"] - compute_loss(ckpt, task))
    assert out["local_entropy_step_size"] == pytest.approx(0.05 / 100)
    assert main([*argv[:-3], "--entropy-steps", "5"]) == 2
    assert "--entropy-steps must be >= 6" in capsys.readouterr().err


def compute_loss(ckpt, task):
    from flatness.cli.inspect import load_for_task

    _, model, _, batches = load_for_task(ckpt, "breast-cancer-mlp", examples=64)
    return compute_measures(model, task.loss_fn, batches, ["loss"])["loss"]
