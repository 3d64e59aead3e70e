r"""Local entropy (Chaudhari et al., 2017, "Entropy-SGD"), estimated by Langevin sampling.

Chaudhari et al. define the local entropy of a loss f at weights w with scope γ > 0 (their eq. 3)

.. math::

    F(w; \gamma) = \log \int \exp\!\big(-f(w') - \tfrac{\gamma}{2}\lVert w - w'\rVert^2\big)\, dw',

the log-volume of low-loss weights near w. Entropy-SGD *maximises* F (it descends −F, the
local free energy); ∇_w F = −γ (w − ⟨w'⟩), with ⟨·⟩ the mean under the local Gibbs measure
P(w') ∝ exp(−f(w') − γ/2‖w − w'‖²), which their inner loop estimates by SGLD. That loop (their
Algorithm 1 and code) adds the "thermal noise" ε: the step
``w' ← w' − η(∇f(w') + γ(w' − w)) + √(2η) ε ξ`` samples ∝ exp(−(f + γ/2‖w − w'‖²)/ε²), i.e. the
same construction at temperature ε². This module reports, in loss units and without the
w-independent Gaussian constant (so models of different sizes are comparable),

.. math::

    \operatorname{LE}(w) = \varepsilon^2 \Big[F_\varepsilon(w;\gamma)
        - \tfrac{n}{2}\log\tfrac{2\pi\varepsilon^2}{\gamma}\Big]
      = \varepsilon^2 \log \mathbb{E}_{w' \sim \mathcal N(w,\, \varepsilon^2/\gamma\, I)}\,
        e^{-f(w')/\varepsilon^2},
    \qquad F_\varepsilon = \log\!\int e^{-(f(w') + \frac{\gamma}{2}\lVert w - w'\rVert^2)/\varepsilon^2} dw'

(at ε = 1: the paper's F minus (n/2) log(2π/γ)). Larger is flatter; −E_{N(w, ε²/γ)} f ≤ LE ≤
−min f. On a quadratic f = c + ½ (w' − m)ᵀ A (w' − m) with eigenvalues a_i,

.. math::

    \operatorname{LE}(w) = -c - \tfrac12 (w - m)^\top \gamma A (A + \gamma I)^{-1} (w - m)
        - \tfrac{\varepsilon^2}{2} \sum_i \log\!\big(1 + a_i/\gamma\big),

a Moreau envelope (the ε → 0 limit) plus a log-determinant of the curvature relative to γ
(:func:`quadratic_local_entropy`).

**Estimator** (thermodynamic integration over the Entropy-SGD measures). With
P_λ ∝ exp(−(λ f(w') + γ/2‖w − w'‖²)/ε²) (λ = 1: Entropy-SGD's Gibbs measure, λ = 0: the
Gaussian N(w, ε²/γ I)), d/dλ log E_{N} e^{−λ f/ε²} = −⟨f⟩_λ/ε², so

.. math:: \operatorname{LE}(w) = -\int_0^1 \langle f \rangle_\lambda \, d\lambda
    \approx -\sum_k \omega_k\, 3 s_k^2 \,\overline{f}_{\lambda_k}, \qquad \lambda_k = s_k^3,

with Gauss–Legendre nodes s_k in [0, 1] (λ = s³ puts nodes near λ = 0, where ⟨f⟩_λ changes
fastest for curvatures above γ). Each f̄_λ is the mean of f over a Langevin chain targeting P_λ
(``steps`` steps, the first ``burn_in`` dropped): Entropy-SGD's inner step above, with λ∇f taken
on all of the measured data (so the injected noise is the only noise). The chains run in order
of increasing λ, each starting where the previous one ended, the first from an exact draw of
N(w, ε²/γ I). The standard error is that of batch means: the b-th quarter of every chain
gives one estimate of LE, and the four are treated as independent (a rough figure, 3 degrees
of freedom, too small when the chains mix slowly). It ignores two biases: the quadrature's
(with 6 nodes, on a quadratic: below 1 % of the log-determinant term for a_i/γ ≤ 100, up to
5 % of the Moreau term of a direction with a_i/γ = 100 far from its minimum) and the
unadjusted step's (on a quadratic of curvature k = λa + γ the chain's variance is
ε²/(k(1 − ηk/2)); the default η = 0.05/γ keeps it 2.5 % in the flat directions; the chain is
stable while ηk < 2).
Weights are perturbed through ``torch.func.functional_call``: the model is never written to.

Example (a quadratic f(w) = ½ Σ a_i w_i², the model a linear map with rows √a_i):
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import local_entropy, quadratic_local_entropy
    >>> a = torch.linspace(0.1, 2.0, 100, dtype=torch.float64)
    >>> model = nn.Linear(100, 1, bias=False, dtype=torch.float64)
    >>> data = [(torch.diag(a.sqrt()), torch.zeros(100))]
    >>> half_sq = lambda out, y: 0.5 * out.pow(2).sum()
    >>> r = local_entropy(model, half_sq, data, gamma=1.0, noise=0.1, steps=200, burn_in=40, seed=0)
    >>> exact = quadratic_local_entropy(a, model.weight.detach()[0], gamma=1.0, noise=0.1)
    >>> abs(r.value - exact) < 0.05 * abs(exact)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..probes import make_generator
from ..utils import FlatnessError, eval_mode
from .functional import LossFn, collect_batches, evaluate_at, loss_at, require_finite, select_params

__all__ = ["LocalEntropy", "local_entropy", "quadratic_local_entropy", "BLOCKS"]

BLOCKS = 4  # block means per chain for the standard error
DIVERGED = 100.0  # a chain whose loss rises by this × (1 + |f(w)|) above f(w) has diverged


@dataclass(frozen=True)
class LocalEntropy:
    """LE(w) (loss units, larger = flatter), its Monte-Carlo standard error, and its parts.

    ``loss`` is f(w); ``sharpness`` = −LE − f(w) ≥ −(f(w) − min f), the increase of the smoothed
    loss over the loss (larger = sharper, like the other measures). ``lambdas`` and
    ``node_means`` are the quadrature nodes λ_k and the chains' mean losses f̄_{λ_k}.
    """

    value: float
    stderr: float
    loss: float
    gamma: float
    noise: float
    step_size: float
    steps: int
    burn_in: int
    lambdas: tuple[float, ...]
    node_means: tuple[float, ...]

    @property
    def sharpness(self) -> float:
        """The smoothed loss's rise above the loss, −LE − f(w) (larger = sharper)."""
        return -self.value - self.loss


def quadratic_local_entropy(
    eigenvalues: Tensor, offset: Tensor, *, gamma: float, noise: float, constant: float = 0.0
) -> float:
    """The closed form of LE(w) for f(w') = c + ½ Σ_i a_i (w' − m)_i².

    ``offset`` = w − m in the eigenbasis (see the module docs): −c − ½ Σ γ a_i d_i²/(a_i + γ) − ε²/2
    Σ log(1 + a_i/γ).
    """
    a, d = eigenvalues.double(), offset.double()
    moreau = 0.5 * float((gamma * a / (a + gamma) * d.pow(2)).sum())
    return -constant - moreau - 0.5 * noise**2 * float(torch.log1p(a / gamma).sum())


def _nodes(count: int) -> tuple[np.ndarray, np.ndarray]:
    """λ_k = s_k³ and the weights ω_k·3 s_k² of Gauss–Legendre in s on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(count)
    s, w = (x + 1) / 2, w / 2
    return s**3, w * 3 * s**2


def _step_size(gamma: float, noise: float, steps: int, burn_in: int, step_size: float | None, nodes: int) -> float:
    """The Langevin step η of :func:`local_entropy`'s settings, once they are checked."""
    for name, value in (("gamma", gamma), ("noise", noise)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    eta = 0.05 / gamma if step_size is None else float(step_size)
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if burn_in < 0 or steps - burn_in < BLOCKS:
        raise ValueError(f"steps - burn_in must be >= {BLOCKS} (got steps={steps}, burn_in={burn_in})")
    return eta


def local_entropy(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    gamma: float = 100.0,
    noise: float = 0.1,
    *,
    steps: int = 30,
    burn_in: int = 10,
    step_size: float | None = None,
    nodes: int = 6,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> LocalEntropy:
    """LE(w) of the loss over ``batches`` (see the module docs) by thermodynamic integration.

    Args:
        model: the network.
        loss_fn: its batch-mean loss.
        batches: the data the loss is averaged over.
        gamma: the scope γ (Entropy-SGD's γ): the coupling to w; the Gaussian reference
            N(w, ε²/γ I) has standard deviation ``noise / sqrt(gamma)`` per weight (default 0.01).
        noise: the thermal noise ε (the temperature is ε²).
        steps: Langevin steps per quadrature node (``nodes × steps`` full-data gradients).
        burn_in: steps of each chain not averaged (must leave at least 4).
        step_size: the Langevin step η (default 0.05/γ).
        nodes: Gauss–Legendre nodes of the integral over λ.
        seed: seed of the Gaussian noise (``None``: torch's global generator).
        params: the parameters to perturb (default: all trainable ones).

    Raises:
        FlatnessError: the loss is not finite at w, or a chain diverged (its loss rose above
            f(w) by more than ``100 (1 + |f(w)|)``: lower ``step_size``).
    """
    eta = _step_size(gamma, noise, steps, burn_in, step_size, nodes)
    data = collect_batches(batches)
    named = select_params(model, params)
    center = {n: p.detach() for n, p in named}
    gen = make_generator(seed)

    def randn_like(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    lambdas, weights = _nodes(nodes)
    means: list[float] = []
    block_means: list[list[float]] = []
    with eval_mode(model):
        base = require_finite(evaluate_at(model, loss_fn, data, center)[0], "the loss")
        # the λ = 0 measure exactly: w' ~ N(w, ε²/γ I)
        sd = noise / math.sqrt(gamma)
        chain = {n: c + sd * randn_like(c) for n, c in center.items()}
        kick = math.sqrt(2 * eta) * noise
        for lam in lambdas:
            values = []
            for step in range(steps):
                point = {n: t.requires_grad_(True) for n, t in chain.items()}
                loss = loss_at(model, loss_fn, data, point)
                value = float(loss.detach())
                if not math.isfinite(value) or value - base > DIVERGED * (1 + abs(base)):
                    raise FlatnessError(
                        f"the Langevin chain diverged (loss {value:.3g} at λ={lam:.3g}, step {step}; "
                        f"{base:.3g} at w): lower the step size (now {eta:g}; the chain is stable "
                        "while step_size * (gamma + λ_max of the Hessian) < 2) or the noise"
                    )
                grads = torch.autograd.grad(loss, list(point.values()))
                if step >= burn_in:
                    values.append(value)
                with torch.no_grad():
                    chain = {
                        n: t - eta * (float(lam) * g + gamma * (t - center[n])) + kick * randn_like(t)
                        for (n, t), g in zip(point.items(), grads, strict=True)
                    }
            means.append(float(np.mean(values)))
            block_means.append([float(b.mean()) for b in np.array_split(np.asarray(values), BLOCKS)])
    value = -float(np.dot(weights, means))
    # block b of every chain makes one estimate of LE; their spread, over √BLOCKS
    per_block = -(weights[:, None] * np.asarray(block_means)).sum(axis=0)
    stderr = float(per_block.std(ddof=1) / math.sqrt(BLOCKS))
    return LocalEntropy(
        value=value, stderr=stderr, loss=base, gamma=float(gamma), noise=float(noise), step_size=eta,
        steps=steps, burn_in=burn_in, lambdas=tuple(float(v) for v in lambdas),
        node_means=tuple(means),
    )
