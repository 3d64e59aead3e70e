"""FA-regularization as a training method: task loss + λ·Tr(H²)/B (see :mod:`flatness.penalties`).

The penalty is a :class:`PenaltyTerm` at the step's point; its curvature pass is an extra pass
(dropout off, BatchNorm on batch statistics with running statistics untouched, see
:mod:`flatness.passes`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from ..batch_loss import adapt
from ..estimators import Share
from ..penalties import FlatnessPenalty
from .base import Evaluation, Here, LossFn, Method, Term, register_method, signature_defaults

__all__ = ["PAPER_GRID", "FlatnessAware", "PenaltyLog", "PenaltyTerm", "SharedTaskGradient"]

PAPER_GRID: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)  # the paper's λ sweep


class PenaltyLog(NamedTuple):
    """The penalty's logged values: one curvature step's, or an epoch's means over its ``steps`` curvature steps.

    The one definition of the names under which a step logs them (:meth:`as_info`) and of how an
    epoch record holds their means (:meth:`from_epoch`).
    """

    sq_trace: float  # the Tr(H²) estimate
    penalty: float  # λ·Tr(H²)/B, the value added to the loss
    steps: int = 1

    def as_info(self) -> dict[str, float]:
        """The entries of a step's logged values (``Method.step``'s dict)."""
        return {"penalty": self.penalty, "sq_trace": self.sq_trace}

    @classmethod
    def from_epoch(cls, epoch: Mapping[str, Any]) -> PenaltyLog | None:
        """The means in an epoch record (``None`` if no step logged them).

        The training loop averages each logged value over the steps that logged it, counted in
        ``<name>_steps`` when fewer than the epoch's ``steps``.
        """
        if epoch.get("sq_trace") is None:
            return None
        steps = int(epoch.get("sq_trace_steps", epoch.get("steps", 1)) or 1)
        return cls(epoch["sq_trace"], epoch.get("penalty"), steps)

    @classmethod
    def of(cls, penalty: FlatnessPenalty) -> PenaltyLog:
        """The penalty's last curvature step (zeros before its first finite one)."""
        return cls(float(penalty.last_sq_trace or 0.0), float(penalty.last_penalty or 0.0))


class PenaltyTerm(Term):
    """λ·Tr(H²)/B from a :class:`flatness.FlatnessPenalty` on the evaluation's batch.

    The penalty is built out of place (``autograd.grad(create_graph=True)``) and added to the
    task loss before one ordinary ``backward()``, which is also what DDP needs. Logs the
    penalty's :class:`PenaltyLog` and, with
    a λ schedule or controller, ``lam`` (the λ applied) and the controller's measurements on the
    steps that compute it: the training loop averages them per epoch into the run record.
    """

    def __init__(self, penalty: FlatnessPenalty) -> None:
        self.penalty = penalty

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor:
        """λ·Tr(H²)/B on the evaluation's batch (an exact zero off the curvature steps)."""
        curvature_step = self.penalty.is_active()
        value = self.penalty(evaluation.x, evaluation.y, log=info)
        if curvature_step:
            info.update(PenaltyLog.of(self.penalty).as_info())
        return value

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """The curvature pass reuses the task forward's input layer (see ``penalty.sharing``)."""
        return self.penalty.sharing()

    def state_dict(self) -> dict[str, Any]:
        """The penalty's state."""
        return {"penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the penalty's state."""
        if "penalty" in state:
            self.penalty.load_state_dict(state["penalty"])


class SharedTaskGradient(Here):
    """At θ, as :class:`Here`; but on a curvature step the task gradient can come from the penalty.

    Where the finite-difference penalty can take g(θ) from the task pass
    (:meth:`flatness.FlatnessPenalty.objective`: the model is the same function in train mode, whole
    batch, not under DDP), the step's own task gradient is that g(θ) — one gradient evaluation fewer
    per curvature step.
    """

    def __init__(self, term: PenaltyTerm) -> None:
        self.term = term

    def run(self, method: Method, x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """The step at θ, with the penalty's task gradient as the step's own where it can share it."""
        penalty = self.term.penalty
        if method.terms != [self.term] or not penalty.shares_task_gradient():  # (not under DDP either)
            super().run(method, x, y, params, info)
            return
        loss, total = penalty.objective(x, y, log=info)
        info["loss"] = loss  # detached: no host synchronisation per step
        info.update(PenaltyLog.of(penalty).as_info())
        total.backward()


@register_method
class FlatnessAware(Method):
    """``--method fa``: hyper-parameters as :class:`flatness.FlatnessPenalty` (``lam`` swept).

    The experiments' default protocol is 5 probes every 10 steps (``protocol_defaults``) and
    the paper's λ grid 0, 0.001, 0.01, 0.1, 1 (``default_grid``).
    """

    name = "fa"
    hparam = "lam"
    symbol = "λ"
    default_grid = PAPER_GRID
    protocol_defaults: ClassVar[dict[str, Any]] = {"probes": 5, "every": 10}

    def __init__(self, model: nn.Module, loss_fn: LossFn, lam: float = 0.01, **kwargs: Any) -> None:
        model, loss_fn = adapt(model, loss_fn)  # a ModelLoss: the penalty runs the same module
        self.penalty = FlatnessPenalty(model, loss_fn, lam=lam, **kwargs)
        term = PenaltyTerm(self.penalty)
        shares_gradient = Share.TASK_GRADIENT in self.penalty.estimator.shares
        point = SharedTaskGradient(term) if shares_gradient else None
        super().__init__(model, loss_fn, point=point, terms=[term])

    @classmethod
    def keywords(cls) -> frozenset[str]:
        """The keywords of :class:`flatness.FlatnessPenalty`, but the model and the loss."""
        penalty = inspect.signature(FlatnessPenalty.__init__).parameters
        return frozenset(k for k in penalty if k not in ("self", "model", "loss_fn"))

    @classmethod
    def keyword_defaults(cls) -> dict[str, Any]:
        """The defaults of :class:`flatness.FlatnessPenalty`'s keywords."""
        return signature_defaults(FlatnessPenalty.__init__, cls.keywords())
