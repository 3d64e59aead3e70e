r"""Sharpness-Aware Minimization (Foret et al., 2021), as a method and as an optimizer wrapper.

SAM minimises the worst loss in a ρ-ball around the weights,

.. math::

    \min_\theta \max_{\lVert \epsilon \rVert \le \rho} L(\theta + \epsilon)
    \approx \min_\theta L(\theta + \hat\epsilon), \qquad
    \hat\epsilon = \rho \, \frac{T^2 g}{\lVert T g \rVert}, \quad g = \nabla L(\theta),

with :math:`T = I` (SAM) or :math:`T = \operatorname{diag}(|\theta|)` (adaptive SAM, Kwon et
al. 2021). One update: gradient at θ, ascend to θ + ε̂, gradient there, restore θ, and let
the base optimizer step with the gradient taken at θ + ε̂ (two forward/backward passes).

Dropout and BatchNorm: :class:`SharpnessAware` reuses the clean pass's dropout mask for the
perturbed pass (the random state is replayed), so both gradients belong to the same sub-network
of the same mini-batch, and the perturbed pass leaves BatchNorm's running statistics unchanged
(it normalises with its own batch statistics, like standard SAM implementations that freeze BN
statistics in the second pass). The :class:`SAM` wrapper leaves the dropout mask to the user's
closure; given ``model=``, its closure's pass at θ + ε̂ leaves the running statistics unchanged,
so that they are updated once per step, by the user's pass at θ.

Example (the method, behind the common interface):
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sam = make_method("sam", model, nn.CrossEntropyLoss(), rho=0.05)
    >>> info = sam.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info)
    ['loss', 'perturbed_loss']

Example (the optimizer wrapper, in any training loop):
    >>> from flatness.methods.sam import SAM
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.first_step(zero_grad=True)           # to θ + ε̂
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)          # back to θ, then the base optimizer's step
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import LossFn, Method, Point, logged, register_method
from .perturb import (
    RandomReplay,
    WrappingOptimizer,
    extra_pass,
    global_norm,
    perturbed,
    require_nonnegative,
    stash_for,
)

__all__ = ["sam_direction", "sam_perturbation", "AscentPoint", "SharpnessAware", "SAM"]

_TINY = 1e-12  # keeps ε̂ finite when the gradient vanishes


def sam_direction(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], rho: float, adaptive: bool = False
) -> tuple[list[Tensor | None], Tensor]:
    """(directions, scale) with ε̂ = scale·direction: direction T²g, scale ρ/‖Tg‖.

    Without ``adaptive`` the directions are the gradients themselves (nothing is allocated);
    ``scale`` is a 0-d tensor, so nothing waits for the device.
    """
    with torch.no_grad():
        if not adaptive:
            return list(grads), rho / (global_norm(grads) + _TINY)
        scaled = [None if g is None else p.abs() * g for p, g in zip(params, grads, strict=True)]
        directions = [None if g is None else p.square() * g for p, g in zip(params, grads, strict=True)]
        return directions, rho / (global_norm(scaled) + _TINY)


def sam_perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], rho: float, adaptive: bool = False
) -> list[Tensor | None]:
    """ε̂ = ρ·T²g/‖Tg‖ for each parameter (``None`` where its gradient is ``None``)."""
    directions, scale = sam_direction(params, grads, rho, adaptive)
    with torch.no_grad():
        return [None if d is None else d * scale.to(d.device) for d in directions]


class AscentPoint(Point):
    """SAM's point θ + ε̂: a main pass at θ for the gradient, then the objective at θ + ε̂.

    The perturbed pass is an extra pass (the clean pass's dropout mask replayed, BatchNorm
    running statistics frozen); the gradient taken there lands in ``.grad`` and θ is restored
    exactly. Logs ``loss`` (at θ) and ``perturbed_loss`` (at θ + ε̂).
    """

    def __init__(self, rho: float, adaptive: bool = False) -> None:
        self.rho = require_nonnegative("rho (ρ)", rho)
        self.adaptive = bool(adaptive)
        self._stash: list[Tensor] | None = None  # reused copies of θ for the exact restore

    def run(self, method: Method, x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """The gradient at θ gives ε̂; the objective's gradient at θ + ε̂ lands in ``.grad``."""
        replay = RandomReplay.capture(params)
        loss = method.task_loss(x, y)
        info["loss"] = logged(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        directions, scale = sam_direction(params, grads, self.rho, self.adaptive)
        self._stash = stash_for(params, self._stash)
        with perturbed(params, directions, scale.to(params[0].device), self._stash):
            objective = method.objective(
                x, y, params, replay, info, main=False, loss_key="perturbed_loss"
            )
            objective.backward()  # the gradient at θ + ε̂ lands in .grad


@register_method
class SharpnessAware(Method):
    """``--method sam``: SAM around any torch optimizer; ``rho`` (ρ >= 0) is swept.

    Args:
        rho: radius ρ of the neighbourhood; ``rho=0`` gives plain training at twice the cost.
        adaptive: adaptive SAM (ε̂ scaled by ``|θ|``, which wants larger ρ, e.g. 0.5–2).
    """

    name = "sam"
    hparam = "rho"
    symbol = "ρ"
    default_grid = (0.01, 0.05, 0.1)

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, rho: float = 0.05, adaptive: bool = False
    ) -> None:
        point = AscentPoint(rho, adaptive)
        super().__init__(model, loss_fn, point=point)
        self.rho, self.adaptive = point.rho, point.adaptive

    def __repr__(self) -> str:
        return f"SharpnessAware(rho={self.rho}, adaptive={self.adaptive})"


class SAM(WrappingOptimizer):
    """SAM as a wrapper around any optimizer class, for use in any training loop.

    ``first_step()`` moves every parameter with a gradient to θ + ε̂ (saving θ), the user then
    computes the loss and gradient again, and ``second_step()`` restores θ exactly and lets the
    base optimizer step. ``step(closure)`` does all three, with ``closure`` recomputing the
    loss and calling ``backward()``; if the closure raises, θ is restored before the error
    propagates. The math is :func:`sam_perturbation`, shared with :class:`SharpnessAware`.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer_cls: e.g. ``torch.optim.SGD``; built on the same parameter groups.
        rho: radius ρ >= 0.
        adaptive: adaptive SAM.
        model: the network the closure runs (optional). Given, the closure's pass at θ + ε̂ is
            an extra pass (:mod:`flatness.passes`): BatchNorm normalises with the batch's
            statistics but its running statistics stay as the pass at θ left them — updated
            once per step, as in plain training. Without it the closure's forward updates them
            a second time.
        **kwargs: the base optimizer's arguments (``lr=...``, ``momentum=...``).

    Example (``step(closure)``, as in Lightning's manual optimization):
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def closure():
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt.zero_grad()
        >>> loss = closure()        # at θ: the gradient SAM ascends along; BN statistics updated
        >>> _ = opt.step(closure)   # at θ + ε̂ (BN statistics untouched), θ back, the SGD step
        >>> int(model[1].num_batches_tracked)
        1
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.rho = require_nonnegative("rho (ρ)", rho)
        self.adaptive = bool(adaptive)
        super().__init__(params, base_optimizer_cls, model, **kwargs)
        self._origin: list[tuple[Tensor, Tensor]] | None = None

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to θ + ε̂ using the gradients now in ``.grad``; θ is kept for ``second_step``."""
        if self._origin is not None:
            raise RuntimeError("first_step() called twice without second_step() or restore()")
        params = self._params_with_grad()
        if not params:
            raise RuntimeError("no parameter has a gradient: call backward() before first_step()")
        directions, scale = sam_direction(params, [p.grad for p in params], self.rho, self.adaptive)
        self._origin = [(p, p.detach().clone()) for p in params]
        for p, d in zip(params, directions, strict=True):
            p.addcmul_(d, scale.to(p.device))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact θ saved by ``first_step`` (no-op if not perturbed)."""
        if self._origin is None:
            return
        for p, saved in self._origin:
            p.copy_(saved)
        self._origin = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore θ, then the base optimizer's step with the gradient taken at θ + ε̂."""
        if self._origin is None:
            raise RuntimeError("second_step() called without first_step()")
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SAM update; ``.grad`` must hold the gradient at θ, ``closure`` recomputes it."""
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that recomputes the loss and calls backward(); "
                "or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), extra_pass(self.model):
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

