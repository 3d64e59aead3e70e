r"""Rank statistics of a study (``flatness study``).

Kendall's τ, its conditional form, Jiang et al.'s granulated coefficient, and bootstrap intervals
for a crossed design with seed replicates.

**One τ throughout: Kendall's τ_a** (Jiang et al. 2019's definition), the mean over the pairs of
distinct models of the product of the signs of their differences,

.. math::

    \tau(\mu, g) = \frac{1}{n(n-1)} \sum_{i \ne j} \operatorname{sign}(\mu_i-\mu_j)\operatorname{sign}(g_i-g_j),

so a tie on either side counts 0 (a two-model cell with tied gaps counts 0 rather than being
undefined). It equals τ_b when nothing ties. The population τ, the τ within a cell of ψ and the
three τ of the conditional τ are all this τ_a.

**Conditional τ given a covariate ℓ** (the training loss: does the measure say anything about
the gap beyond how well a model fits?) is Kendall's (1942) partial τ,

.. math::

    \tau_{\mu g \cdot \ell} = \frac{\tau_{\mu g} - \tau_{\mu \ell}\,\tau_{g \ell}}
        {\sqrt{(1-\tau_{\mu \ell}^2)(1-\tau_{g \ell}^2)}},

undefined (NaN) when μ or g is a function of ℓ's ranks (:math:`|\tau_{\cdot\ell}| = 1`).

**Granulated ψ_i** of a hyper-parameter axis i: the mean τ over the *cells* of axis i, a cell
being the models that share every other hyper-parameter and the seed (they differ in axis i
only); **Ψ** is the mean of ψ_i over the hyper-parameter axes (seed is a replicate, not an axis).

**Intervals: the crossed (two-way) bootstrap** (McCullagh 2000; Owen 2007). In a crossed design
models are indexed by a hyper-parameter setting c and a seed s, and models sharing a seed share
their initialisation and data order: they are not independent draws. A resample draws the
settings with replacement and, independently, the seeds with replacement; model (c, s) then has
weight :math:`w_{cs} = n_c\,n_s` (its two multiplicities). The population τ of a resample is the
weighted τ_a over pairs of *distinct* models,
:math:`\sum_{i \ne j} w_i w_j S_{ij} / \sum_{i \ne j} w_i w_j` with
:math:`S_{ij} = \operatorname{sign}(\Delta\mu)\operatorname{sign}(\Delta g)` (a model drawn twice
is not a pair with itself, which would count as a tie); a cell's resample draws the other
axes' settings and the seeds the same way. Intervals are percentile intervals. With few seeds
the seed draw is coarse (two seeds: half the resamples hold one seed twice); that is the
uncertainty the design has.

Example:
    >>> settings = [{"lr": lr, "wd": wd} for lr in (1, 2) for wd in (0, 1) for _ in (0, 1)]
    >>> seeds = [0, 1] * 4
    >>> mu, gap = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 4, 3, 5, 6, 8, 7]
    >>> round(kendall_tau(mu, gap), 4)
    0.8571
    >>> c = crossed_tau(mu, gap, settings, seeds, ["lr", "wd"], resamples=200)
    >>> round(c.value, 4), c.low <= c.value <= c.high
    (0.8571, True)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .stats import CONFIDENCE

__all__ = [
    "kendall_tau",
    "partial_tau",
    "Interval",
    "crossed_tau",
    "crossed_partial_tau",
    "AxisCoefficient",
    "granulated_kendall",
    "mean_granulated",
]


def _signs(x: np.ndarray) -> np.ndarray:
    return np.sign(x[:, None] - x[None, :])


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's τ_a (ties count 0) over the pairs of ``x`` and ``y``; NaN for < 2 items.

    >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])  # 5 concordant pairs, 1 discordant, of 6
    0.6666666666666666
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return math.nan
    return float((_signs(a) * _signs(b)).sum() / (n * (n - 1)))


def partial_tau(tau_xy: float, tau_xz: float, tau_yz: float) -> float:
    """Kendall's partial τ of x and y given z from the three τ (NaN where undefined).

    >>> round(partial_tau(0.5, 0.5, 0.5), 4), partial_tau(0.5, 1.0, 0.5)
    (0.3333, nan)
    """
    denominator = (1 - tau_xz**2) * (1 - tau_yz**2)
    if not (math.isfinite(denominator) and denominator > 1e-12):
        return math.nan
    return float((tau_xy - tau_xz * tau_yz) / math.sqrt(denominator))


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval (NaN bounds where it cannot be resampled)."""

    value: float
    low: float = math.nan
    high: float = math.nan


def _weighted_tau(s: np.ndarray, w: np.ndarray) -> float:
    """τ_a over pairs of distinct models, each pair weighted by the product of their weights."""
    total = w.sum() ** 2 - (w**2).sum()
    return float(w @ s @ w / total) if total > 0 else math.nan


def _crossed_weights(
    rows: Sequence[Hashable], cols: Sequence[Hashable], resamples: int, seed: int, row_stream: int = 1
) -> np.ndarray:
    """``(resamples, n)`` weights.

    The distinct row keys (settings) and column keys (seeds) drawn with replacement, each model
    weighted by its row's and its column's multiplicity.

    The seeds are drawn from the generator of ``seed``, the settings from that of
    ``seed + row_stream``: statistics resampled with one ``seed`` share their seed draws.
    """
    import torch

    from ...probes import make_generator

    row_keys, row_idx = np.unique(np.asarray([repr(r) for r in rows]), return_inverse=True)
    col_keys, col_idx = np.unique(np.asarray([repr(c) for c in cols]), return_inverse=True)
    draw_cols = torch.randint(0, len(col_keys), (resamples, len(col_keys)), generator=make_generator(seed)).numpy()
    draw_rows = torch.randint(0, len(row_keys), (resamples, len(row_keys)),
                              generator=make_generator(seed + row_stream)).numpy()
    n_rows = np.stack([np.bincount(d, minlength=len(row_keys)) for d in draw_rows])
    n_cols = np.stack([np.bincount(d, minlength=len(col_keys)) for d in draw_cols])
    return (n_rows[:, row_idx] * n_cols[:, col_idx]).astype(float)


def _percentile(values: Sequence[float], confidence: float) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def _setting_keys(settings: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> list[tuple[Any, ...]]:
    return [tuple(s[a] for a in axes) for s in settings]


def crossed_tau(
    measure: Sequence[float],
    target: Sequence[float],
    settings: Sequence[Mapping[str, Any]],
    seeds: Sequence[Hashable],
    axes: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """The population τ_a of ``measure`` and ``target`` with the crossed bootstrap interval.

    ``settings[k]`` holds model k's value on each of the hyper-parameter ``axes``; ``seeds[k]``
    its seed. Models with a non-finite value are left out.
    """
    mu, g = np.asarray(measure, dtype=float), np.asarray(target, dtype=float)
    keep = np.isfinite(mu) & np.isfinite(g)
    if keep.sum() < 3:
        return Interval(kendall_tau(mu[keep], g[keep]) if keep.sum() >= 2 else math.nan)
    mu, g = mu[keep], g[keep]
    keys = [k for k, ok in zip(_setting_keys(settings, axes), keep, strict=True) if ok]
    reps = [s for s, ok in zip(seeds, keep, strict=True) if ok]
    s = _signs(mu) * _signs(g)
    value = _weighted_tau(s, np.ones(mu.size))
    boots = [_weighted_tau(s, w) for w in _crossed_weights(keys, reps, resamples, seed)]
    return Interval(value, *_percentile(boots, confidence))


def crossed_partial_tau(
    measure: Sequence[float],
    target: Sequence[float],
    covariate: Sequence[float],
    settings: Sequence[Mapping[str, Any]],
    seeds: Sequence[Hashable],
    axes: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Kendall's partial τ of ``measure`` and ``target`` given ``covariate``.

    Crossed bootstrap interval (every resample recomputes the three τ_a on the same weights).
    """
    mu, g, z = (np.asarray(v, dtype=float) for v in (measure, target, covariate))
    keep = np.isfinite(mu) & np.isfinite(g) & np.isfinite(z)
    if keep.sum() < 3:
        return Interval(math.nan)
    mu, g, z = mu[keep], g[keep], z[keep]
    keys = [k for k, ok in zip(_setting_keys(settings, axes), keep, strict=True) if ok]
    reps = [s for s, ok in zip(seeds, keep, strict=True) if ok]
    sm, sg, sz = _signs(mu), _signs(g), _signs(z)
    pairs = (sm * sg, sm * sz, sg * sz)

    def partial(w: np.ndarray) -> float:
        return partial_tau(*(_weighted_tau(p, w) for p in pairs))

    value = partial(np.ones(mu.size))
    boots = [partial(w) for w in _crossed_weights(keys, reps, resamples, seed)]
    return Interval(value, *_percentile(boots, confidence))


@dataclass(frozen=True)
class AxisCoefficient:
    """ψ of one axis: the mean τ over its cells, the cells' τ, and a bootstrap interval."""

    axis: str
    value: float
    low: float
    high: float
    cells: tuple[float, ...] = field(default=())
    resampled: tuple[float, ...] = field(default=(), repr=False)  # ψ of each bootstrap resample

    @property
    def num_cells(self) -> int:
        """How many cells the axis's ψ averages over."""
        return len(self.cells)


def granulated_kendall(
    measure: Sequence[float],
    target: Sequence[float],
    settings: Sequence[Mapping[str, Any]],
    axes: Sequence[str],
    *,
    seeds: Sequence[Hashable] | None = None,
    resamples: int = 1000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, AxisCoefficient]:
    """ψ_i per hyper-parameter axis in ``axes`` (module docstring).

    ``settings[k]`` holds model k's value on every axis (hashable values); ``seeds[k]`` its seed
    (``None``: one replicate). A cell of axis i is the models equal on the other axes and the
    seed with two or more values of axis i. Models whose measure or target is not finite are
    left out; an axis without a cell gets NaN. The interval is the crossed bootstrap over the
    other axes' settings and the seeds (with one seed: over the cells).

    >>> settings = [{"lr": lr, "wd": wd} for lr in (1, 2) for wd in (0, 1)]
    >>> psi = granulated_kendall([1, 2, 3, 4], [1, 2, 4, 3], settings, ["lr", "wd"])
    >>> psi["lr"].value, psi["wd"].value  # lr: both cells agree; wd: one cell each way
    (1.0, 0.0)
    """
    if not (len(measure) == len(target) == len(settings)):
        raise ValueError("measure, target and settings must have one entry per model")
    reps: list[Hashable] = [0] * len(settings) if seeds is None else list(seeds)
    if len(reps) != len(settings):
        raise ValueError("seeds must have one entry per model")
    mu = np.asarray(measure, dtype=float)
    g = np.asarray(target, dtype=float)
    finite = [k for k in range(len(mu)) if math.isfinite(mu[k]) and math.isfinite(g[k])]
    out: dict[str, AxisCoefficient] = {}
    for i, axis in enumerate(axes):
        others = [a for a in axes if a != axis]
        groups: dict[tuple[Any, Hashable], list[int]] = {}
        for k in finite:
            groups.setdefault((tuple(settings[k][a] for a in others), reps[k]), []).append(k)
        cells = [(key, kendall_tau(mu[idx], g[idx])) for key, idx in groups.items()
                 if len({settings[k][axis] for k in idx}) >= 2]
        if not cells:
            out[axis] = AxisCoefficient(axis, math.nan, math.nan, math.nan)
            continue
        taus = np.asarray([t for _, t in cells])
        low = high = math.nan
        means: list[float] = []
        if taus.size >= 2:
            weights = _crossed_weights([k[0] for k, _ in cells], [k[1] for k, _ in cells], resamples, seed,
                                       row_stream=1 + i)
            means = [float(w @ taus / w.sum()) if w.sum() > 0 else math.nan for w in weights]
            low, high = _percentile(means, confidence)
        out[axis] = AxisCoefficient(axis, float(taus.mean()), low, high, tuple(float(t) for t in taus),
                                    tuple(means))
    return out


def mean_granulated(coefficients: Mapping[str, AxisCoefficient], confidence: float = CONFIDENCE) -> Interval:
    """Ψ: the mean of ψ_i over the axes where it is defined (NaN if none is).

    With the interval of the resamples' means (the axes' resamples share their seed draws).
    """
    defined = [c for c in coefficients.values() if math.isfinite(c.value)]
    if not defined:
        return Interval(math.nan)
    value = float(np.mean([c.value for c in defined]))
    if not all(c.resampled for c in defined) or len({len(c.resampled) for c in defined}) != 1:
        return Interval(value)
    table = np.asarray([c.resampled for c in defined])
    counts = np.isfinite(table).sum(axis=0)
    sums = np.where(np.isfinite(table), table, 0.0).sum(axis=0)
    boots = [float(t / n) if n else math.nan for t, n in zip(sums, counts, strict=True)]
    return Interval(value, *_percentile(boots, confidence))
