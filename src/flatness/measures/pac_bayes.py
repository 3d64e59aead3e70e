r"""PAC-Bayes flatness measures and bounds (Jiang et al., 2019).

The largest Gaussian weight noise under which the expected training error rises by at most a set
deviation d.

.. math::

    \sigma^\star = \max\,\{\sigma :\;
        \mathbb{E}_{\xi \sim \mathcal{N}(0, I)}\, e(\theta + s(\sigma) \odot \xi) - e(\theta) \le d\},

with e the 0-1 training error (``criterion="error"``, d = 0.1 as in Jiang et al.) or the loss
(``criterion="loss"``, d in loss units), and the noise scale per parameter s_i = σ (isotropic:
``pacbayes.sharpness``, measure 1/σ²) or s_i = √(σ²θ_i² + ε²) (magnitude-aware:
``pacbayes.mag.flatness``, measure 1/σ'², ε = 10⁻³). The expectation is the Monte-Carlo mean
of :func:`flatness.measures.noisy_loss` over ``samples`` draws; with an integer ``seed`` every σ
sees the same draws ξ (common random numbers), so the estimated deviation is a smooth function
of σ and the search is a plain bisection: σ is doubled from ``upper`` until the deviation
exceeds d, then the bracket is halved ``steps`` times (early stop once the deviation is within
``tolerance``·d below d). The returned σ* always satisfies the estimated deviation ≤ d.

From σ* the bounds (Jiang et al.'s ``pacbayes.orig``/``init`` and ``pacbayes.mag.orig``/``init``,
before their √(·/m) normalisation, which keeps the order of models of one data set), over the
ω perturbed parameters w with initial values w⁰ and m training examples:

.. math::

    \text{orig} = \frac{\lVert w\rVert^2}{4\sigma^2} + \ln\frac{m}{\sigma} + 10, \qquad
    \text{init} = \frac{\lVert w - w^0\rVert^2}{4\sigma^2} + \ln\frac{m}{\sigma} + 10,

    \text{mag.orig} = \frac14 \sum_{i=1}^{\omega}
        \ln\frac{\varepsilon^2 + (\sigma'^2 + 1)\lVert a\rVert^2/\omega}{\varepsilon^2 + \sigma'^2 a_i^2}
        + \ln\frac{m}{\sigma'} + 10, \qquad a = w,

and mag.init the same with a = w − w⁰ in *both* places (Jiang et al.'s eq. for
``pacbayes.mag.init``): the prior is centred where the posterior's scale is measured from, so
prior and posterior describe one parametrisation. The log term is the KL divergence's
log-variance part and is never negative: by Jensen,
:math:`\frac1\omega\sum_i \ln(\varepsilon^2+\sigma'^2 a_i^2) \le \ln(\varepsilon^2+\sigma'^2\lVert a\rVert^2/\omega)
< \ln(\varepsilon^2+(\sigma'^2+1)\lVert a\rVert^2/\omega)`, so every bound exceeds
:math:`\ln(m/\sigma) + 10 > 0` (σ < m·e¹⁰, far beyond the search's reach for m ≥ 100). (An
earlier version put ‖w − w⁰‖² in the numerator but w_i² in the denominator: a prior and a
posterior about different points, negative for models near their initialisation.) The model
runs in eval mode; its weights are never written to.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import pac_bayes
    >>> model = nn.Linear(2, 2, bias=False, dtype=torch.float64)
    >>> with torch.no_grad():  # a perfect classifier of the sign of x_0
    ...     _ = model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    >>> x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> data = [(x, (x[:, 0] > 0).long())]
    >>> r = pac_bayes(model, nn.functional.cross_entropy, data, deviation=0.1, samples=4)
    >>> r.deviation_at_sigma <= 0.1 < r.deviation_above, r.flatness == 1 / r.sigma**2
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..utils import FlatnessError, batch_size, eval_mode
from .functional import (
    LossFn,
    accepts_model_loss,
    collect_batches,
    evaluate_at,
    require_finite,
    select_params,
)
from .margin import zero_one_error
from .noise import noisy_loss

__all__ = ["PacBayes", "Criterion", "pac_bayes"]

Criterion = Literal["error", "loss"]
MAX_DOUBLINGS = 20


@dataclass(frozen=True)
class PacBayes:
    """σ* of the search, the flatness 1/σ*², the bounds, and how they were found."""

    sigma: float
    deviation: float
    deviation_at_sigma: float
    deviation_above: float  # at the upper end of the final bracket (> deviation)
    criterion: str
    magnitude_aware: bool
    floor: float
    samples: int
    evaluations: int
    num_examples: int
    num_params: int
    bound_orig: float
    bound_init: float | None

    @property
    def flatness(self) -> float:
        """Jiang et al.'s ``pacbayes.sharpness`` / ``pacbayes.mag.flatness`` measure 1/σ*²."""
        return 1.0 / self.sigma**2


def _bound(a: Tensor, sigma: float, m: int, mag: bool, floor: float) -> float:
    """The bound about the reference point of ``a`` (``w`` for orig, ``w − w⁰`` for init)."""
    sq_dist = float(a.pow(2).sum())
    if not mag:
        return sq_dist / (4 * sigma**2) + math.log(m / sigma) + 10
    prior = floor**2 + (sigma**2 + 1) * sq_dist / a.numel()
    posterior = floor**2 + sigma**2 * a.pow(2)
    return float(0.25 * torch.log(prior / posterior).sum()) + math.log(m / sigma) + 10


def _check_arguments(deviation: float, criterion: str, steps: int, upper: float, tolerance: float) -> None:
    if not (math.isfinite(deviation) and deviation > 0):
        raise ValueError(f"deviation must be a finite number > 0, got {deviation!r}")
    if criterion not in ("error", "loss"):
        raise ValueError(f"criterion must be 'error' or 'loss', got {criterion!r}")
    if steps < 1 or not (math.isfinite(upper) and upper > 0) or not 0 <= tolerance < 1:
        raise ValueError("need steps >= 1, upper > 0 and 0 <= tolerance < 1")


def _largest_sigma(
    rise: Callable[[float], float], deviation: float, upper: float, steps: int, tolerance: float, criterion: str
) -> tuple[float, float, float, float]:
    """``(lo, rise(lo), hi, rise(hi))`` bracketing the σ where ``rise`` crosses ``deviation``.

    ``upper`` is doubled while the rise stays below it, then bisected ``steps`` times (or until the
    rise at ``lo`` is within ``tolerance`` of it).
    """
    lo, lo_rise, hi = 0.0, 0.0, upper
    hi_rise = rise(hi)
    doublings = 0
    while hi_rise <= deviation:
        if doublings == MAX_DOUBLINGS:
            raise FlatnessError(f"the {criterion} rises by at most {deviation} even at σ = {hi:.3g}")
        lo, lo_rise, hi = hi, hi_rise, 2 * hi
        hi_rise = rise(hi)
        doublings += 1
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        value = rise(mid)
        if value <= deviation:
            lo, lo_rise = mid, value
            if value >= (1 - tolerance) * deviation and tolerance > 0:
                break
        else:
            hi, hi_rise = mid, value
    if lo == 0.0:
        raise FlatnessError(
            f"the {criterion} rises by more than {deviation} already at σ = {hi:.3g}; "
            "use a larger deviation"
        )
    return lo, lo_rise, hi, hi_rise


def _initial_weights(initial: nn.Module | Mapping[str, Tensor], names: list[str]) -> Tensor:
    state = initial.state_dict() if isinstance(initial, nn.Module) else initial
    missing = [n for n in names if n not in state]
    if missing:
        raise FlatnessError(f"the initial weights have no parameter {missing[0]!r}")
    return torch.cat([state[n].detach().double().reshape(-1).cpu() for n in names])


@accepts_model_loss
def pac_bayes(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    deviation: float = 0.1,
    *,
    magnitude_aware: bool = False,
    floor: float = 1e-3,
    criterion: Criterion = "error",
    initial: nn.Module | Mapping[str, Tensor] | None = None,
    samples: int = 10,
    steps: int = 15,
    upper: float = 2.0,
    tolerance: float = 0.1,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> PacBayes:
    """Largest noise σ* with E e(θ + noise) − e(θ) ≤ ``deviation``, and the PAC-Bayes bounds.

    Args:
        model: the network.
        loss_fn: its batch-mean loss (used with ``criterion="loss"``).
        batches: the training data.
        deviation: d > 0, the allowed rise of the expected error (or loss).
        magnitude_aware: noise of standard deviation √(σ²θ_i² + floor²) instead of σ.
        floor: the floor of the magnitude-aware standard deviation.
        criterion: ``"error"`` (0-1 error, Jiang et al.) or ``"loss"`` (``loss_fn``).
        initial: the initial weights (module or state dict): adds the ``init`` bound.
        samples: Monte-Carlo draws per σ (>= 2).
        steps: bisection halvings.
        upper: first upper end of the bracket (doubled while the deviation stays ≤ d).
        tolerance: stop once the deviation is in [(1 − tolerance)·d, d] (0: all ``steps``).
        seed: seed of the noise draws (the same draws at every σ).
        params: perturb only these.

    Raises:
        FlatnessError: the loss is not finite at θ, or no σ above upper/2^steps keeps the
            deviation ≤ d.
    """
    _check_arguments(deviation, criterion, steps, upper, tolerance)
    data = collect_batches(batches)
    named = select_params(model, params)
    chosen = [p for _, p in named]
    crit = zero_one_error if criterion == "error" else loss_fn
    with eval_mode(model):
        theta = {n: p.detach() for n, p in named}
        base = require_finite(evaluate_at(model, crit, data, theta)[0], f"the {criterion}")
    evaluations = 0

    def rise(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        try:
            r = noisy_loss(model, crit, data, sigma, samples, relative=magnitude_aware,
                           floor=floor if magnitude_aware else 0.0, seed=seed, params=chosen)
        except FlatnessError:  # a non-finite loss under noise: far too much noise
            return math.inf
        return r.mean - base

    lo, lo_rise, hi, hi_rise = _largest_sigma(rise, deviation, float(upper), steps, tolerance, criterion)
    w = torch.cat([p.detach().double().reshape(-1).cpu() for p in chosen])
    m = sum(batch_size(b.x) for b in data)
    bound_init = None
    if initial is not None:
        w0 = _initial_weights(initial, [n for n, _ in named])
        bound_init = _bound(w - w0, lo, m, magnitude_aware, floor)
    return PacBayes(
        sigma=lo,
        deviation=float(deviation),
        deviation_at_sigma=lo_rise,
        deviation_above=hi_rise,
        criterion=criterion,
        magnitude_aware=magnitude_aware,
        floor=float(floor) if magnitude_aware else 0.0,
        samples=samples,
        evaluations=evaluations,
        num_examples=m,
        num_params=int(w.numel()),
        bound_orig=_bound(w, lo, m, magnitude_aware, floor),
        bound_init=bound_init,
    )
