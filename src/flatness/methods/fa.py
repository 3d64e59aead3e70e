"""FA-regularization as a training method: task loss + λ·Tr(H²)/B (see :mod:`flatness.penalties`).

The penalty is a :class:`PenaltyTerm` at the step's point; its curvature pass is an extra pass
(dropout off, BatchNorm on batch statistics with running statistics untouched, see
:mod:`flatness.passes`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ClassVar

from torch import Tensor, nn

from ..penalties import FlatnessPenalty
from .base import Evaluation, LossFn, Method, Term, register_method

__all__ = ["FlatnessAware", "PenaltyTerm", "PAPER_GRID"]

PAPER_GRID: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)  # the paper's λ sweep


class PenaltyTerm(Term):
    """λ·Tr(H²)/B from a :class:`flatness.FlatnessPenalty` on the evaluation's batch.

    The penalty is built out of place (``autograd.grad(create_graph=True)``) and added to the
    task loss before one ordinary ``backward()``, which is also what DDP needs. Logs
    ``penalty`` and ``sq_trace`` on the steps that compute it.
    """

    def __init__(self, penalty: FlatnessPenalty) -> None:
        self.penalty = penalty

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor:
        curvature_step = self.penalty.is_active()
        value = self.penalty(evaluation.x, evaluation.y)
        if curvature_step:
            info["penalty"] = float(self.penalty.last_penalty or 0.0)
            info["sq_trace"] = float(self.penalty.last_sq_trace or 0.0)
        return value

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        # the task loss's input-layer product, reused by the curvature pass (closed form only)
        return self.penalty.sharing_first_layer()

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "penalty" in state:
            self.penalty.load_state_dict(state["penalty"])


@register_method
class FlatnessAware(Method):
    """``--method fa``: hyper-parameters as :class:`flatness.FlatnessPenalty` (``lam`` swept).

    The experiments' default protocol is 5 probes every 10 steps (``protocol_defaults``) and
    the paper's λ grid 0, 0.001, 0.01, 0.1, 1 (``default_grid``).
    """

    name = "fa"
    hparam = "lam"
    default_grid = PAPER_GRID
    protocol_defaults: ClassVar[dict[str, Any]] = {"probes": 5, "every": 10}

    def __init__(self, model: nn.Module, loss_fn: LossFn, lam: float = 0.01, **kwargs: Any) -> None:
        self.penalty = FlatnessPenalty(model, loss_fn, lam=lam, **kwargs)
        super().__init__(model, loss_fn, terms=[PenaltyTerm(self.penalty)])

    @classmethod
    def keywords(cls) -> frozenset[str]:
        penalty = inspect.signature(FlatnessPenalty.__init__).parameters
        return frozenset(k for k in penalty if k not in ("self", "model", "loss_fn"))
