r"""Expected loss under Gaussian weight noise (local-entropy style), Monte Carlo with a CI.

.. math::

    \mathbb{E}_{\xi \sim \mathcal{N}(0, \sigma^2 I)}\, L(\theta + c \odot \xi)
    \approx \frac{1}{n}\sum_{s=1}^{n} L(\theta + c \odot \xi_s),

with c = 1, or c = ``|θ|`` (``relative=True``: noise proportional to each weight). With a
``floor`` ε > 0 each entry's standard deviation is √(σ²c² + ε²) instead of σc (Jiang et al.'s
magnitude-aware noise, ``relative=True``: variance σ²θ_i² + ε²). A flat minimum
keeps this close to L(θ); the increase over L(θ) is reported as well. The confidence interval is
Student's t over the n samples (``scipy.stats.t``). Weights are perturbed functionally
(``torch.func.functional_call``); the model is never written to.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import noisy_loss
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    >>> r = noisy_loss(model, nn.functional.cross_entropy, data, sigma=0.01, samples=8)
    >>> r.ci_low <= r.mean <= r.ci_high
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from ..probes import make_generator
from ..utils import FlatnessError, eval_mode
from .functional import (
    LossFn,
    accepts_model_loss,
    collect_batches,
    evaluate_at,
    require_finite,
    select_params,
)

__all__ = ["NoisyLoss", "noisy_loss"]


@dataclass(frozen=True)
class NoisyLoss:
    """Monte-Carlo mean of L(θ + noise), its standard error and confidence interval."""

    mean: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    base_loss: float
    sigma: float
    relative: bool
    samples: int

    @property
    def increase(self) -> float:
        """E L(θ + noise) − L(θ)."""
        return self.mean - self.base_loss


@accepts_model_loss
def noisy_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    sigma: float = 0.01,
    samples: int = 20,
    *,
    relative: bool = False,
    floor: float = 0.0,
    confidence: float = 0.95,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> NoisyLoss:
    """E L(θ + σ·c·ξ), ξ ~ N(0, I), over ``batches``, from ``samples`` draws.

    ``floor`` ε >= 0: noise of standard deviation √(σ²c² + ε²) per entry (ε = 0: σc exactly).

    A draw whose loss is not finite is an error (the expectation would be infinite).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a confidence interval, got {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = collect_batches(batches)
    named = select_params(model, params)
    theta = {n: p.detach() for n, p in named}
    gen = make_generator(seed)
    values = []
    with eval_mode(model):
        base = require_finite(evaluate_at(model, loss_fn, data, theta)[0], "the loss")
        for _ in range(samples):
            perturbed = {}
            for n, t in theta.items():
                xi = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                scale = sigma * (t.abs() if relative else torch.ones_like(t))
                if floor > 0:
                    scale = torch.sqrt(scale**2 + floor**2)
                perturbed[n] = t + scale * xi
            values.append(evaluate_at(model, loss_fn, data, perturbed)[0])
    arr = np.asarray(values)
    if not np.all(np.isfinite(arr)):
        raise FlatnessError(
            f"the loss is not finite at {int((~np.isfinite(arr)).sum())} of {samples} noisy "
            f"weights (sigma={sigma}); use a smaller sigma"
        )
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(samples))
    if stderr > 0:
        low, high = stats.t.interval(confidence, samples - 1, loc=mean, scale=stderr)
    else:
        low = high = mean
    return NoisyLoss(mean, stderr, float(low), float(high), confidence, base, sigma, relative, samples)
