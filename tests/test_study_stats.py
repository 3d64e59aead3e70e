"""Jiang et al.'s Kendall τ (τ_a) and granulated coefficient Ψ of a study, by hand and against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flatness.experiments.reporting.stats import granulated_kendall, kendall_tau, mean_granulated


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
    assert mean_granulated(psi) == pytest.approx(2 / 3)


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
    assert math.isnan(single["x"].value) and math.isnan(mean_granulated(single))
