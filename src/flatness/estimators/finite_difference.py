r"""``backend="finite-difference"``: Tr(H²) and its gradient from differences of gradients.

With :math:`g(\theta) = \nabla L(\theta)`, probes :math:`v_j` and :math:`u_j = H v_j`,

.. math::

    u_j \approx \frac{g(\theta + r v_j) - g(\theta)}{r}, \qquad
    \widehat{\operatorname{Tr}(H^2)} = \frac{1}{M}\sum_j \lVert u_j \rVert^2,

and the gradient of each term, :math:`2\,\nabla^3 L[v_j, u_j, \cdot\,]`, by a second difference
(:func:`flatness.finite_difference.fd_sq_trace`): no double backward, so it works on models
compiled with ``torch.compile`` and with fused attention kernels. The returned term has the
value of the estimate and the finite-difference gradient (a surrogate, so that one
``backward()`` applies it, DDP's too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..finite_difference import FrozenKinks, fd_sq_trace, same_function_in_train_mode, surrogate
from ..probes import Distribution, sample_probes
from ..utils import call_model
from .base import ProbeEstimator, Share, Shared, Support, TaskGradient

__all__ = ["FiniteDifferenceEstimator", "check_fd_step"]


def check_fd_step(fd_step: float | tuple[float, float] | None) -> float | tuple[float, float] | None:
    """``fd_step`` if it is ``None``, a finite number > 0 or a pair of them, else a ``ValueError``."""
    if fd_step is None:
        return None
    steps = (fd_step, fd_step) if isinstance(fd_step, (int, float)) else tuple(fd_step)
    if len(steps) != 2 or not all(
        isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0 for h in steps
    ):
        raise ValueError(f"fd_step must be a finite number > 0 or a pair of them, got {fd_step!r}")
    return fd_step


class FiniteDifferenceEstimator(ProbeEstimator):
    """First-order FA: 1 + 3M gradient evaluations per call (1 fewer with the task gradient).

    It takes the task pass's g(θ) (:attr:`Share.TASK_GRADIENT`) when that pass computes the
    curvature pass's function (:func:`flatness.finite_difference.same_function_in_train_mode`)
    for all trainable parameters. It supports compiled parts (``torch.compile``), DDP and a
    :class:`flatness.ModelLoss`; not autocast (the
    differences need the parameters' precision: :func:`flatness.estimators.estimate` runs it
    with autocast off). ``h``: the relative steps of :func:`flatness.finite_difference.step_sizes`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatness.estimators import AutogradEstimator, FiniteDifferenceEstimator
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        >>> def seeded():
        ...     return {"probes": 2, "generator": torch.Generator().manual_seed(0)}
        >>> fd = FiniteDifferenceEstimator(model, nn.CrossEntropyLoss(), **seeded())(x, y)
        >>> exact = AutogradEstimator(model, nn.CrossEntropyLoss(), **seeded())(x, y)
        >>> abs(float(fd) / float(exact) - 1) < 1e-4
        True
    """

    name = "finite-difference"
    shares = Share.TASK_GRADIENT
    supports = Support(autocast=False, compile=True, ddp=True, model_loss=True)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        *,
        params: Sequence[Tensor] | None = None,
        probes: int = 5,
        dist: Distribution = "rademacher",
        generator: torch.Generator | None = None,
        dropout: bool = False,
        h: float | tuple[float, float] | None = None,
    ) -> None:
        super().__init__(model, loss_fn, params=params, probes=probes, dist=dist, generator=generator, dropout=dropout)
        self.h = check_fd_step(h)

    def ready(self) -> Share:
        """The task gradient, when the task pass is the curvature pass's function of all the trainable parameters."""
        if self.given_params is None and same_function_in_train_mode(self.model):
            return Share.TASK_GRADIENT
        return Share.NOTHING

    def task_pass(self, x: Any, y: Any) -> TaskGradient:
        """The task loss in the model's current modes, g(θ) and the ReLU masks of θ."""
        params = self.parameters()
        kinks = FrozenKinks()
        with kinks.recording():
            loss = self.loss_fn(call_model(self.model, x), y)
        grads = torch.autograd.grad(loss, params)
        return TaskGradient(loss, params, list(grads), kinks)

    def __call__(self, x: Any, y: Any, shared: Shared | None = None) -> Tensor:
        """The finite-difference estimate, reusing the task gradient handed over in ``shared``."""
        params = self.parameters()
        probes = sample_probes(params, self.probes, self.dist, generator=self.generator)
        task = shared if isinstance(shared, TaskGradient) else None
        fd = fd_sq_trace(  # its own passes, under the curvature pass's policy
            self.model, self.loss_fn, x, y, params, probes, h=self.h,
            grad0=None if task is None else task.grads, kinks=None if task is None else task.kinks,
            dropout=self.dropout,
        )
        if fd.grads is None:
            raise RuntimeError("the finite-difference estimator returned no gradient")
        return surrogate(params, fd.values.mean(), fd.grads)
