r"""ε-sharpness (Keskar et al., 2017) and adaptive sharpness (Kwon et al., 2021), by projected gradient ascent.

.. math::

    S_\varepsilon(\theta) = \max_{\delta \in C_\varepsilon} L(\theta + \delta) - L(\theta),
    \qquad C_\varepsilon = \{\delta = c \odot u : \lVert u \rVert \le \varepsilon\},

with the box ``‖u‖_∞ ≤ ε`` or the ball ``‖u‖_2 ≤ ε``, and the scale c = 1 (plain) or
c = ``|θ|`` + η (adaptive). The adaptive region moves with the weights, so a rescaling of a ReLU
network that leaves its function unchanged (layer ℓ × a, layer ℓ+1 / a) leaves the adaptive
sharpness unchanged (with η = 0), which plain ε-sharpness is not. Keskar's exact region
``|δ_i| ≤ ε(|θ_i| + 1)`` is the adaptive box with η = 1, and his normalised figure
``100 · S / (1 + L)`` is :attr:`Sharpness.keskar`.

The maximum is sought by ``steps`` projected ascent steps in u (sign of the gradient for the box,
the normalised gradient for the ball, each of size 2.5ε/steps), starting from the maximiser of
the linearised loss (a seeded random point of the region at an exact critical point, or with
``random_start``); the largest loss seen is kept. It is a lower bound of the true maximum. The model is evaluated with
``torch.func.functional_call`` at θ + δ: its own weights are never written to.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import eps_sharpness
    >>> model = nn.Linear(3, 2, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    >>> s = eps_sharpness(model, nn.functional.cross_entropy, data, eps=1e-2, steps=5)
    >>> s.value >= 0
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..probes import make_generator
from ..utils import eval_mode
from .functional import (
    LossFn,
    accepts_model_loss,
    call_at,
    collect_batches,
    require_finite,
    select_params,
)

__all__ = ["Sharpness", "Region", "eps_sharpness", "adaptive_sharpness"]

Region = Literal["box", "ball"]


@dataclass(frozen=True)
class Sharpness:
    """max L(θ+δ) − L(θ) over the region, with what it was measured with."""

    value: float
    base_loss: float
    max_loss: float
    eps: float
    region: str
    adaptive: bool
    steps: int

    @property
    def keskar(self) -> float:
        """Keskar et al.'s normalised sharpness 100 · S / (1 + L(θ))."""
        return 100.0 * self.value / (1.0 + self.base_loss)


def _global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum(t.pow(2).sum() for t in tensors))  # type: ignore[arg-type]


def _check_arguments(eps: float, region: str, steps: int, eta: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if region not in ("box", "ball"):
        raise ValueError(f"region must be 'box' or 'ball', got {region!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _project(u: list[Tensor], region: Region, eps: float) -> list[Tensor]:
    """``u`` projected onto the region (the box ‖u‖_∞ ≤ ε or the ball ‖u‖_2 ≤ ε)."""
    if region == "box":
        return [t.clamp(-eps, eps) for t in u]
    norm = float(_global_norm(u))
    return [t * (eps / norm) for t in u] if norm > eps else u


def _ascent_step(u: list[Tensor], grads: list[Tensor], size: float, region: Region, eps: float) -> list[Tensor] | None:
    """One projected ascent step: along sign(g) in the box, along g/‖g‖ in the ball (``None`` at g = 0 in the ball)."""
    if region == "box":
        return _project([t + size * g.sign() for t, g in zip(u, grads, strict=True)], region, eps)
    gnorm = float(_global_norm(grads))
    if gnorm == 0.0:
        return None
    return _project([t + (size / gnorm) * g for t, g in zip(u, grads, strict=True)], region, eps)


def _random_point(theta: list[Tensor], region: Region, eps: float, gen: torch.Generator | None) -> list[Tensor]:
    """A uniform point of the region (the ball's: a Gaussian direction, radius ε·U^(1/P))."""
    if region == "box":
        return [(2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1).to(p.device) * eps
                for p in theta]
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in theta]
    dim = sum(p.numel() for p in theta)
    radius = eps * float(torch.rand((), generator=gen)) ** (1.0 / dim)
    norm = float(_global_norm(direction))
    return [d * (radius / norm) for d in direction]


@accepts_model_loss
def eps_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    eps: float = 1e-3,
    region: Region = "box",
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = False,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> Sharpness:
    """ε-sharpness of the loss averaged over ``batches``, by projected gradient ascent.

    Args:
        model: the network.
        loss_fn: its batch-mean loss.
        batches: the data.
        eps: radius ε > 0 (in units of c).
        region: ``"box"`` (‖u‖_∞ ≤ ε, Keskar) or ``"ball"`` (‖u‖_2 ≤ ε over all parameters).
        adaptive: scale the region by c = ``|θ|`` + η (reparametrisation-invariant for η = 0).
        eta: η >= 0 of the adaptive scale (Keskar's region: ``adaptive=True, eta=1``).
        steps: ascent steps (each one forward and backward pass over all batches).
        step_size: step in u (default 2.5ε/steps).
        random_start: start from a random point of the region (default: from the maximiser
            of the linearised loss, ε·sign(g) for the box and ε·g/‖g‖ for the ball).
        seed: seed of the random start.
        params: perturb only these parameters (default: all trainable ones).
    """
    _check_arguments(eps, region, steps, eta)
    data = collect_batches(batches)
    named = select_params(model, params)
    names = [n for n, _ in named]
    theta = [p.detach() for _, p in named]
    scale = [p.abs() + eta if adaptive else torch.ones_like(p) for p in theta]
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    gen = make_generator(seed)

    def at(u: list[Tensor]) -> dict[str, Tensor]:
        return {n: t + c * d for n, t, c, d in zip(names, theta, scale, u, strict=True)}

    def loss_and_grad(u: list[Tensor]) -> tuple[float, list[Tensor]]:
        u = [t.detach().requires_grad_(True) for t in u]
        total = 0.0
        for b in data:
            loss = b.weight * loss_fn(call_at(model, at(u), b.x), b.y)
            loss.backward()  # gradients accumulate in u only: θ is detached
            total += float(loss.detach())
        return total, [t.grad if t.grad is not None else torch.zeros_like(t) for t in u]

    with eval_mode(model):
        zero = [torch.zeros_like(p) for p in theta]
        base, grads = loss_and_grad(zero)
        require_finite(base, "the loss")
        # Start at the maximiser of the linearised loss (ε·sign(g) or ε·g/‖g‖ in u), which
        # the ascent then refines; at an exact critical point, or on request, at a random point.
        start = None if random_start else _ascent_step(zero, grads, eps, region, eps)
        critical = all(float(g.abs().max()) == 0 for g in grads)
        u = _random_point(theta, region, eps, gen) if start is None or critical else start
        best = base
        for step in range(steps + 1):
            total, grads = loss_and_grad(u)
            if not math.isfinite(total):
                warnings.warn(
                    f"the loss is not finite inside the ε={eps} {region}: sharpness is infinite",
                    RuntimeWarning,
                    stacklevel=2,
                )
                best = math.inf
                break
            best = max(best, total)
            if step == steps:
                break
            with torch.no_grad():
                moved = _ascent_step([t.detach() for t in u], grads, alpha, region, eps)
            if moved is None:
                break
            u = moved
    return Sharpness(best - base, base, best, float(eps), region, adaptive, steps)


@accepts_model_loss
def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    eps: float = 1e-2,
    region: Region = "ball",
    *,
    eta: float = 0.0,
    steps: int = 20,
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> Sharpness:
    """Adaptive sharpness: :func:`eps_sharpness` with the region scaled by ``|θ|`` + η (Kwon et al.)."""
    return eps_sharpness(
        model, loss_fn, batches, eps, region,
        adaptive=True, eta=eta, steps=steps, seed=seed, params=params,
    )
