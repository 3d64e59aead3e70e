r"""Gradient-norm penalty (Zhao, Zhang & Hu, ICML 2022): L + ρ‖∇L‖, or L + ρ‖∇L‖².

.. math::

    \nabla_\theta \bigl(L + \rho \lVert g \rVert\bigr) = g + \rho \, H \frac{g}{\lVert g \rVert},
    \qquad
    \nabla_\theta \bigl(L + \rho \lVert g \rVert^2\bigr) = g + 2 \rho \, H g,
    \qquad g = \nabla_\theta L .

Two ways to get it:

- ``form="exact"``: build g with ``create_graph=True`` and back-propagate
  :math:`L + \rho \lVert g \rVert` (double backward, about three plain steps);
- ``form="fd"`` (default, Zhao et al.'s algorithm): the Hessian-vector product by a forward
  difference along the unit gradient, :math:`H \hat g \approx (\nabla L(\theta + r \hat g) - g)/r`,
  so the update direction is :math:`(1 - c)\, g + c\, \nabla L(\theta + r \hat g)` with
  :math:`c = \rho / r` (or :math:`2 \rho \lVert g \rVert / r` for the squared norm): two
  forward/backward passes. With ``c = 1`` this is exactly SAM with radius r. The error is O(r);
  the two forms agree as r → 0.

Dropout and BatchNorm: the finite-difference pass replays the clean pass's random state, so both
gradients are of the same sub-network (otherwise the difference would be dominated by the mask
change), and leaves BatchNorm's running statistics unchanged (:mod:`flatness.passes`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> gnp = make_method("gnp", model, nn.CrossEntropyLoss(), rho=0.05, form="fd", fd_radius=0.1)
    >>> info = gnp.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info)
    ['grad_norm', 'loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .base import Evaluation, LossFn, Method, Point, Term, logged, register_method
from .perturb import (
    RandomReplay,
    WrappingOptimizer,
    extra_pass,
    global_norm,
    perturbed,
    require_nonnegative,
    require_positive,
    stash_for,
)

__all__ = ["GradientNormPenalty", "GradientNormTerm", "FiniteDifferencePoint", "GNP_FORMS", "GNP"]

Form = Literal["fd", "exact"]
GNP_FORMS: tuple[str, ...] = ("fd", "exact")
_TINY = 1e-12


class GradientNormTerm(Term):
    """ρ‖∇L‖ (or ρ‖∇L‖²) at the evaluation point by double backward (``form="exact"``).

    Logs ``grad_norm``.
    """

    def __init__(self, rho: float, squared: bool = False) -> None:
        self.rho = rho
        self.squared = squared

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor:
        """ρ‖∇L‖ (or ρ‖∇L‖²) of the evaluation's loss by double backward; logs ``grad_norm``."""
        grads = torch.autograd.grad(
            evaluation.loss, evaluation.params, create_graph=True, allow_unused=True
        )
        sq_norm = sum((g.square().sum() for g in grads if g is not None), torch.zeros(()))
        info["grad_norm"] = logged(sq_norm.detach().sqrt())
        # clamp: d‖g‖ is undefined at g = 0; there the penalty's gradient is taken as 0
        penalty = sq_norm if self.squared else sq_norm.clamp_min(_TINY**2).sqrt()
        return self.rho * penalty


class FiniteDifferencePoint(Point):
    """Zhao et al.'s update (1 - c)·g + c·∇(objective)(θ + r ĝ), c = ρ/r (or 2ρ‖g‖/r).

    The main pass at θ gives g; the objective at θ + r ĝ is an extra pass (the dropout mask
    replayed, BatchNorm running statistics frozen); θ is restored exactly. Logs ``loss`` and
    ``grad_norm``.
    """

    def __init__(self, rho: float, squared: bool, fd_radius: float) -> None:
        self.rho, self.squared, self.fd_radius = rho, squared, fd_radius
        self._stash: list[Tensor] | None = None  # reused copies of θ for the exact restore

    def run(self, method: Method, x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """The gradient g at θ, then the objective's at θ + r ĝ, combined into the update in ``.grad``."""
        replay = RandomReplay.capture(params)
        loss = method.task_loss(x, y)
        info["loss"] = logged(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = global_norm(grads).to(params[0].device)
        info["grad_norm"] = logged(norm)
        r = self.fd_radius
        self._stash = stash_for(params, self._stash)
        with perturbed(params, grads, r / (norm + _TINY), self._stash):
            objective = method.objective(x, y, params, replay, info, main=False, loss_key=None)
            far = torch.autograd.grad(objective, params, allow_unused=True)
        # direction (1 - c)·g + c·∇L(θ + r ĝ), built in place in the far gradients
        c = self.rho * (2.0 * norm if self.squared else torch.ones_like(norm)) / r
        with torch.no_grad():
            for p, g, h in zip(params, grads, far, strict=True):
                if g is None and h is None:
                    continue
                g = torch.zeros_like(p) if g is None else g
                h = torch.zeros_like(p) if h is None else h
                p.grad = h.lerp_(g, (1.0 - c).to(h.dtype))


@register_method
class GradientNormPenalty(Method):
    """``--method gnp``: task loss + ρ‖∇L‖ (or ρ‖∇L‖²); ``rho`` is swept.

    Args:
        rho: penalty strength ρ >= 0.
        form: ``"fd"`` (finite difference, two passes: :class:`FiniteDifferencePoint`) or
            ``"exact"`` (double backward: :class:`GradientNormTerm`).
        squared: penalise ‖∇L‖² instead of ‖∇L‖.
        fd_radius: the finite-difference step r > 0 along the unit gradient (``form="fd"``).
    """

    name = "gnp"
    hparam = "rho"
    symbol = "ρ"
    default_grid = (0.01, 0.05, 0.1)
    # the finite-difference form at ρ = r steps along (1 − c)·g + c·∇L(θ + r·ĝ) with c = ρ/r = 1:
    # SAM's update at radius ρ (tables show that configuration once, as SAM)
    twin: ClassVar[dict[str, Any] | None] = {
        "method": "sam", "settings": {"form": "fd", "squared": False}, "strength_equals": "fd_radius",
        "why": "equals its finite-difference radius r = {value:g}: c = ρ/r = 1, which is exactly SAM's "
               "update at ρ = {value:g}",
    }

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        rho: float = 0.05,
        form: Form = "fd",
        squared: bool = False,
        fd_radius: float = 0.1,
    ) -> None:
        self.rho = require_nonnegative("rho (ρ)", rho)
        if form not in GNP_FORMS:
            raise ValueError(f"form must be one of {GNP_FORMS}, got {form!r}")
        self.form = form
        self.squared = bool(squared)
        self.fd_radius = require_positive("fd_radius (r)", fd_radius)
        if form == "exact":
            super().__init__(model, loss_fn, terms=[GradientNormTerm(self.rho, self.squared)])
        else:
            point = FiniteDifferencePoint(self.rho, self.squared, self.fd_radius)
            super().__init__(model, loss_fn, point=point)

    def __repr__(self) -> str:
        return (
            f"GradientNormPenalty(rho={self.rho}, form={self.form!r}, squared={self.squared}, "
            f"fd_radius={self.fd_radius})"
        )


class GNP(WrappingOptimizer):
    """The finite-difference gradient-norm penalty as a wrapper around any optimizer class.

    It has the protocol of :class:`flatness.methods.sam.SAM`: for any training loop and for
    ``step(closure)`` (Lightning's manual optimization).

    ``.grad`` holds g = ∇L(θ) (the user's pass at θ); ``step(closure)`` moves to θ + r ĝ,
    calls ``closure`` there (it recomputes the loss and calls ``backward()``), restores θ
    exactly (also when the closure raises), sets the update direction
    (1 - c)·g + c·∇L(θ + r ĝ), c = ρ/r (or 2ρ‖g‖/r with ``squared``), and lets the base
    optimizer step: :class:`FiniteDifferencePoint`'s update, Zhao et al.'s algorithm.

    Args:
        params: parameters or parameter groups.
        base_optimizer_cls: e.g. ``torch.optim.SGD``; built on the same parameter groups.
        rho: penalty strength ρ >= 0. fd_radius: the step r > 0. squared: ρ‖∇L‖².
        model: the network the closure runs (optional): given, the closure's pass is an extra
            pass that leaves BatchNorm's running statistics unchanged (updated once per step,
            by the user's pass at θ).
        **kwargs: the base optimizer's arguments.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = GNP(model.parameters(), torch.optim.SGD, rho=0.05, fd_radius=0.1, lr=0.1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def closure():
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt.zero_grad(); loss = closure()   # g at θ
        >>> _ = opt.step(closure)               # ∇L at θ + r ĝ, mixed with g; one SGD step
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.05,
        fd_radius: float = 0.1,
        squared: bool = False,
        *,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.rho = require_nonnegative("rho (ρ)", rho)
        self.fd_radius = require_positive("fd_radius (r)", fd_radius)
        self.squared = bool(squared)
        super().__init__(params, base_optimizer_cls, model, **kwargs)
        self._stash: list[Tensor] | None = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One GNP update; ``.grad`` must hold ∇L(θ), ``closure`` recomputes it (see above)."""
        if closure is None:
            raise RuntimeError(
                "GNP.step needs a closure that recomputes the loss and calls backward() "
                "(at the finite-difference point)"
            )
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            raise RuntimeError("no parameter has a gradient: call backward() before step(closure)")
        grads = [p.grad.detach().clone() for p in params]
        norm = global_norm(grads).to(params[0].device)
        self._stash = stash_for(params, self._stash)
        with perturbed(params, grads, self.fd_radius / (norm + _TINY), self._stash):
            self.zero_grad(set_to_none=True)
            with torch.enable_grad(), extra_pass(self.model):
                loss = closure()
        c = self.rho * (2.0 * norm if self.squared else torch.ones_like(norm)) / self.fd_radius
        at_theta = {id(p): g for p, g in zip(params, grads, strict=True)}
        with torch.no_grad():
            for p in (p for group in self.param_groups for p in group["params"]):
                g = at_theta.get(id(p))
                if g is None and p.grad is None:
                    continue
                far = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad = far.lerp_(torch.zeros_like(p) if g is None else g, (1.0 - c).to(far.dtype))
        self.base_optimizer.step()
        return loss

