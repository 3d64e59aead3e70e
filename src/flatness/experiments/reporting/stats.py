r"""Statistics of the pipeline's tables: tests over seeds, Holm adjustment, effects, power.

One module for ``flatness report``, ``flatness compare`` and ``flatness study``.

**Pairing.** Runs with the same seed share their initial weights and data order, so two
settings trained on the same seeds are *paired*: :func:`compare_samples` takes each side as a
``{seed: value}`` mapping and, with ``paired=True``, pairs the seeds present on both sides (the
others are counted in :attr:`Comparison.left_out`). It then runs the paired t-test
(``scipy.stats.ttest_rel``) and the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on the
differences :math:`d_i = a_i - b_i`. With ``paired=False`` it runs Welch's t-test
(``scipy.stats.ttest_ind(equal_var=False)``) on all values.

**Effects.** The mean difference with its 95 % t-interval (paired: the interval of the mean of
the differences, :math:`\bar d \pm t_{0.975,\,n-1}\, s_d/\sqrt n`; Welch:
:math:`\bar a - \bar b \pm t_{0.975,\,\nu}\,\sqrt{s_a^2/n_a + s_b^2/n_b}` with Welch's ν). The
standardised effect is Cohen's :math:`d_z = \bar d / s_d` (paired) or Hedges'
:math:`g = J\,(\bar a - \bar b)/s_\text{pooled}` (unpaired); its interval inverts the noncentral
t distribution of the t statistic (Steiger & Fouladi 1997).

**Minimum detectable effect (MDE).** The smallest true mean difference that the same test
detects with power :math:`1-\beta` (0.8) at two-sided level α (0.05), given the observed
standard error :math:`\mathrm{SE}` (paired: :math:`s_d/\sqrt n`) and degrees of freedom ν:

.. math::

    \mathrm{MDE} = \lambda^\ast \cdot \mathrm{SE}, \qquad
    1 - F_{\nu,\lambda^\ast}(t_{1-\alpha/2,\,\nu}) + F_{\nu,\lambda^\ast}(-t_{1-\alpha/2,\,\nu})
    = 1 - \beta,

where :math:`F_{\nu,\lambda}` is the CDF of the noncentral t distribution
(``scipy.stats.nct``). For large ν, :math:`\lambda^\ast \to z_{1-\alpha/2} + z_{1-\beta} = 2.80`;
at 3 pairs (ν = 2) it is 5.65 (see :func:`minimum_detectable_effect`).

**Multiple comparisons.** :func:`holm` is the Holm–Bonferroni step-down adjustment over the
comparisons of one table; :func:`adjust_holm` applies it to the t and Wilcoxon p-values.

**Rank statistics.** :func:`kendall_tau_ci` is Kendall's τ_b of two paired lists with a
bootstrap interval resampling the pairs (used where pairs are independent, e.g. the K-FAC
agreement over final models). The study's rank statistics (τ_a, conditional τ, ψ, Ψ, crossed
bootstrap over seeds and settings) are in :mod:`.rank_stats`.

**Degenerate cases.** No p-value is made up: fewer than 2 pairs (runs per side), identical
values, or zero variance (every pair differs by the same amount; both sides constant) give
``nan`` with a :attr:`Comparison.note` saying why, and never a division warning.

Example:
    >>> from flatness.experiments.reporting.stats import adjust_holm, compare_samples
    >>> base = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.93}
    >>> fa = {0: 0.92, 1: 0.93, 2: 0.94, 3: 0.94}
    >>> c = compare_samples(fa, base)
    >>> c.test, c.n_pairs, round(c.difference, 4), round(c.p_t, 4)
    ('paired t', 4, 0.0175, 0.0354)
    >>> [round(x, 4) for x in c.ci]
    [0.0023, 0.0327]
    >>> same = compare_samples({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    >>> same.p_t, same.note
    (nan, 'identical values on every pair')
    >>> [round(x.p_t_holm, 4) for x in adjust_holm([c, same])]
    [0.0354, nan]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as sps

__all__ = [
    "ALPHA",
    "POWER",
    "CONFIDENCE",
    "Comparison",
    "mean_std",
    "pair_by_seed",
    "compare_samples",
    "holm",
    "adjust_holm",
    "minimum_detectable_effect",
    "sign_flip_test",
    "kendall_tau_ci",
]

ALPHA = 0.05  # two-sided significance level of the MDE
POWER = 0.8  # power of the MDE
CONFIDENCE = 0.95  # level of every interval
_REL_TOL = 1e-12  # differences below this share of the values' scale are float noise


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``nan`` below 2 values) and count of the finite values.

    ``None`` and non-finite entries are skipped.

    >>> mean_std([1.0, 2.0, None, float("nan"), 3.0])
    (2.0, 1.0, 3)
    >>> mean_std([5.0])
    (5.0, nan, 1)
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    mean = math.fsum(xs) / len(xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return mean, std, len(xs)


def pair_by_seed(
    a: Mapping[int, float | None], b: Mapping[int, float | None]
) -> tuple[list[int], list[float], list[float]]:
    """The seeds with a finite value on both sides, and the two value lists in seed order.

    >>> pair_by_seed({0: 1.0, 1: 2.0, 2: 3.0}, {2: 0.5, 0: 0.0, 5: 9.0})
    ([0, 2], [1.0, 3.0], [0.0, 0.5])
    """

    def ok(v: float | None) -> bool:
        return v is not None and math.isfinite(float(v))

    seeds = sorted(s for s in a if s in b and ok(a[s]) and ok(b[s]))
    return seeds, [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Comparison:
    """Side ``a`` against side ``b`` (differences are a − b); ``nan`` where undefined.

    ``p_t``: paired t (``test == "paired t"``) or Welch's t p-value; ``p_wilcoxon``: the
    Wilcoxon signed-rank p-value, ``p_perm``: the exact sign-flip permutation p-value of the
    mean difference (:func:`sign_flip_test`; both paired only). ``*_holm``: Holm-adjusted over the family given
    to :func:`adjust_holm` (``nan`` until then). ``ci`` and ``effect_ci``: 95 % intervals.
    ``mde``: the minimum detectable mean difference (module docstring). ``note``: why a test
    is missing, else ``""``.
    """

    test: str
    n_a: int
    n_b: int
    n_pairs: int
    left_out: int
    mean_a: float
    mean_b: float
    difference: float
    ci: tuple[float, float]
    se: float
    df: float
    p_t: float
    p_wilcoxon: float
    effect: float
    effect_name: str
    effect_ci: tuple[float, float]
    mde: float
    note: str = ""
    p_t_holm: float = math.nan
    p_wilcoxon_holm: float = math.nan
    p_perm: float = math.nan
    p_perm_holm: float = math.nan

    @property
    def paired(self) -> bool:
        """Whether the runs were paired by seed (paired t-test; otherwise Welch's)."""
        return self.test == "paired t"


_NAN2 = (math.nan, math.nan)


def _noise_free(d: np.ndarray, scale: float) -> np.ndarray:
    """``d`` with float noise removed: |d| ≤ tol → 0, the rest to 10 significant digits.

    Accuracies are multiples of 1/n_test, so differences such as 0.95 − 0.93 and 0.96 − 0.94 are
    equal in truth but not in floating point; without this a constant difference would look
    like a tiny variance (a huge t) and Wilcoxon would rank float noise.
    """
    tol = _REL_TOL * max(scale, np.finfo(float).tiny)
    out = np.where(np.abs(d) <= tol, 0.0, d)
    return np.array([float(f"{x:.10g}") for x in out])


def _t_interval(mean: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
    return mean - half, mean + half


def _solve_increasing(f: Callable[[float], float], target: float, start: float) -> float:
    """The x with f(x) = target for an increasing f, by bracket expansion then Brent (else nan)."""
    lo, hi, step = start - 1.0, start + 1.0, 1.0
    try:
        for _ in range(60):
            if f(lo) > target:
                lo, step = lo - step, step * 2
            elif f(hi) < target:
                hi, step = hi + step, step * 2
            else:
                return float(optimize.brentq(lambda x: f(x) - target, lo, hi, xtol=1e-10))
    except ValueError:  # f undefined somewhere on the way
        pass
    return math.nan


def _nct_sf(x: float, df: float, lam: float) -> float:
    """P(T ≥ x) for T noncentral t.

    scipy's ``sf`` and ``cdf`` each return nan at some far-tail points (scipy 1.17), where the other
    one is still defined.
    """
    value = float(sps.nct.sf(x, df, lam))
    if math.isnan(value):
        value = 1.0 - float(sps.nct.cdf(x, df, lam))
    if math.isnan(value):
        raise ValueError(f"noncentral t undefined at x={x}, df={df}, nc={lam}")
    return value


def _noncentrality_interval(t: float, df: float, confidence: float) -> tuple[float, float]:
    """The λ range whose noncentral t puts ``t`` inside its central ``confidence`` quantiles."""
    if not (math.isfinite(t) and abs(t) < 1e3):  # beyond ~1e3 scipy's nct loses accuracy
        return _NAN2

    def upper_tail(lam: float) -> float:  # P(T ≥ t | λ): increasing in λ
        return _nct_sf(t, df, lam)

    tail = (1 - confidence) / 2
    return _solve_increasing(upper_tail, tail, t), _solve_increasing(upper_tail, 1 - tail, t)


def minimum_detectable_effect(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The mean difference a two-sided t-test (level ``alpha``, ``df``) detects with ``power``.

    ``se`` is the standard error of the mean difference (paired: SD of differences / √n).
    Formula in the module docstring; ``nan`` if ``se`` or ``df`` is not positive and finite.

    >>> round(minimum_detectable_effect(1.0, 2), 2), round(minimum_detectable_effect(1.0, 1e6), 2)
    (5.65, 2.8)
    """
    if not (math.isfinite(se) and se > 0 and math.isfinite(df) and df > 0):
        return math.nan
    crit = float(sps.t.ppf(1 - alpha / 2, df))

    def rejection(lam: float) -> float:  # P(|T| ≥ crit | λ)
        return _nct_sf(crit, df, lam) + 1.0 - _nct_sf(-crit, df, lam)

    return _solve_increasing(rejection, power, crit) * se


MAX_EXACT_PAIRS = 20  # 2**20 sign patterns, enumerated in blocks


def sign_flip_test(differences: Sequence[float] | np.ndarray) -> float:
    r"""The exact two-sided sign-flip (paired permutation) p-value of the mean difference.

    Under the null hypothesis each paired difference :math:`d_i` is symmetric about 0, so all
    :math:`2^n` sign patterns :math:`s \in \{\pm 1\}^n` are equally likely; the p-value is the
    share of them with :math:`|\sum_i s_i d_i| \ge |\sum_i d_i|` (ties within float noise
    count). It makes no normality assumption; its smallest value is :math:`2/2^n` (0.0625 at 5
    pairs, 0.002 at 10). NaN below 2 or above :data:`MAX_EXACT_PAIRS` differences.

    >>> sign_flip_test([1.0, 2.0, 3.0])  # only all-plus and all-minus reach |sum| = 6
    0.25
    >>> round(sign_flip_test([0.5, 1.0, -0.2, 0.8, 0.3]), 4)
    0.125
    """
    d = np.asarray(differences, dtype=float)
    n = d.size
    if n < 2 or n > MAX_EXACT_PAIRS or not np.all(np.isfinite(d)):
        return math.nan
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(float(np.abs(d).sum()), np.finfo(float).tiny)
    head = min(n, 12)  # patterns of the first `head` signs as one matrix, the rest looped
    bits = (np.arange(2**head)[:, None] >> np.arange(head)[None, :]) & 1
    partial = (1 - 2 * bits) @ d[:head]
    hits = 0
    for rest in range(2 ** (n - head)):
        signs = 1 - 2 * ((rest >> np.arange(n - head)) & 1)
        hits += int(np.count_nonzero(np.abs(partial + float(signs @ d[head:])) >= observed - tol))
    return hits / 2**n


def _hedges_j(df: float) -> float:
    return math.exp(math.lgamma(df / 2) - math.log(math.sqrt(df / 2)) - math.lgamma((df - 1) / 2))


def compare_samples(
    a: Mapping[int, float | None],
    b: Mapping[int, float | None],
    *,
    paired: bool = True,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Compare ``a`` with ``b`` (``{seed: value}``): paired over common seeds, or Welch.

    Non-finite and ``None`` values are skipped. See the module docstring for the tests, the
    intervals and the degenerate cases.

    >>> c = compare_samples({0: 0.95, 1: 0.96}, {0: 0.93, 1: 0.94})
    >>> c.p_t, c.note
    (nan, 'every pair differs by 0.02 (zero variance)')
    >>> w = compare_samples({0: 1.0, 1: 2.0, 2: 3.0}, {7: 1.0, 8: 1.5}, paired=False)
    >>> w.test, w.n_pairs, round(w.p_t, 4)
    ('Welch t', 0, 0.3295)
    """
    if paired:
        seeds, xs, ys = pair_by_seed(a, b)
        n_a = sum(1 for v in a.values() if v is not None and math.isfinite(float(v)))
        n_b = sum(1 for v in b.values() if v is not None and math.isfinite(float(v)))
        return _paired(np.array(xs), np.array(ys), n_a, n_b, n_a + n_b - 2 * len(seeds), confidence)
    xa = np.array([float(v) for v in a.values() if v is not None and math.isfinite(float(v))])
    xb = np.array([float(v) for v in b.values() if v is not None and math.isfinite(float(v))])
    return _welch(xa, xb, confidence)


def _empty(test: str, n_a: int, n_b: int, n_pairs: int, left_out: int, mean_a: float, mean_b: float,
           note: str, difference: float = math.nan) -> Comparison:
    name = "d_z" if test == "paired t" else "g"
    return Comparison(test, n_a, n_b, n_pairs, left_out, mean_a, mean_b, difference, _NAN2, math.nan,
                      math.nan, math.nan, math.nan, math.nan, name, _NAN2, math.nan, note)


def _paired(x: np.ndarray, y: np.ndarray, n_a: int, n_b: int, left_out: int, confidence: float) -> Comparison:
    n = len(x)
    mean_a = float(x.mean()) if n else math.nan
    mean_b = float(y.mean()) if n else math.nan
    if n < 2:
        return _empty("paired t", n_a, n_b, n, left_out, mean_a, mean_b,
                      f"{n} seed{'s' if n != 1 else ''} on both sides (fewer than 2 pairs)")
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    d = _noise_free(x - y, scale)
    mean = float(d.mean())
    if np.all(d == d[0]):
        note = "identical values on every pair" if d[0] == 0 else f"every pair differs by {d[0]:.4g} (zero variance)"
        return _empty("paired t", n_a, n_b, n, left_out, mean_a, mean_b, note, difference=mean)
    sd = float(d.std(ddof=1))
    se, df = sd / math.sqrt(n), n - 1.0
    t = mean / se
    p_t = float(2 * sps.t.sf(abs(t), df))  # = scipy.stats.ttest_rel(x, y).pvalue, on noise-free d
    p_w = float(sps.wilcoxon(d).pvalue)
    lam = _noncentrality_interval(t, df, confidence)
    return Comparison(
        "paired t", n_a, n_b, n, left_out, mean_a, mean_b, mean, _t_interval(mean, se, df, confidence), se, df,
        p_t, p_w, mean / sd, "d_z", (lam[0] / math.sqrt(n), lam[1] / math.sqrt(n)), minimum_detectable_effect(se, df),
        p_perm=sign_flip_test(d),
    )


def _welch(xa: np.ndarray, xb: np.ndarray, confidence: float) -> Comparison:
    na, nb = len(xa), len(xb)
    mean_a = float(xa.mean()) if na else math.nan
    mean_b = float(xb.mean()) if nb else math.nan
    if na < 2 or nb < 2:
        return _empty("Welch t", na, nb, 0, 0, mean_a, mean_b, "fewer than 2 runs on a side")
    scale = float(max(np.abs(xa).max(), np.abs(xb).max()))
    va, vb = (float(v) for v in (_noise_free(xa - xa.mean(), scale).var(ddof=1),
                                 _noise_free(xb - xb.mean(), scale).var(ddof=1)))
    diff = float(_noise_free(np.array([mean_a - mean_b]), scale)[0])
    if va == 0 and vb == 0:
        note = ("identical constant values" if diff == 0
                else f"both sides constant, differing by {diff:.4g} (zero variance)")
        return _empty("Welch t", na, nb, 0, 0, mean_a, mean_b, note, difference=diff)
    se = math.sqrt(va / na + vb / nb)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    p_t = float(2 * sps.t.sf(abs(diff / se), df))  # = scipy.stats.ttest_ind(equal_var=False)
    # Hedges' g: pooled SD, small-sample factor J, interval from the pooled t's noncentrality
    df_pooled = na + nb - 2.0
    sd_pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / df_pooled)
    root = math.sqrt(1 / na + 1 / nb)
    j = _hedges_j(df_pooled)
    g = j * diff / sd_pooled
    lam = _noncentrality_interval(diff / sd_pooled / root, df_pooled, confidence)
    return Comparison(
        "Welch t", na, nb, 0, 0, mean_a, mean_b, diff, _t_interval(diff, se, df, confidence), se, df, p_t,
        math.nan, g, "g", (j * lam[0] * root, j * lam[1] * root), minimum_detectable_effect(se, df),
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    r"""Holm–Bonferroni adjusted p-values; ``nan`` entries stay ``nan`` and are not counted.

    With the m finite p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`, the adjusted
    value is :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1)\, p_{(j)})`.

    >>> holm([0.01, 0.04, 0.03, float("nan")])
    [0.03, 0.06, 0.06, nan]
    """
    p = [float(x) for x in pvalues]
    if any(math.isfinite(x) and not 0 <= x <= 1 for x in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    finite = sorted((i for i, x in enumerate(p) if math.isfinite(x)), key=lambda i: p[i])
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p[i]))
        out[i] = running
    return out


def adjust_holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Copies of ``comparisons`` with ``p_t_holm``, ``p_perm_holm`` and ``p_wilcoxon_holm``.

    Over this family (each kind of test its own family).
    """
    t = holm([c.p_t for c in comparisons])
    w = holm([c.p_wilcoxon for c in comparisons])
    perm = holm([c.p_perm for c in comparisons])
    return [dataclasses.replace(c, p_t_holm=pt, p_wilcoxon_holm=pw, p_perm_holm=pp)
            for c, pt, pw, pp in zip(comparisons, t, w, perm, strict=True)]


# --------------------------------------------------------------------------------------------
# Rank statistics (for `flatness study`: how well a measure ranks a population of models)


def kendall_tau_ci(
    x: Sequence[float],
    y: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """Kendall's τ_b of ``x`` and ``y`` and its percentile-bootstrap ``confidence`` interval.

    Pairs (x_i, y_i) are resampled with replacement ``n_boot`` times from the generator
    :func:`flatness.probes.make_generator` gives for ``seed``; resamples where τ is undefined
    (one side constant) are skipped. ``(τ, nan, nan)`` below 3 pairs.

    >>> tau, low, high = kendall_tau_ci([1, 2, 3, 4, 5, 6], [1, 3, 2, 4, 6, 5], n_boot=200)
    >>> round(tau, 3), low <= tau <= high
    (0.733, True)
    """
    import torch

    from ...probes import make_generator

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d of equal length, got shapes {xs.shape} and {ys.shape}")
    n = len(xs)
    tau = float(sps.kendalltau(xs, ys).statistic) if n >= 2 else math.nan
    if n < 3:
        return tau, math.nan, math.nan
    gen = make_generator(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen).numpy()
    boots = []
    for row in idx:
        bx, by = xs[row], ys[row]
        if np.ptp(bx) > 0 and np.ptp(by) > 0:
            boots.append(float(sps.kendalltau(bx, by).statistic))
    if len(boots) < 2:
        return tau, math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return tau, float(low), float(high)
