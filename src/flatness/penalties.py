r"""The flatness-aware (FA) penalty λ·Tr(H²)/B as a drop-in term for any training loop.

.. math::

    L_\text{total} = L_\text{task} + \lambda \cdot \frac{1}{M B} \sum_{j=1}^{M} \lVert H v_j \rVert^2

where H is the Hessian of the task loss on the mini-batch, B the batch size and v_j Rademacher or
Gaussian probes (FA-regularization paper, eq. 3 and Algorithms 1–2). The curvature term is computed
on every ``every``-th call and is an exact zero on the other calls. How Tr(H²) is estimated is an
:class:`flatness.estimators.Estimator` (one per ``backend=``); the penalty holds the rest: the λ
policy (:class:`flatness.schedules.LamPolicy`), the cadence, the sub-batch and the non-finite guard.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness import FlatnessPenalty
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    >>> loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> penalty = FlatnessPenalty(model, loss_fn, lam=0.01, probes=5, every=10, seed=0)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> (loss_fn(model(x), y) + penalty(x, y)).backward(); opt.step()
    >>> penalty.last_sq_trace is not None and model.training
    True
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .batch_loss import ModelLoss, adapt_wrapped, batch_size_of, call_pair
from .estimators import BACKENDS, Share, Shared, estimate, make_estimator
from .lam_control import apply_lam, make_policy
from .linear_io import PrefixSlot, SharedPrefix
from .precision import PassPrecision
from .probes import Distribution, generator_state, make_generator, restore_generator
from .utils import batch_size, call_model, check_sub_batch, sub_batch_size, take_first

__all__ = ["BACKENDS", "FlatnessPenalty", "NonFiniteCurvatureError"]


class NonFiniteCurvatureError(FloatingPointError):
    """The Tr(H²) estimate was NaN or infinite."""


class FlatnessPenalty:
    """λ·Tr(H²)/B, estimated with M Hutchinson probes every ``every`` calls.

    Args:
        model: the network; its parameters that require grad are penalised (or ``params``).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` (batch mean), the task loss; or a
            :class:`flatness.ModelLoss` ``fn(model, batch)`` for any batch (dicts): the penalty is
            then called as ``penalty(batch)``, B is the batch's size (:mod:`flatness.batch_loss`),
            and the estimators that need the model output (layer-wise, K-FAC, ``cv``) are refused.
        lam: λ >= 0; ``lam=0`` computes nothing and returns exact zeros.
        probes, dist: M >= 1 probes per curvature pass, ``"rademacher"`` (the paper's) or
            ``"gaussian"``; seed, generator: their generator (:func:`flatness.make_generator`).
        every: compute the penalty on calls 0, k, 2k, ... (k >= 1); zero on the others.
        sub_batch: curvature pass on the first ``sub_batch`` samples (int) or that fraction of
            the batch (float in (0, 1]); still divided by the full B.
        eval_during_curvature: dropout off in the curvature pass (the paper; default); BatchNorm
            uses batch statistics and updates nothing either way (:mod:`flatness.passes`).
        on_nonfinite: ``"raise"`` a :class:`NonFiniteCurvatureError`, or ``"skip"`` (warn, zero).
        params: the parameters to penalise (default: all of ``model``'s trainable ones).
        backend, estimator, fd_step: how Tr(H²) is estimated (:func:`flatness.estimators.make_estimator`,
            which says what runs under autocast and torch.compile): ``"auto"`` (the closed form of
            :mod:`flatness.layerwise` where it applies, checked against autograd on its first pass,
            else autograd), ``"autograd"``, ``"layerwise"`` (unchecked), ``"finite-difference"`` (no
            double backward; ``fd_step`` its relative steps) or ``"kfac"`` (Kronecker factors of a
            cross-entropy classifier); ``estimator="cv"`` adds the output layer's exact Hessian block as
            a control variate.
        lam_schedule: λ over the steps: a :mod:`flatness.schedules` schedule or its short form
            (``"warmup:0.1+cosine"``, fractions of ``total_steps``); ``lam`` is the peak.
        lam_control: an adaptive λ (:mod:`flatness.lam_control`): ``"ratio[:ρ[:β]]"``,
            ``"spike[:FACTOR[:BOOST]]"`` or a :class:`flatness.schedules.LamPolicy`.
        total_steps: the length of the run in steps (for a text ``lam_schedule``).

    After a curvature pass ``last_sq_trace`` holds the Tr(H²) estimate, ``last_lam`` the λ
    applied and ``last_penalty`` the value added to the loss (a curvature step reads its
    estimate on the host once, for the non-finite guard; other steps never do). ``policy`` is
    the λ-policy, ``estimator`` the :class:`~flatness.estimators.Estimator`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        lam: float = 0.01,
        probes: int = 5,
        every: int = 1,
        dist: Distribution = "rademacher",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sub_batch: int | float | None = None,
        eval_during_curvature: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        params: Sequence[Tensor] | None = None,
        backend: Literal["auto", "autograd", "layerwise", "finite-difference", "kfac"] = "auto",
        estimator: Literal["hutchinson", "cv"] = "hutchinson",
        fd_step: float | tuple[float, float] | None = None,
        lam_schedule: Any = None,
        lam_control: Any = None,
        total_steps: int | None = None,
    ) -> None:
        # each argument is validated by its user: λ, k by the policy, M by the estimator, the rest here
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        check_sub_batch(sub_batch)
        self.policy = make_policy(lam, every, lam_schedule, lam_control, total_steps)
        self._varying_lam = lam_schedule is not None or lam_control is not None  # else the run's settings hold λ
        # a ModelLoss: the model and the loss as one module; local_model: what the passes run (adapt_wrapped)
        self.model_loss = loss_fn if isinstance(loss_fn, ModelLoss) else None
        self.model, self.loss_fn, self.local_model = adapt_wrapped(model, loss_fn)
        self.on_nonfinite, self.backend, self.sub_batch = on_nonfinite, backend, sub_batch
        self.estimator = make_estimator(  # it holds the probes
            backend, estimator, self.local_model, self.loss_fn, params=params, probes=probes, dist=dist,
            generator=make_generator(seed, generator), dropout=not eval_during_curvature, fd_step=fd_step,
        )
        self._precision = PassPrecision()  # under autocast: flatness.precision
        self.calls, self._prefix = 0, PrefixSlot()  # _prefix: what sharing() recorded for the next call
        self.last_sq_trace: float | None = None  # and last_penalty, last_lam: floats after a pass
        self.last_penalty = self.last_lam = self.last_sq_trace
        self._remove_hook: Callable[[], None] | None = None

    @property
    def params(self) -> list[Tensor]:
        """The penalised parameters (``params`` as given, else the model's trainable ones)."""
        return self.estimator.parameters()

    probes = property(lambda self: self.estimator.probes, doc="M, the probes per curvature pass.")

    @property
    def generator(self) -> torch.Generator | None:
        """The probes' generator (``None``: torch's global one)."""
        return self.estimator.generator

    @property
    def _layerwise_agrees(self) -> bool | None:
        return self.estimator.state_dict().get("layerwise_agrees")

    _shared = property(lambda self: self._prefix.prefix, doc="What :meth:`sharing` recorded for the next call.")

    def is_active(self, call: int | None = None) -> bool:
        """Whether call number ``call`` (default: the next one) computes the curvature term."""
        return self.policy.decide(self.calls if call is None else call).active

    def __call__(self, x: Any, y: Any = None, *, log: dict[str, float] | None = None) -> Tensor:
        """The penalty for this mini-batch: λ·Tr(H²)/B with graph, or an exact zero.

        ``penalty(batch)`` with a :class:`flatness.ModelLoss`. ``log`` receives the floats of the
        step's λ decision (``lam`` when λ varies, a controller's).
        """
        x, y = call_pair(self.model_loss, x, y)
        return self._penalty(x, y, self._prefix.take(x), log)

    def shares_task_gradient(self) -> bool:
        """Whether :meth:`objective` takes this step's g(θ) from the task pass (see there)."""
        return (
            Share.TASK_GRADIENT in self.estimator.ready() and self.is_active() and self.sub_batch is None
            and not self.policy.needs_grad_norms and self.model is self.local_model
        )

    def objective(self, x: Any, y: Any = None, *, log: dict[str, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(task_loss, task_loss + self(x, y))`` on this mini-batch, the second to back-propagate.

        ``objective(batch)`` with a :class:`flatness.ModelLoss`.

        The task loss is ``loss_fn(model(x), y)`` in the model's current modes. An estimator that
        shares the task gradient (``"finite-difference"``) takes g(θ) from it when
        :meth:`shares_task_gradient` (one gradient evaluation fewer); the sum is then a surrogate.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            >>> penalty = FlatnessPenalty(model, torch.nn.CrossEntropyLoss(), backend="finite-difference", seed=0)
            >>> loss, total = penalty.objective(torch.randn(16, 4), torch.randint(0, 3, (16,)))
            >>> total.backward()
        """
        x, y = call_pair(self.model_loss, x, y)
        if not self.shares_task_gradient():
            loss = self.loss_fn(call_model(self.model, x), y)
            return loss, loss + self._penalty(x, y, self._prefix.take(x), log)
        task = self.estimator.task_pass(x, y)
        penalty = self._penalty(x, y, task, log)
        return task.loss.detach(), task.surrogate() + penalty

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """Around the task loss's forward pass: the next call reuses its first layers.

        Recorded for an estimator that takes it (:meth:`flatness.estimators.Estimator.ready`): the output of the
        model's leading mode-independent modules (:func:`flatness.linear_io.share_prefix`), used
        only by a call on the very input tensor and only while it is not stale
        (:meth:`flatness.linear_io.SharedPrefix.stale`: else recomputed, with a warning).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
            >>> penalty = FlatnessPenalty(model, nn.CrossEntropyLoss(), lam=0.01, seed=0)
            >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            >>> for _ in range(2):  # the first call checks the closed form against autograd
            ...     with penalty.sharing():
            ...         loss = nn.functional.cross_entropy(model(x), y)
            ...     (loss + penalty(x, y)).backward()
        """
        self._prefix.prefix = None
        wanted = self.estimator.ready() & (Share.FIRST_LAYER | Share.PREFIX)
        if not wanted or not self.is_active() or self.model is not self.local_model:
            yield
            return
        with self._prefix.record(self.local_model):
            yield

    sharing_first_layer = sharing  # its former name

    def _penalty(self, x: Any, y: Any, shared: Shared | None, log: dict[str, float] | None) -> Tensor:
        full_batch = batch_size_of(self.local_model, x)  # B: a ModelLoss may say it
        if full_batch == 0:
            raise ValueError("empty batch: x holds no samples")
        step = self.calls
        decision = self.policy.decide(step)
        self.calls += 1
        params = self.params
        if not params:
            raise ValueError("the model has no parameters that require grad")
        if not decision.active:
            return torch.zeros((), device=params[0].device, dtype=params[0].dtype)
        cx, cy, shared = self._curvature_batch(x, y, shared)
        estimated = estimate(self.estimator, cx, cy, shared, precision=self._precision)
        lam, value = decision.lam, estimated.detach()
        # The step's one host read: the guard must decide before the optimizer steps, and the
        # same read gives the logged floats. λ·Tr(H²)/B in the estimate's dtype: it may overflow
        # float32 where Tr(H²) does not.
        sq_trace, penalty_value = torch.stack([value, lam * value / full_batch]).tolist()
        if not (math.isfinite(sq_trace) and math.isfinite(penalty_value)):
            return self._non_finite(sq_trace, penalty_value, params[0])
        retain = shared is not None  # the shared layers' graph is the task loss's too
        penalty, lam, self._remove_hook = apply_lam(
            self.policy, step, lam, estimated / full_batch, sq_trace, params, retain_graph=retain, log=log,
            pending=self._remove_hook,
        )
        if log is not None and self._varying_lam:
            log["lam"] = lam
        self.last_sq_trace, self.last_penalty, self.last_lam = sq_trace, lam * sq_trace / full_batch, lam
        return penalty

    def _curvature_batch(self, x: Any, y: Any, shared: Shared | None) -> tuple[Any, Any, Shared | None]:
        """The batch of the curvature pass: the first ``sub_batch`` rows (the divisor stays B)."""
        if self.sub_batch is None:
            return x, y, shared
        n = sub_batch_size(self.sub_batch, batch_size(x))
        cx, cy = take_first(x, n), take_first(y, n)
        if isinstance(shared, SharedPrefix) and cx is not x:
            shared = shared.first_rows(cx)  # a sub-batch: the first rows of the shared prefix
        return cx, cy, shared

    def _non_finite(self, value: float, penalty: float, ref: Tensor) -> Tensor:
        """The guard: raise, or warn and return an exact zero (``on_nonfinite="skip"``)."""
        what, shown = ("Tr(H²) estimate", value) if not math.isfinite(value) else ("penalty λ·Tr(H²)/B", penalty)
        message = (f"non-finite {what} ({shown}) at call {self.calls - 1}; "
                   "lower the learning rate or λ, or pass on_nonfinite='skip'")
        if self.on_nonfinite == "raise":
            raise NonFiniteCurvatureError(message)
        warnings.warn(message + " (step skipped)", RuntimeWarning, stacklevel=4)
        return torch.zeros((), device=ref.device, dtype=ref.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The state to resume a run exactly: the calls, the generator, the estimator's and the λ-policy's."""
        return {
            "calls": self.calls,
            "generator": generator_state(self.generator),
            "last_sq_trace": self.last_sq_trace,
            **self.estimator.state_dict(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (resume a run exactly)."""
        self.calls = int(state["calls"])
        self.estimator.generator = restore_generator(self.generator, state.get("generator"))
        self.last_sq_trace = state.get("last_sq_trace")
        self.estimator.load_state_dict(state)
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])

    def __repr__(self) -> str:
        return (f"FlatnessPenalty({self.estimator!r}, backend={self.backend!r}, estimator={self.estimator.name!r}, "
                f"sub_batch={self.sub_batch}, policy={self.policy!r})")
