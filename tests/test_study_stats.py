"""Jiang et al.'s Kendall τ (τ_a) and granulated coefficient Ψ of a study, by hand and against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flatness.experiments.reporting.rank_stats import granulated_kendall, kendall_tau, mean_granulated


def test_kendall_tau_by_hand_with_ties() -> None:
    # pairs of (x, y) = (1,1) (2,3) (2,2) (3,2): signs of (Δx, Δy) over the 6 pairs
    # (1,2): +,+ → +1; (1,3): +,+ → +1; (1,4): +,+ → +1; (2,3): 0 → 0; (2,4): +,− → −1;
    # (3,4): +,0 → 0. Sum 2 over 6 pairs.
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(2 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0  # a constant measure predicts nothing
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])


def test_kendall_tau_equals_scipy_without_ties() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_granulated_coefficient_by_hand() -> None:
    # 2 x 2 x 2 factorial over axes a, b, c; model k has measure mu[k] and gap g[k]
    settings = [{"a": a, "b": b, "c": c} for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    mu = [1, 2, 3, 4, 5, 6, 7, 8]
    g = [1, 2, 4, 3, 5, 6, 8, 7]
    psi = granulated_kendall(mu, g, settings, ["a", "b", "c"], resamples=200)
    # axis a: cells (b, c) pair models k and k+4: mu and g both rise by 4 in every cell → +1
    assert psi["a"].value == 1.0 and psi["a"].num_cells == 4
    # axis b: pairs (0,2) (1,3) (4,6) (5,7): g rises 1→4, 2→3, 5→8, 6→7 → all +1
    assert psi["b"].value == 1.0
    # axis c: pairs (0,1) +1, (2,3) −1, (4,5) +1, (6,7) −1 → mean 0
    assert psi["c"].cells == (1.0, -1.0, 1.0, -1.0) and psi["c"].value == 0.0
    assert psi["c"].low < 0 < psi["c"].high  # the cells disagree: the interval spans 0
    assert psi["a"].low == psi["a"].high == 1.0
    again = granulated_kendall(mu, g, settings, ["a", "b", "c"], resamples=200)
    assert (again["c"].low, again["c"].high) == (psi["c"].low, psi["c"].high)  # seeded
    assert mean_granulated(psi).value == pytest.approx(2 / 3)


def test_granulated_coefficient_with_three_levels_and_missing_models() -> None:
    settings = [{"lr": lr, "wd": wd} for lr in (1, 2, 3) for wd in (0, 1)]
    mu = [1.0, 2.0, 3.0, 4.0, 5.0, math.nan]  # the (lr=3, wd=1) model has no measure
    g = [1.0, 1.0, 2.0, 3.0, 3.0, 0.0]
    psi = granulated_kendall(mu, g, settings, ["lr", "wd"], resamples=100)
    # lr at wd=0: mu 1,3,5 vs g 1,2,3 → +1; at wd=1: models (2,4) only: mu 2,4 vs g 1,3 → +1
    assert psi["lr"].cells == (1.0, 1.0)
    # wd at lr=1: mu 1,2 vs g 1,1 → tie, 0; at lr=2: mu 3,4 vs g 2,3 → +1; lr=3 has one model
    assert psi["wd"].cells == (0.0, 1.0) and psi["wd"].value == 0.5
    single = granulated_kendall([1, 2], [1, 2], [{"x": 0, "y": 0}, {"x": 1, "y": 1}], ["x", "y"])
    assert math.isnan(single["x"].value) and math.isnan(mean_granulated(single).value)


def _tau_a_pairs(mu, g, pairs):
    return sum(np.sign(mu[i] - mu[j]) * np.sign(g[i] - g[j]) for i, j in pairs) / len(pairs)


def test_crossed_bootstrap_weights_pairs_of_distinct_models_and_resamples_seeds_and_settings() -> None:
    from flatness.experiments.reporting import rank_stats

    settings = [{"lr": lr} for lr in (1, 2, 3) for _ in (0, 1)]
    seeds = [0, 1] * 3
    w = rank_stats._crossed_weights([(s["lr"],) for s in settings], seeds, 500, 0)
    # each resample draws 3 settings and 2 seeds: the weights factor into the two multiplicities
    per_setting = w.reshape(500, 3, 2)
    assert np.all(per_setting.sum(axis=(1, 2)) == 6)
    for row in per_setting:
        setting_counts, seed_counts = row.sum(axis=1), row.sum(axis=0)
        assert np.allclose(np.outer(setting_counts, seed_counts) / 6, row)
    # a resample that holds seed 0 twice has no pair across seeds: its τ is over seed-0 models only
    mu = np.array([1.0, 5.0, 2.0, 4.0, 3.0, 6.0])
    g = np.array([1.0, 2.0, 2.5, 1.5, 4.0, 0.5])
    s = np.sign(mu[:, None] - mu[None, :]) * np.sign(g[:, None] - g[None, :])
    only_seed0 = np.array([2.0, 0.0, 2.0, 0.0, 2.0, 0.0])
    assert rank_stats._weighted_tau(s, only_seed0) == pytest.approx(_tau_a_pairs(mu, g, [(0, 2), (0, 4), (2, 4)]))
    assert rank_stats._weighted_tau(s, np.ones(6)) == pytest.approx(kendall_tau(mu, g))


def test_population_and_conditional_tau_with_intervals() -> None:
    from flatness.experiments.reporting.rank_stats import crossed_partial_tau, crossed_tau, partial_tau

    rng = np.random.default_rng(0)
    settings = [{"lr": lr, "wd": wd} for lr in range(4) for wd in range(3) for _ in range(2)]
    seeds = [0, 1] * 12
    loss = rng.normal(size=24)
    gap = -loss + 0.1 * rng.normal(size=24)
    fit_only = -2 * loss + 0.5 * rng.normal(size=24)  # a measure that only tracks the loss
    c = crossed_tau(fit_only, gap, settings, seeds, ["lr", "wd"], resamples=300)
    assert c.value > 0.6 and c.low <= c.value <= c.high
    p = crossed_partial_tau(fit_only, gap, loss, settings, seeds, ["lr", "wd"], resamples=300)
    assert p.value < c.value / 2 and p.low < 0 < p.high  # nothing detectable beyond the loss
    t_xy, t_xz, t_yz = kendall_tau(fit_only, gap), kendall_tau(fit_only, loss), kendall_tau(gap, loss)
    assert p.value == pytest.approx(partial_tau(t_xy, t_xz, t_yz))
    assert math.isnan(partial_tau(0.2, 1.0, 0.3)) and partial_tau(0.5, 0.0, 0.0) == 0.5


def test_granulated_cells_are_per_seed_and_psi_has_an_interval() -> None:
    settings = [{"a": a, "b": b} for a in (0, 1) for b in (0, 1) for _ in (0, 1)]
    seeds = [0, 1] * 4
    mu = [1, 2, 3, 4, 5, 6, 7, 8]
    g = [1, 2, 3, 4, 8, 7, 6, 5]
    psi = granulated_kendall(mu, g, settings, ["a", "b"], seeds=seeds, resamples=300)
    # axis a: cells (b, seed): models (k, k+4): g rises in every one → +1, four cells
    assert psi["a"].cells == (1.0, 1.0, 1.0, 1.0)
    # axis b: cells (a, seed): a=0 cells rise (+1, +1), a=1 cells fall (−1, −1)
    assert sorted(psi["b"].cells) == [-1.0, -1.0, 1.0, 1.0] and psi["b"].value == 0.0
    assert psi["b"].low < 0 < psi["b"].high and len(psi["b"].resampled) == 300
    big_psi = mean_granulated(psi)
    assert big_psi.value == 0.5 and big_psi.low <= 0.5 <= big_psi.high
