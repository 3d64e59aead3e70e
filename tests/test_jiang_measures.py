"""Jiang et al.'s reference measures against hand computations (float64), and the Dinh rescaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatness.measures import (
    MEASURES,
    MeasureOptions,
    compute_measures,
    distance_from_init,
    margins_of,
    output_margin,
    pac_bayes,
    parameter_norm,
    path_norm,
    reparametrization_check,
    rescale_layers,
    zero_one_error,
)
from flatness.utils import FlatnessError


def relu_mlp(seed: int = 0, d_in: int = 3, hidden: int = 4, d_out: int = 3, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers).double()


def data(seed: int = 1, n: int = 12, d_in: int = 3, d_out: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return [(x[: n // 2], torch.randint(0, d_out, (n // 2,), generator=g)),
            (x[n // 2 :], torch.randint(0, d_out, (n - n // 2,), generator=g))]


def test_parameter_norm_and_distance_by_hand() -> None:
    model = relu_mlp()
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    expected = sum(float(v) ** 2 for v in torch.cat([w1.reshape(-1), w2.reshape(-1)]))
    assert parameter_norm(model) == pytest.approx(expected, rel=1e-12)
    with_1d = expected + sum(float(v) ** 2 for v in torch.cat([b1, b2]))
    assert parameter_norm(model, include_1d=True) == pytest.approx(with_1d, rel=1e-12)
    initial = relu_mlp(seed=5)
    w1_0, _, w2_0, _ = (p.detach() for p in initial.parameters())
    dist = sum(float(v) ** 2 for v in torch.cat([(w1 - w1_0).reshape(-1), (w2 - w2_0).reshape(-1)]))
    assert distance_from_init(model, initial) == pytest.approx(dist, rel=1e-12)
    assert distance_from_init(model, initial.state_dict()) == pytest.approx(dist, rel=1e-12)
    assert distance_from_init(model, model.state_dict()) == 0.0
    with pytest.raises(FlatnessError, match="shape"):
        distance_from_init(model, relu_mlp(hidden=5))


def test_path_norm_sums_paths_by_hand() -> None:
    model = relu_mlp(dropout=0.5)  # dropout is off: eval mode
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    total = 0.0
    for k in range(w2.shape[0]):
        total += float(b2[k]) ** 2  # the path starting at the output bias
        for j in range(w2.shape[1]):
            into_j = float(b1[j]) ** 2 + sum(float(w1[j, i]) ** 2 for i in range(w1.shape[1]))
            total += float(w2[k, j]) ** 2 * into_j
    x = data()[0][0]
    assert path_norm(model, x) == pytest.approx(total, rel=1e-12)
    assert model.training  # modes restored, weights untouched
    assert torch.equal(next(model.parameters()).detach(), w1)


def test_margins_by_hand_multiclass_and_binary() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 2.0, 2.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    assert margins_of(logits, y).tolist() == [0.5, 0.0, -1.0]
    assert float(zero_one_error(logits, y)) == pytest.approx(2 / 3)  # a tie counts as an error
    z = torch.tensor([[2.0], [-0.5], [1.0]], dtype=torch.float64)
    assert margins_of(z, torch.tensor([1.0, 0.0, 0.0])).tolist() == [2.0, 0.5, -1.0]


def test_output_margin_is_the_lower_quantile() -> None:
    model = relu_mlp()
    batches = data(n=40)
    with torch.no_grad():
        all_margins = sorted(
            float(m) for x, y in batches for m in margins_of(model.eval()(x), y)
        )
    model.train()
    m = output_margin(model, batches, quantile=0.1)
    assert m.num_examples == 40
    assert m.value == all_margins[3]  # the (floor(39·0.1) + 1)-th smallest = the 4th
    assert m.inverse_sq == pytest.approx(1 / all_margins[3] ** 2)
    assert m.error == pytest.approx(sum(v <= 0 for v in all_margins) / 40)
    assert model.training


def _one_weight_problem(w: float) -> tuple[nn.Module, list]:
    """f(x) = w·x with one logit: every example is right while w > 0, all wrong once w ≤ 0."""
    model = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(w)
    x = torch.tensor([[1.0], [2.0], [-1.0], [-3.0]], dtype=torch.float64)
    return model, [(x, (x[:, 0] > 0).double())]


def _noise_draws(samples: int, seed: int) -> list[float]:
    """The ξ of noisy_loss for a single-parameter model: one N(0, 1) draw per sample."""
    gen = torch.Generator().manual_seed(seed)
    return [float(torch.randn((1, 1), generator=gen, dtype=torch.float64)) for _ in range(samples)]


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), y)


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_is_the_hand_computed_threshold(magnitude_aware: bool) -> None:
    w, samples, seed, eps = 0.8, 10, 3, 1e-3
    model, batches = _one_weight_problem(w)
    xi = _noise_draws(samples, seed)
    # sample s flips every example once the noise scale s(σ) reaches w/|ξ_s| (ξ_s < 0); the error
    # rise is (number flipped)/samples, so rise ≤ 0.1 holds below the 2nd smallest threshold
    scales = sorted(w / -v for v in xi if v < 0)
    if magnitude_aware:
        thresholds = [math.sqrt(s**2 - eps**2) / w for s in scales]
    else:
        thresholds = scales
    r = pac_bayes(model, _bce, batches, 0.1, magnitude_aware=magnitude_aware, floor=eps,
                  samples=samples, steps=30, tolerance=0.0, seed=seed, initial={"weight": torch.zeros(1, 1)})
    assert r.sigma < thresholds[1] <= r.sigma + 2.0 / 2**30 * 4
    assert r.deviation_at_sigma == pytest.approx(0.1) and r.deviation_above == pytest.approx(0.2)
    assert r.flatness == pytest.approx(1 / r.sigma**2)
    m, s = 4, r.sigma
    if magnitude_aware:
        expected = 0.25 * math.log((eps**2 + (s**2 + 1) * w**2) / (eps**2 + s**2 * w**2)) + math.log(m / s) + 10
    else:
        expected = w**2 / (4 * s**2) + math.log(m / s) + 10
    assert r.bound_orig == pytest.approx(expected, rel=1e-12)
    assert r.bound_init == pytest.approx(expected, rel=1e-12)  # w⁰ = 0 here


def test_pac_bayes_loss_criterion_and_errors() -> None:
    model, batches = _one_weight_problem(0.8)
    r = pac_bayes(model, _bce, batches, 0.05, criterion="loss", samples=4)
    assert r.criterion == "loss" and r.deviation_at_sigma <= 0.05 < r.deviation_above
    assert r.bound_init is None
    with pytest.raises(ValueError, match="deviation"):
        pac_bayes(model, _bce, batches, 0.0)
    wrong, _ = _one_weight_problem(-1.0)  # error 1 everywhere: no noise can raise it
    with pytest.raises(FlatnessError, match="rises by at most"):
        pac_bayes(wrong, _bce, batches, 0.1, samples=2)


def test_registry_runs_the_reference_measures() -> None:
    model = relu_mlp()
    initial = relu_mlp(seed=9)
    names = ["param_norm", "path_norm", "distance_from_init", "margin", "pacbayes", "pacbayes_mag"]
    assert set(names) <= set(MEASURES)
    with torch.no_grad():  # labels the model gets right: noise can raise the error by 0.3
        batches = [(x, model(x).argmax(dim=1)) for x, _ in data(n=60)]
    before = [p.detach().clone() for p in model.parameters()]
    out = compute_measures(model, nn.functional.cross_entropy, batches, names,
                           MeasureOptions(initial=initial.state_dict(), pacbayes_deviation=0.3,
                                          pacbayes_samples=3))
    assert out["param_norm"] == pytest.approx(parameter_norm(model))
    assert out["distance_from_init"] == pytest.approx(distance_from_init(model, initial))
    assert out["inverse_margin_sq"] == pytest.approx(1 / out["output_margin"] ** 2)
    for key in ("pacbayes", "pacbayes_mag"):
        assert out[f"{key}_flatness"] == pytest.approx(1 / out[f"{key}_sigma"] ** 2)
        assert math.isfinite(out[f"{key}_orig"]) and math.isfinite(out[f"{key}_init"])
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(FlatnessError, match="initial weights"):
        compute_measures(model, nn.functional.cross_entropy, batches, ["distance_from_init"])


def test_rescaling_keeps_the_function_and_checks_the_structure() -> None:
    model = relu_mlp(dropout=0.3)
    other = rescale_layers(model, 7.0)
    x = data()[0][0]
    model.eval(), other.eval()
    assert torch.allclose(model(x), other(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(other[0].bias, 7.0 * model[0].bias) and torch.allclose(other[3].weight * 7.0, model[3].weight)
    assert not torch.equal(other[0].weight, model[0].weight)  # a copy: the model is untouched
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(FlatnessError, match="homogeneous"):
        rescale_layers(tanh, 2.0)
    with pytest.raises(FlatnessError, match="first"):
        rescale_layers(model, 2.0, first=1)
    with pytest.raises(FlatnessError, match="alpha"):
        rescale_layers(model, -1.0)


def test_dinh_rescaling_moves_lambda_max_not_adaptive_sharpness() -> None:
    model = relu_mlp(hidden=6)
    batches = data(n=40)
    drift, changes = reparametrization_check(
        model, nn.functional.cross_entropy, batches,
        ["adaptive_sharpness", "lambda_max", "path_norm", "param_norm", "loss"], alpha=10.0,
        options=MeasureOptions(sharpness_steps=5, k=1),
    )
    by_key = {c.key: c for c in changes}
    assert drift < 1e-12
    for key in ("adaptive_sharpness", "path_norm", "loss"):
        assert by_key[key].invariant(1e-8), (key, by_key[key])
    for key in ("lambda_max", "param_norm"):
        assert by_key[key].relative > 0.5, (key, by_key[key])


def test_magnitude_aware_bound_centres_prior_and_posterior_alike_and_is_never_negative() -> None:
    from flatness.measures.pac_bayes import _bound

    # by hand: a = w − w⁰ in the prior's ‖a‖²/ω and in the posterior's σ'²a_i²
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    w0 = torch.tensor([0.4, -1.2, 1.0], dtype=torch.float64)
    a, s, eps, m = w - w0, 0.3, 1e-3, 100
    by_hand = sum(0.25 * math.log((eps**2 + (s**2 + 1) * float(a.pow(2).sum()) / 3) / (eps**2 + s**2 * float(ai) ** 2))
                  for ai in a) + math.log(m / s) + 10
    assert _bound(a, s, m, True, eps) == pytest.approx(by_hand, rel=1e-12)
    # models near their initialisation made the earlier mixed form negative (−54,051 at worst)
    gen = torch.Generator().manual_seed(0)
    for scale_init, scale_w in ((1e-4, 1.0), (1.0, 1.0), (1e-2, 10.0), (0.0, 1e-6)):
        w = scale_w * torch.randn(500, dtype=torch.float64, generator=gen)
        w0 = w + scale_init * torch.randn(500, dtype=torch.float64, generator=gen)
        for sigma in (1e-3, 0.1, 1.0, 30.0):
            for a in (w, w - w0):
                log_part = _bound(a, sigma, m, True, eps) - (math.log(m / sigma) + 10)
                assert log_part >= 0.0, (scale_init, scale_w, sigma)
                assert _bound(a, sigma, m, True, eps) > 0 and _bound(a, sigma, m, False, eps) > 0
    w = torch.randn(500, dtype=torch.float64, generator=gen)
    w0 = w + 1e-2 * torch.randn(500, dtype=torch.float64, generator=gen)  # a model near its start
    mixed_prior = eps**2 + (0.1**2 + 1) * float((w - w0).pow(2).sum()) / 500  # the old, inconsistent form
    assert float(0.25 * torch.log(mixed_prior / (eps**2 + 0.1**2 * w.pow(2))).sum()) < -100  # what it gave
    assert _bound(w - w0, 0.1, m, True, eps) > math.log(m / 0.1) + 10  # what it gives now
