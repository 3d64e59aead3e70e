"""FA-regularization as a training method: task loss + λ·Tr(H²)/B (see :mod:`flatness.penalties`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..penalties import FlatnessPenalty
from .base import LossFn, Method, register_method

__all__ = ["FlatnessAware"]


@register_method
class FlatnessAware(Method):
    """``--method fa``: hyper-parameters as :class:`flatness.FlatnessPenalty` (``lam`` swept).

    The penalty is built out of place (``autograd.grad(create_graph=True)``) and added to the
    task loss before one ordinary ``backward()``, which is also what DDP needs.
    """

    name = "fa"
    hparam = "lam"

    def __init__(self, model: nn.Module, loss_fn: LossFn, lam: float = 0.01, **kwargs: Any) -> None:
        super().__init__(model, loss_fn)
        self.penalty = FlatnessPenalty(model, loss_fn, lam=lam, **kwargs)

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        curvature_step = self.penalty.is_active()
        loss, total = self.penalty.objective(x, y)  # task loss + penalty, one backward()
        total.backward()
        optimizer.step()
        info = {"loss": float(loss.detach())}
        if curvature_step:
            info["penalty"] = float(self.penalty.last_penalty or 0.0)
            info["sq_trace"] = float(self.penalty.last_sq_trace or 0.0)
        return info

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "penalty" in state:
            self.penalty.load_state_dict(state["penalty"])
