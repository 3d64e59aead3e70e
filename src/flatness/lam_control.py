r"""Adaptive λ: controllers that set the penalty strength from what training measures.

Both implement the λ-policy interface :class:`flatness.schedules.LamPolicy`:
:meth:`~flatness.schedules.LamPolicy.decide` before a step (λ and whether the curvature pass
runs), :meth:`~flatness.schedules.LamPolicy.update` with the measurements of an active step
(returns the λ applied on that step), a decision ``log``, and explicit state
(:meth:`~flatness.schedules.LamPolicy.state_dict` /
:meth:`~flatness.schedules.LamPolicy.load_state_dict`). :func:`make_policy` builds a penalty's
policy and validates its arguments (also for λ = 0, where the policy is never active);
:func:`apply_lam` applies a policy on an active step of the penalty, measuring the gradient
norms (:func:`grad_norm_surrogate`) for a policy that ``needs_grad_norms``.

**Gradient-ratio controller** (:class:`GradRatioController`). With :math:`g_L = \nabla L_\text{task}`
and :math:`g_P = \nabla(\operatorname{Tr}(H^2)/B)` (the penalty's gradient at λ = 1) on an
active step, it applies

.. math::

    \lambda_t = \operatorname{clip}\Bigl(\exp\bigl(\widehat{\mathbb{E}}_\beta
        \log \tfrac{\rho \lVert g_L\rVert}{\lVert g_P\rVert}\bigr),
        \lambda_\text{min}, \lambda_\text{max}\Bigr),

a bias-corrected exponential moving average (factor β) of the log of the λ that would make
:math:`\lVert \lambda g_P \rVert = \rho \lVert g_L \rVert` exactly. The log makes the average a
geometric mean, which suits a ratio that spans orders of magnitude and a Hutchinson noise that
is multiplicative. Why it is cheap: the curvature pass builds its graph from its own forward
pass, so the task graph and the penalty graph are disjoint, and back-propagating them
separately (two ``autograd.grad`` calls, then ``g_L + λ g_P``) does the same work as one
``backward()`` of their sum; the extra work is two norms and one axpy over the parameters —
O(d) against the O(B·d) of a backward — and no extra forward or Hessian-vector product. λ is
set after this step's gradients are known, so the ratio holds from the first active step on.

**Curvature-spike controller** (:class:`CurvatureSpikeController`). On every active step it
compares the Tr(H²) estimate s with the median of the last ``window`` estimates. If
s > factor·median it is a spike: the pass runs every ``every_min`` steps from then on and λ is
multiplied by ``boost`` (applied on this step already); otherwise it backs off: the interval
doubles up to ``every_max`` and λ returns to its base value. The estimate comes from the
penalty's own pass, so the controller costs nothing beyond the passes it schedules.

Example:
    >>> from flatness.lam_control import CurvatureSpikeController, GradRatioController
    >>> ratio = GradRatioController(target=0.5, smoothing=0.0)
    >>> ratio.decide(0).active
    True
    >>> round(ratio.update(0, task_grad_norm=2.0, penalty_grad_norm=10.0), 12)  # λ·10 = 0.5·2
    0.1
    >>> spike = CurvatureSpikeController(lam=0.01, factor=3.0, window=5, every_max=4)
    >>> for step in range(40):
    ...     d = spike.decide(step)
    ...     if d.active:
    ...         lam = spike.update(step, sq_trace=100.0 if step != 31 else 1000.0)
    >>> [(e["step"], e["reason"]) for e in spike.log if e["reason"].startswith("spike")]
    [(31, 'spike: 10.0× the median')]
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .schedules import Constant, Decision, DecisionLog, LamPolicy, Schedule, ScheduledLam, parse_schedule

__all__ = [
    "CurvatureSpikeController",
    "GradRatioController",
    "apply_lam",
    "decision_log",
    "grad_norm_surrogate",
    "make_policy",
    "parse_controller",
]


def _positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (math.isinf(value) and not allow_inf) or math.isnan(value):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _interval(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class GradRatioController(DecisionLog):
    """λ such that the penalty's gradient norm is ``target`` × the task gradient's.

    Args:
        target: ρ > 0, the wanted ‖λ g_P‖ / ‖g_L‖ on active steps.
        every: the curvature pass runs on steps 0, k, 2k, ...
        smoothing: β in [0, 1): EMA factor over active steps of log λ (0: this step's ratio).
        lam_min, lam_max: clip λ to this range (``lam_max`` caps a nominal strength: "λ, but
            never a penalty gradient above ρ‖g_L‖" is ``lam_max=λ``).
        log_every: keep one decision in the log per this many active steps (the first always).

    ``needs_grad_norms`` is True: the caller back-propagates the task loss and the unit penalty
    separately and passes both norms to :meth:`update`.
    """

    needs_grad_norms = True

    def __init__(
        self,
        target: float = 0.1,
        every: int = 1,
        smoothing: float = 0.9,
        lam_min: float = 0.0,
        lam_max: float = math.inf,
        log_every: int = 1,
    ) -> None:
        super().__init__()
        self.target = _positive("target", target)
        self.every = _interval("every", every)
        if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        if not (isinstance(lam_min, (int, float)) and 0 <= lam_min < math.inf):
            raise ValueError(f"lam_min must be a finite number >= 0, got {lam_min!r}")
        self.lam_min = float(lam_min)
        self.lam_max = _positive("lam_max", lam_max, allow_inf=True)
        if self.lam_min > self.lam_max:
            raise ValueError(f"lam_min ({lam_min}) must not exceed lam_max ({lam_max})")
        self.log_every = _interval("log_every", log_every)
        self._log_mean = 0.0  # β-EMA of log λ*, before bias correction
        self._weight = 0.0  # β-EMA of 1 (the bias correction)
        self.lam = self.lam_min  # last applied λ
        self.updates = 0

    def decide(self, step: int) -> Decision:
        """Active on every ``every``-th step; λ is only known after :meth:`update`."""
        return Decision(step, self.lam, step % self.every == 0, "ratio")

    def update(
        self,
        step: int,
        *,
        task_grad_norm: float,
        penalty_grad_norm: float,
        **measurements: float,
    ) -> float:
        """Fold this step's ratio into the average; return the λ to apply on this step."""
        task, pen = float(task_grad_norm), float(penalty_grad_norm)
        if not (math.isfinite(task) and math.isfinite(pen)) or task < 0 or pen < 0:
            reason = "ratio: non-finite gradient norm, λ kept"
        elif pen == 0 or task == 0:
            reason = "ratio: a zero gradient norm, λ kept"
        else:
            raw = self.target * task / pen
            self._log_mean = self.smoothing * self._log_mean + (1 - self.smoothing) * math.log(raw)
            self._weight = self.smoothing * self._weight + (1 - self.smoothing)
            self.lam = min(self.lam_max, max(self.lam_min, math.exp(self._log_mean / self._weight)))
            reason = "ratio"
            if self.lam == self.lam_max and raw > self.lam_max:
                reason = "ratio: clipped at lam_max"
        if self.updates % self.log_every == 0 or reason != "ratio":
            self.log.append(
                Decision(
                    step, self.lam, True, reason,
                    {"task_grad_norm": task, "penalty_grad_norm": pen},
                ).as_dict()
            )
        self.updates += 1
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        """The controller's running state, to resume a run exactly."""
        return {
            "log_mean": self._log_mean,
            "weight": self._weight,
            "lam": self.lam,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`."""
        self._log_mean = float(state["log_mean"])
        self._weight = float(state["weight"])
        self.lam = float(state["lam"])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (
            f"GradRatioController(target={self.target}, every={self.every}, "
            f"smoothing={self.smoothing}, lam_min={self.lam_min}, lam_max={self.lam_max})"
        )


class CurvatureSpikeController(DecisionLog):
    """Run the pass more often and raise λ when Tr(H²) jumps above its running median.

    Args:
        lam: the base λ.
        factor: a spike is an estimate above ``factor`` × the median of the last ``window``.
        window: how many past estimates the median looks at.
        min_history: estimates needed before spikes are looked for (the pass runs every
            ``every_min`` steps until then).
        every_min, every_max: the interval of the pass right after a spike / at most.
        boost: λ is ``lam × boost`` after a spike, back to ``lam`` once the estimates are calm.
    """

    needs_grad_norms = False

    def __init__(
        self,
        lam: float,
        factor: float = 2.0,
        window: int = 20,
        min_history: int = 5,
        every_min: int = 1,
        every_max: int = 16,
        boost: float = 2.0,
    ) -> None:
        super().__init__()
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        self.base_lam = float(lam)
        self.factor = _positive("factor", factor)
        if self.factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.window = _interval("window", window)
        self.min_history = _interval("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError("min_history must not exceed window")
        self.every_min = _interval("every_min", every_min)
        self.every_max = _interval("every_max", every_max)
        if self.every_min > self.every_max:
            raise ValueError("every_min must not exceed every_max")
        self.boost = _positive("boost", boost)
        self.history: deque[float] = deque(maxlen=self.window)
        self.interval = self.every_min
        self.next_active = 0
        self.boosted = False

    @property
    def lam(self) -> float:
        """The λ of the next active step (the base λ, times ``boost`` while boosted)."""
        return self.base_lam * (self.boost if self.boosted else 1.0)

    def decide(self, step: int) -> Decision:
        """Active once ``step`` reaches ``next_active`` (set by :meth:`update`), at the current λ."""
        active = self.base_lam > 0 and step >= self.next_active
        return Decision(step, self.lam, active, f"every {self.interval}")

    def update(self, step: int, *, sq_trace: float | Tensor, **measurements: Any) -> float:
        """Classify this step's estimate, set the next active step; return this step's λ.

        It reads the estimate on the host (a spike decides the next step's schedule).
        """
        value = float(sq_trace)
        data: dict[str, float] = {"sq_trace": value}
        if not math.isfinite(value):
            reason = "non-finite estimate: interval kept"
        elif len(self.history) < self.min_history:
            reason = "collecting history"
            self.history.append(value)
        else:
            median = statistics.median(self.history)
            data["median"] = median
            self.history.append(value)
            if median > 0 and value > self.factor * median:
                self.interval, self.boosted = self.every_min, True
                reason = f"spike: {value / median:.1f}× the median"
            else:
                self.interval = min(self.every_max, 2 * self.interval)
                self.boosted = False
                reason = "calm: back off"
        self.next_active = step + self.interval
        data["next_interval"] = float(self.interval)
        self.log.append(Decision(step, self.lam, True, reason, data).as_dict())
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        """The controller's running state, to resume a run exactly."""
        return {
            "history": list(self.history),
            "interval": self.interval,
            "next_active": self.next_active,
            "boosted": self.boosted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`."""
        self.history = deque((float(v) for v in state["history"]), maxlen=self.window)
        self.interval = int(state["interval"])
        self.next_active = int(state["next_active"])
        self.boosted = bool(state["boosted"])

    def __repr__(self) -> str:
        return (
            f"CurvatureSpikeController(lam={self.base_lam}, factor={self.factor}, "
            f"window={self.window}, every_min={self.every_min}, every_max={self.every_max}, "
            f"boost={self.boost})"
        )


def parse_controller(spec: str, lam: float, every: int = 1) -> GradRatioController | CurvatureSpikeController:
    """A controller from its short form; ``lam`` and ``every`` are the penalty's λ and interval.

    - ``ratio[:TARGET[:SMOOTHING]]``: :class:`GradRatioController` with ``lam_max = lam`` (λ
      never exceeds the given strength), target ρ (default 0.1), smoothing β (default 0.9);
    - ``spike[:FACTOR[:BOOST]]``: :class:`CurvatureSpikeController` with base λ = ``lam``,
      factor (default 2), boost (default 2), the pass every step after a spike and at most
      every ``every`` steps when calm.
    """
    name, *args = spec.split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"λ controller {spec!r}: its arguments must be numbers") from None
    if name == "ratio" and len(values) <= 2:
        target = values[0] if values else 0.1
        smoothing = values[1] if len(values) > 1 else 0.9
        return GradRatioController(target, every=every, smoothing=smoothing, lam_max=lam)
    if name == "spike" and len(values) <= 2:
        factor = values[0] if values else 2.0
        boost = values[1] if len(values) > 1 else 2.0
        return CurvatureSpikeController(lam, factor=factor, every_max=every, boost=boost)
    raise ValueError(
        f"unknown λ controller {spec!r}; expected ratio[:TARGET[:SMOOTHING]] or spike[:FACTOR[:BOOST]]"
    )


def _validated_schedule(lam_schedule: str | Schedule, lam: float, every: int, total_steps: int | None) -> ScheduledLam:
    if isinstance(lam_schedule, str):
        if total_steps is None:
            raise ValueError(
                f"lam_schedule {lam_schedule!r} needs total_steps, the length of the run in steps"
            )
        try:
            lam_schedule = parse_schedule(lam_schedule, lam, total_steps)
        except ValueError as exc:
            raise ValueError(f"lam_schedule: {exc}") from None
    return ScheduledLam(lam_schedule, every)


def _validated_controller(lam_control: str | LamPolicy, lam: float, every: int) -> LamPolicy:
    if isinstance(lam_control, str):
        try:
            return parse_controller(lam_control, lam, every)
        except ValueError as exc:
            raise ValueError(f"lam_control: {exc}") from None
    if not isinstance(lam_control, LamPolicy):
        raise ValueError(
            "lam_control must be 'ratio[:TARGET[:SMOOTHING]]', 'spike[:FACTOR[:BOOST]]' or a λ-policy "
            f"(flatness.schedules.LamPolicy: decide, update, needs_grad_norms, log, ...), got {lam_control!r}"
        )
    return lam_control


def make_policy(
    lam: float,
    every: int = 1,
    lam_schedule: str | Schedule | None = None,
    lam_control: str | LamPolicy | None = None,
    total_steps: int | None = None,
) -> LamPolicy:
    """The λ-policy of a penalty: a fixed λ, a schedule, or a controller (one of them).

    ``lam_schedule`` as text (:func:`flatness.schedules.parse_schedule`) needs ``total_steps``;
    ``lam_control`` as text: :func:`parse_controller`; objects are used as given. λ = 0 is
    never active, whatever else is asked — but the other arguments are validated all the same
    (as for λ = 1), so that a run at λ = 0 accepts exactly what a run at λ > 0 does. Messages
    name the argument.
    """
    if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (λ) must be a finite number >= 0, got {lam!r}")
    lam = float(lam)
    if lam_schedule is not None and lam_control is not None:
        raise ValueError("give a λ schedule or a λ controller, not both (lam_schedule or lam_control)")
    check = lam if lam > 0 else 1.0  # λ = 0: validated as any λ would be, then not used
    if lam_control is not None:
        policy = _validated_controller(lam_control, check, every)
    elif lam_schedule is not None:
        policy = _validated_schedule(lam_schedule, check, every, total_steps)
    else:
        policy = ScheduledLam(Constant(lam), every)
    return policy if lam > 0 else ScheduledLam(Constant(0.0), every)


def decision_log(policy: LamPolicy, step: int) -> dict[str, float]:
    """The floats a training step logs about ``policy``'s decision at ``step``.

    The spike controller's ``lam_interval`` (the pass's next interval) and ``lam_spike`` (1 on a
    spike).
    """
    entry = policy.log[-1] if policy.log else {}
    if entry.get("step") != step or "next_interval" not in entry:
        return {}
    spike = float(str(entry["reason"]).startswith("spike"))
    return {"lam_interval": float(entry["next_interval"]), "lam_spike": spike}


def _norm(tensors: Sequence[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def grad_norm_surrogate(
    policy: LamPolicy,
    unit: Tensor,
    params: Sequence[Tensor],
    step: int,
    lam: float,
    retain_graph: bool,
    log: dict[str, float] | None,
) -> tuple[Tensor, Callable[[], None]]:
    """λ·P for a policy that ``needs_grad_norms``: value λ·P, gradient λ·g_P; and the remover of the hook it registers.

    g_P = ∇P of the unit penalty P = Tr(H²)/B is computed here, by the backward the penalty
    needs anyway (its graph is its own, so this is no extra work), and enters the loss through a
    surrogate whose gradient is λ·g_P. A hook on the parameters' gradients
    (``register_multi_grad_hook``) reads the step's backward: its gradient minus λ·g_P is the
    task gradient (plus any other term's), whose norm goes to :meth:`LamPolicy.update` with
    ‖g_P‖ — O(d) work, no extra pass. The new λ applies from the next active step. Under DDP the
    hook sees this rank's gradients: each rank's controller follows its own.
    """
    params = list(params)
    grads = torch.autograd.grad(unit, params, allow_unused=True, retain_graph=retain_graph)
    g_pen = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
    pen_norm = _norm(g_pen)
    handle: Any = None

    def hook(step_grads: Sequence[Tensor | None]) -> None:
        remove()
        task = [g - lam * gp for g, gp in zip(step_grads, g_pen, strict=True) if g is not None]
        task_norm = _norm(task) if task else 0.0
        policy.update(step, task_grad_norm=task_norm, penalty_grad_norm=pen_norm)
        if log is not None:
            log["task_grad_norm"] = task_norm
            log["penalty_grad_norm"] = pen_norm

    def remove() -> None:
        nonlocal handle
        if handle is not None:
            handle.remove()
            handle = None

    handle = torch.autograd.graph.register_multi_grad_hook(params, hook, mode="all")
    linear = sum((p * (lam * g)).sum() for p, g in zip(params, g_pen, strict=True))
    return lam * unit.detach() + linear - linear.detach(), remove


def apply_lam(
    policy: LamPolicy,
    step: int,
    lam: float,
    unit: Tensor,
    sq_trace: float,
    params: Sequence[Tensor],
    *,
    retain_graph: bool,
    log: dict[str, float] | None,
    pending: Callable[[], None] | None = None,
) -> tuple[Tensor, float, Callable[[], None] | None]:
    """An active step's penalty from its unit penalty P = Tr(H²)/B: ``(λ·P, λ applied, hook remover)``.

    ``lam`` is ``policy``'s decision for ``step``. A policy that ``needs_grad_norms`` gets its
    measurements from the step's backward (:func:`grad_norm_surrogate`, whose hook remover is
    returned, to pass as the next call's ``pending``: a hook whose backward never came is removed
    first); any other is told the estimate ``sq_trace`` (:meth:`~flatness.schedules.LamPolicy.update`),
    returns the λ applied, and ``log`` receives :func:`decision_log`'s floats.
    """
    if pending is not None:
        pending()
    if policy.needs_grad_norms:
        penalty, remove = grad_norm_surrogate(policy, unit, params, step, lam, retain_graph, log)
        return penalty, lam, remove
    lam = float(policy.update(step, sq_trace=sq_trace))
    if log is not None:
        log.update(decision_log(policy, step))
    return lam * unit, lam, None
