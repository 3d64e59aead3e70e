r"""Neighborhood Region Smoothing (Zhao & Zhang, eq. 3) and its control, random perturbation (RPR).

.. math::

    \text{NRS:}\quad \min_\theta\; L(\theta)
        + \alpha \, \mathbb{E}_x\, D_\mathrm{KL}\bigl(f(x;\theta) \,\Vert\, f(x;\theta+\delta\theta)\bigr)
        + L(\theta + \delta\theta),
    \qquad
    \text{RPR:}\quad \min_\theta\; L(\theta + \delta\theta),

with one :math:`\delta\theta` per step drawn uniformly from the Euclidean ball
:math:`B(0, \epsilon)` over all trainable weights together (the paper draws one per device;
defaults ε = 0.1, α = 1). :math:`f` is the predicted class distribution: softmax of the logits,
or a Bernoulli for a single logit. The KL term is differentiated through both arguments.

The neighbour :math:`f(\cdot;\theta+\delta\theta)` is evaluated with
``torch.func.functional_call`` on the tensors ``p + δ``: the model's own weights are never
modified, so there is nothing to restore and the gradient reaches θ through both passes.

Dropout: the neighbour's pass replays the clean pass's random state (same mask), so at ε = 0
the two outputs are identical and the KL term is exactly zero.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> nrs = make_method("nrs", model, nn.CrossEntropyLoss(), eps=0.1, alpha=1.0, seed=0)
    >>> info = nrs.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info)
    ['kl', 'loss', 'perturbed_loss']
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..utils import call_model
from .base import LossFn, Method, register_method
from .perturb import RandomReplay, global_norm, require_nonnegative

__all__ = [
    "sample_in_ball",
    "model_divergence",
    "NeighborhoodRegionSmoothing",
    "RandomPerturbation",
]


def sample_in_ball(
    params: list[Tensor], eps: float, generator: torch.Generator | None = None
) -> list[Tensor]:
    """δ uniform in the Euclidean ε-ball of all ``params`` taken as one vector.

    Direction: a normalised standard Gaussian; radius: ε·U^(1/d) with U ~ U(0, 1) and d the
    number of weights (so in high dimension ‖δ‖ is almost exactly ε).
    """
    gen_device = generator.device if generator is not None else params[0].device
    noise = [
        torch.randn(p.shape, generator=generator, device=gen_device, dtype=p.dtype).to(p.device)
        for p in params
    ]
    d = sum(p.numel() for p in params)
    u = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
    radius = eps * float(u) ** (1.0 / d)
    scale = radius / max(float(global_norm(noise)), 1e-30)
    return [n.mul_(scale) for n in noise]


def model_divergence(logits: Tensor, neighbour_logits: Tensor) -> Tensor:
    """Mean over examples of KL(f(θ) ‖ f(θ+δθ)) from the two models' logits (NRS eq. 2).

    The last dimension holds the classes (softmax); a last dimension of size 1 is one logit of
    a Bernoulli (sigmoid). Other leading dimensions are averaged over like the batch.
    """
    if logits.shape != neighbour_logits.shape:
        raise ValueError(f"logit shapes differ: {logits.shape} vs {neighbour_logits.shape}")
    if logits.dim() == 1 or logits.shape[-1] == 1:
        a, b = logits.reshape(-1, 1), neighbour_logits.reshape(-1, 1)
        log_p = torch.cat([F.logsigmoid(a), F.logsigmoid(-a)], dim=1)
        log_q = torch.cat([F.logsigmoid(b), F.logsigmoid(-b)], dim=1)
    else:
        log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=1)
        log_q = F.log_softmax(neighbour_logits.reshape(-1, logits.shape[-1]), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _call_with(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    """``model(x)`` (unpacked like :func:`flatness.utils.call_model`) with ``params`` swapped in."""
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


class _RandomNeighbour(Method):
    """Shared by NRS and RPR: draws δθ in the ε-ball and evaluates the neighbour."""

    hparam = "eps"
    default_grid: tuple[float, ...] = (0.05, 0.1, 0.5)  # the NRS paper's ε search

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, eps: float = 0.1, seed: int | None = None
    ) -> None:
        super().__init__(model, loss_fn)
        self.eps = require_nonnegative("eps (ε)", eps)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(int(seed))

    def _named_trainable(self) -> dict[str, Tensor]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not named:
            raise ValueError("the model has no parameters that require grad")
        return named

    def neighbour(self, named: dict[str, Tensor], x: Any) -> Tensor:
        """Logits of the model at θ + δθ, δθ fresh from the ε-ball; differentiable in θ."""
        delta = sample_in_ball(list(named.values()), self.eps, self.generator)
        shifted = {n: p + d for (n, p), d in zip(named.items(), delta)}
        return _call_with(self.model, shifted, x)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator(device="cpu")
            self.generator.set_state(state["generator"])


@register_method
class NeighborhoodRegionSmoothing(_RandomNeighbour):
    """``--method nrs``: L(θ) + α·KL(f(θ) ‖ f(θ+δθ)) + L(θ+δθ); ``eps`` (ε) is swept.

    Args:
        eps: radius ε >= 0 of the ball δθ is drawn from (paper default 0.1).
        alpha: weight α >= 0 of the model divergence (paper default 1).
        seed: seed of δθ's generator (``None``: torch's global random stream).
    """

    name = "nrs"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        eps: float = 0.1,
        alpha: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, loss_fn, eps=eps, seed=seed)
        self.alpha = require_nonnegative("alpha (α)", alpha)

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        named = self._named_trainable()
        optimizer.zero_grad(set_to_none=True)
        replay = RandomReplay.capture(named.values())
        logits = call_model(self.model, x)
        loss = self.loss_fn(logits, y)
        with replay():
            neighbour_logits = self.neighbour(named, x)
        perturbed_loss = self.loss_fn(neighbour_logits, y)
        kl = model_divergence(logits, neighbour_logits)
        (loss + self.alpha * kl + perturbed_loss).backward()
        optimizer.step()
        return {
            "loss": float(loss.detach()),
            "kl": float(kl.detach()),
            "perturbed_loss": float(perturbed_loss.detach()),
        }

    def __repr__(self) -> str:
        return f"NeighborhoodRegionSmoothing(eps={self.eps}, alpha={self.alpha})"


@register_method
class RandomPerturbation(_RandomNeighbour):
    """``--method rpr``: train on L(θ+δθ) only (the NRS paper's control); ``eps`` is swept.

    ``loss`` in the step's info is the loss at the neighbour θ + δθ (the only one computed).
    """

    name = "rpr"

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        named = self._named_trainable()
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.neighbour(named, x), y)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    def __repr__(self) -> str:
        return f"RandomPerturbation(eps={self.eps})"
