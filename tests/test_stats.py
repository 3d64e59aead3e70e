"""experiments.stats against scipy references and hand-computed values; degenerate cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from flatness.experiments.reporting.stats import (
    Comparison,
    adjust_holm,
    compare_samples,
    holm,
    kendall_tau_ci,
    mean_std,
    minimum_detectable_effect,
    pair_by_seed,
)

A = [0.912, 0.934, 0.921, 0.945, 0.918]
B = [0.905, 0.921, 0.925, 0.931, 0.902]


def _seeded(values, start=0):
    return {start + i: v for i, v in enumerate(values)}


def test_paired_matches_scipy_ttest_rel_and_wilcoxon():
    c = compare_samples(_seeded(A), _seeded(B))
    ref = sps.ttest_rel(A, B)
    assert c.test == "paired t" and c.paired and c.n_pairs == 5 and c.left_out == 0 and c.df == 4
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-9)
    assert c.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert c.p_wilcoxon == pytest.approx(sps.wilcoxon(np.subtract(A, B)).pvalue)
    d = np.subtract(A, B)
    assert c.difference == pytest.approx(d.mean())
    assert c.effect_name == "d_z" and c.effect == pytest.approx(d.mean() / d.std(ddof=1))
    assert c.effect_ci[0] < c.effect < c.effect_ci[1]
    assert c.mean_a == pytest.approx(np.mean(A)) and c.mean_b == pytest.approx(np.mean(B))
    assert c.note == "" and math.isnan(c.p_t_holm)


def test_pairing_uses_only_common_seeds_and_counts_the_rest():
    a = {0: 0.9, 1: 0.91, 2: 0.93, 3: 0.95, 9: float("nan")}
    b = {1: 0.90, 2: 0.90, 3: 0.94, 4: 0.5}
    assert pair_by_seed(a, b) == ([1, 2, 3], [0.91, 0.93, 0.95], [0.90, 0.90, 0.94])
    c = compare_samples(a, b)
    assert c.n_pairs == 3 and c.n_a == 4 and c.n_b == 4 and c.left_out == 2
    assert c.p_t == pytest.approx(sps.ttest_rel([0.91, 0.93, 0.95], [0.90, 0.90, 0.94]).pvalue)
    one = compare_samples({0: 0.9, 1: 0.8}, {1: 0.7, 2: 0.6})
    assert one.n_pairs == 1 and math.isnan(one.p_t) and "fewer than 2 pairs" in one.note
    assert math.isnan(one.mde) and math.isnan(one.ci[0])


def test_welch_matches_scipy_and_hedges_g_by_hand():
    c = compare_samples(_seeded(A), _seeded(B[:3], start=10), paired=False)
    ref = sps.ttest_ind(A, B[:3], equal_var=False)
    assert c.test == "Welch t" and not c.paired and c.n_pairs == 0 and (c.n_a, c.n_b) == (5, 3)
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-9) and c.df == pytest.approx(ref.df)
    assert c.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert math.isnan(c.p_wilcoxon)
    sp = math.sqrt((4 * np.var(A, ddof=1) + 2 * np.var(B[:3], ddof=1)) / 6)
    j = math.gamma(3) / (math.sqrt(3) * math.gamma(2.5))  # J(ν) for ν = 6
    assert c.effect_name == "g" and c.effect == pytest.approx(j * (np.mean(A) - np.mean(B[:3])) / sp)
    assert c.effect_ci[0] < c.effect < c.effect_ci[1]


def test_effect_interval_matches_the_large_sample_normal_approximation():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, 400)
    c = compare_samples(_seeded(list(d)), _seeded([0.0] * 400))
    dz = d.mean() / d.std(ddof=1)
    half = 1.96 * math.sqrt(1 / 400 + dz**2 / (2 * 400))
    assert c.effect_ci == pytest.approx((dz - half, dz + half), abs=0.01)


def test_holm_hand_computed():
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4·0.01, 3·0.02, 2·0.03, 1·0.04 -> running max
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # step-down keeps the order
    assert holm([0.9, 0.01, 0.6]) == pytest.approx([1.0, 0.03, 1.0])  # capped at 1
    out = holm([float("nan"), 0.02, 0.03])
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.04, 0.04])  # nan not counted
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def test_adjust_holm_fills_both_families():
    cs = [compare_samples(_seeded(A), _seeded(B)), compare_samples(_seeded(B), _seeded(A[::-1]))]
    adjusted = adjust_holm(cs)
    assert [c.p_t_holm for c in adjusted] == pytest.approx(holm([c.p_t for c in cs]))
    assert [c.p_wilcoxon_holm for c in adjusted] == pytest.approx(holm([c.p_wilcoxon for c in cs]))
    assert all(isinstance(c, Comparison) and math.isnan(c.p_t_holm) for c in cs)  # originals untouched


def _strict(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division or precision warnings either
        return fn(*args, **kw)


@pytest.mark.parametrize(
    "a, b, paired, note",
    [
        ([0.9, 0.9, 0.9], [0.9, 0.9, 0.9], True, "identical values on every pair"),
        # float noise: 0.95 - 0.93 != 0.96 - 0.94 in binary, but the difference is constant
        ([0.95, 0.96, 0.97], [0.93, 0.94, 0.95], True, "every pair differs by 0.02 (zero variance)"),
        ([0.9, 0.9], [0.9, 0.9], False, "identical constant values"),
        ([0.9, 0.9], [0.8, 0.8], False, "both sides constant, differing by 0.1 (zero variance)"),
        ([0.9], [0.8, 0.7], False, "fewer than 2 runs on a side"),
    ],
)
def test_degenerate_comparisons_give_a_note_never_p_zero(a, b, paired, note):
    c = _strict(compare_samples, _seeded(a), _seeded(b), paired=paired)
    assert c.note == note
    assert math.isnan(c.p_t) and math.isnan(c.p_wilcoxon) and math.isnan(c.mde) and math.isnan(c.effect)
    adjusted = _strict(adjust_holm, [c])[0]
    assert math.isnan(adjusted.p_t_holm)


def test_one_constant_side_is_still_a_welch_test():
    c = _strict(compare_samples, _seeded([0.9, 0.9, 0.9]), _seeded([0.8, 0.82, 0.85]), paired=False)
    b = [0.8, 0.82, 0.85]
    ref = sps.ttest_ind_from_stats(0.9, 0.0, 3, np.mean(b), np.std(b, ddof=1), 3, equal_var=False)
    assert c.p_t == pytest.approx(ref.pvalue)


def test_minimum_detectable_effect_has_the_stated_power():
    # power of the paired t-test at δ = MDE, by simulation: 0.8
    n, sd = 5, 0.02
    mde = minimum_detectable_effect(sd / math.sqrt(n), n - 1)
    rng = np.random.default_rng(1)
    d = rng.normal(mde, sd, size=(20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.8, abs=0.015)
    # large-sample limit: (z_0.975 + z_0.8) · SE
    assert minimum_detectable_effect(2.0, 1e7) == pytest.approx(2.0 * (1.959964 + 0.841621), rel=1e-4)
    assert math.isnan(minimum_detectable_effect(0.0, 3)) and math.isnan(minimum_detectable_effect(1.0, 0))
    c = compare_samples(_seeded(A), _seeded(B))
    assert c.mde == pytest.approx(minimum_detectable_effect(c.se, 4))


def test_mean_std():
    assert mean_std([1.0, None, 3.0, float("inf")]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    m, s, n = mean_std([])
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_kendall_tau_ci_matches_scipy_and_is_reproducible():
    rng = np.random.default_rng(2)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    tau, low, high = kendall_tau_ci(x, y, n_boot=300, seed=3)
    assert tau == pytest.approx(sps.kendalltau(x, y).statistic)
    assert low < tau < high and -1 <= low and high <= 1
    assert kendall_tau_ci(x, y, n_boot=300, seed=3) == (tau, low, high)
    assert kendall_tau_ci(x, y, n_boot=300, seed=4) != (tau, low, high)
    t2, l2, h2 = kendall_tau_ci([1.0, 2.0], [2.0, 1.0])
    assert t2 == pytest.approx(-1.0) and math.isnan(l2) and math.isnan(h2)
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau_ci([1.0, 2.0, 3.0], [1.0, 2.0])


def test_sign_flip_test_equals_a_plain_enumeration() -> None:
    import itertools

    from flatness.experiments.reporting.stats import sign_flip_test

    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8, 10, 13):
        d = rng.normal(0.3, 1.0, size=n)
        observed = abs(d.sum())
        count = sum(abs(np.dot(s, d)) >= observed - 1e-12 for s in itertools.product((-1, 1), repeat=n))
        assert sign_flip_test(d) == pytest.approx(count / 2**n), n
    assert sign_flip_test(np.ones(10)) == pytest.approx(2 / 2**10)  # the smallest p at 10 pairs
    assert math.isnan(sign_flip_test([1.0])) and math.isnan(sign_flip_test(np.ones(21)))


def test_paired_comparison_carries_the_permutation_p_and_its_holm() -> None:
    from flatness.experiments.reporting.stats import adjust_holm, compare_samples, sign_flip_test

    a = {s: 0.5 + 0.01 * s for s in range(10)}
    b = {s: 0.49 + 0.011 * s + (0.002 if s % 3 else -0.001) for s in range(10)}
    c = compare_samples(a, b)
    d = [a[s] - b[s] for s in range(10)]
    assert c.p_perm == pytest.approx(sign_flip_test(d))
    (adjusted, other) = adjust_holm([c, compare_samples(b, a)])
    assert adjusted.p_perm_holm == pytest.approx(min(1.0, 2 * c.p_perm))
