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

from ..batch_loss import adapt
from ..penalties import FlatnessPenalty
from .base import Evaluation, Here, LossFn, Method, Term, register_method, signature_defaults

__all__ = ["PAPER_GRID", "FlatnessAware", "PenaltyTerm", "SharedTaskGradient"]

PAPER_GRID: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)  # the paper's λ sweep


class PenaltyTerm(Term):
    """λ·Tr(H²)/B from a :class:`flatness.FlatnessPenalty` on the evaluation's batch.

    The penalty is built out of place (``autograd.grad(create_graph=True)``) and added to the
    task loss before one ordinary ``backward()``, which is also what DDP needs. Logs
    ``penalty``, ``sq_trace`` and, with a λ schedule or controller, ``lam`` (the λ applied)
    and the controller's measurements on the steps that compute it: the training loop averages them per epoch
    into the run record, with ``lam_steps`` the number of curvature steps.
    """

    def __init__(self, penalty: FlatnessPenalty) -> None:
        self.penalty = penalty

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor:
        curvature_step = self.penalty.is_active()
        value = self.penalty(evaluation.x, evaluation.y, log=info)
        if curvature_step:
            info["penalty"] = float(self.penalty.last_penalty or 0.0)
            info["sq_trace"] = float(self.penalty.last_sq_trace or 0.0)
        return value

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """The curvature pass reuses the task forward's input layer (see ``penalty.sharing``)."""
        return self.penalty.sharing()

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "penalty" in state:
            self.penalty.load_state_dict(state["penalty"])


class SharedTaskGradient(Here):
    """At θ, as :class:`Here`; but on a curvature step where the finite-difference penalty can
    take g(θ) from the task pass (:meth:`flatness.FlatnessPenalty.objective`: the model is the
    same function in train mode, whole batch, not under DDP), the step's own task gradient is
    that g(θ) — one gradient evaluation fewer per curvature step.
    """

    def __init__(self, term: PenaltyTerm) -> None:
        self.term = term

    def run(self, method: Method, x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        penalty = self.term.penalty
        if method.terms != [self.term] or penalty.model is not penalty.local_model or not penalty.shares_task_gradient():
            super().run(method, x, y, params, info)
            return
        loss, total = penalty.objective(x, y, log=info)
        info["loss"] = loss  # detached: no host synchronisation per step
        info["penalty"] = float(penalty.last_penalty or 0.0)
        info["sq_trace"] = float(penalty.last_sq_trace or 0.0)
        total.backward()


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
        model, loss_fn = adapt(model, loss_fn)  # a ModelLoss: the penalty runs the same module
        self.penalty = FlatnessPenalty(model, loss_fn, lam=lam, **kwargs)
        term = PenaltyTerm(self.penalty)
        point = SharedTaskGradient(term) if self.penalty.backend == "finite-difference" else None
        super().__init__(model, loss_fn, point=point, terms=[term])

    @classmethod
    def keywords(cls) -> frozenset[str]:
        penalty = inspect.signature(FlatnessPenalty.__init__).parameters
        return frozenset(k for k in penalty if k not in ("self", "model", "loss_fn"))

    @classmethod
    def keyword_defaults(cls) -> dict[str, Any]:
        return signature_defaults(FlatnessPenalty.__init__, cls.keywords())
