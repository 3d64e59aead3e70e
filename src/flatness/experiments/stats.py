r"""The statistics of the pipeline's tables, in one module.

Rank statistics of a population of models (``flatness study``): Jiang et al.'s (2019) Kendall
coefficient between a measure μ and a target g (generalisation gap, test accuracy) over the
models S,

.. math::

    \tau = \frac{1}{|S|(|S| - 1)} \sum_{i \ne j} \operatorname{sign}(\mu_i - \mu_j)\,
        \operatorname{sign}(g_i - g_j),

where a tie in either variable contributes 0 (Kendall's τ-a: it equals ``scipy.stats.kendalltau``'s
τ-b when nothing ties, and stays comparable across the small cells of the granulated
coefficient, where ties are common); bootstrap percentile intervals resampling the models
(``scipy.stats.bootstrap``); and the granulated coefficient of one hyper-parameter axis i,

.. math::

    \psi_i = \frac{1}{m_i} \sum_{\theta_{-i}} \tau\big(\{(\mu(\theta), g(\theta)) :
        \theta_i \in \Theta_i\}\big),

the mean over the m_i settings θ₋ᵢ of the other axes of τ over the models that differ in axis i
only; cells with fewer than two models are left out. Its interval resamples the cells. Ψ is the
mean of ψ_i over the axes.

Example:
    >>> from flatness.experiments.stats import granulated_kendall, kendall_tau
    >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])  # 5 concordant pairs, 1 discordant, of 6
    0.6666666666666666
    >>> settings = [{"lr": lr, "wd": wd} for lr in (1, 2) for wd in (0, 1)]
    >>> psi = granulated_kendall([1, 2, 3, 4], [1, 2, 4, 3], settings, ["lr", "wd"])
    >>> psi["lr"].value, psi["wd"].value  # lr: both cells agree; wd: one cell each way
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "kendall_tau",
    "RankCorrelation",
    "kendall_with_interval",
    "AxisCoefficient",
    "granulated_kendall",
    "mean_granulated",
]


# --------------------------------------------------------------------------------------------
# Rank statistics of a population of models (flatness study): Kendall τ with bootstrap
# intervals, Jiang et al.'s granulated coefficient Ψ


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Jiang et al.'s τ (τ-a: ties count 0) over the pairs of ``x`` and ``y``; NaN for < 2 items."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return math.nan
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return float(s.sum() / (n * (n - 1)))


@dataclass(frozen=True)
class RankCorrelation:
    """τ over ``n`` models with its bootstrap percentile interval (NaN when undefined)."""

    tau: float
    low: float
    high: float
    n: int
    confidence: float


def kendall_with_interval(
    x: Sequence[float],
    y: Sequence[float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RankCorrelation:
    """:func:`kendall_tau` and its bootstrap percentile interval, resampling models (pairs).

    Non-finite pairs are dropped first. A resample in which τ is undefined does not occur with
    τ-a (ties count 0), so every resample counts.
    """
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    tau = kendall_tau(a, b)
    if a.size < 3 or not math.isfinite(tau) or np.all(a == a[0]) or np.all(b == b[0]):
        return RankCorrelation(tau, math.nan, math.nan, int(a.size), confidence)
    result = stats.bootstrap(
        (a, b), kendall_tau, paired=True, vectorized=False, n_resamples=resamples,
        confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return RankCorrelation(tau, float(ci.low), float(ci.high), int(a.size), confidence)


@dataclass(frozen=True)
class AxisCoefficient:
    """ψ of one axis: the mean τ over its cells, the cells' τ, and an interval over cells."""

    axis: str
    value: float
    low: float
    high: float
    cells: tuple[float, ...] = field(default=())

    @property
    def num_cells(self) -> int:
        return len(self.cells)


def granulated_kendall(
    measure: Sequence[float],
    target: Sequence[float],
    settings: Sequence[Mapping[str, Any]],
    axes: Sequence[str],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, AxisCoefficient]:
    """ψ_i per axis in ``axes``: the models are grouped by their ``settings`` on the other axes.

    ``settings[k]`` holds model k's value on every axis (hashable values). Models whose measure
    or target is not finite are left out. An axis with no cell of two or more models gets NaN.
    The interval is a percentile bootstrap over the axis' cells (resampled with replacement).
    """
    if not (len(measure) == len(target) == len(settings)):
        raise ValueError("measure, target and settings must have one entry per model")
    rng = np.random.default_rng(seed)
    mu = np.asarray(measure, dtype=float)
    g = np.asarray(target, dtype=float)
    finite = [k for k in range(len(mu)) if math.isfinite(mu[k]) and math.isfinite(g[k])]
    out: dict[str, AxisCoefficient] = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k in finite:
            groups.setdefault(tuple(settings[k][a] for a in others), []).append(k)
        cells = [
            kendall_tau(mu[idx], g[idx])
            for idx in groups.values()
            if len({settings[k][axis] for k in idx}) >= 2
        ]
        if not cells:
            out[axis] = AxisCoefficient(axis, math.nan, math.nan, math.nan)
            continue
        arr = np.asarray(cells)
        if arr.size >= 2:
            means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
            tail = (1 - confidence) / 2
            low, high = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
        else:
            low = high = math.nan
        out[axis] = AxisCoefficient(axis, float(arr.mean()), low, high, tuple(float(c) for c in cells))
    return out


def mean_granulated(coefficients: Mapping[str, AxisCoefficient]) -> float:
    """Ψ: the mean of ψ_i over the axes where it is defined (NaN if none is)."""
    values = [c.value for c in coefficients.values() if math.isfinite(c.value)]
    return float(np.mean(values)) if values else math.nan
