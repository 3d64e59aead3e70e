r"""Adaptive λ: controllers that set the penalty strength from what training measures.

Both implement the λ-policy interface of :class:`flatness.schedules.ScheduledLam`:
:meth:`~flatness.schedules.ScheduledLam.decide` before a step (λ and whether the curvature
pass runs), :meth:`~flatness.schedules.ScheduledLam.update` with the measurements of an active
step (returns the λ applied on that step), a decision ``log``, and explicit state
(:meth:`~flatness.schedules.ScheduledLam.state_dict` /
:meth:`~flatness.schedules.ScheduledLam.load_state_dict`).

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
from typing import Any

from .schedules import LOG_LENGTH, Constant, Decision, Schedule, ScheduledLam, parse_schedule

__all__ = ["CurvatureSpikeController", "GradRatioController", "make_policy", "parse_controller"]


def _positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (math.isinf(value) and not allow_inf) or math.isnan(value):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _interval(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class GradRatioController:
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
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LENGTH)
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

    def pop_log(self) -> list[dict[str, Any]]:
        """The decisions logged since the last call (e.g. one epoch's, for the run record)."""
        out, self.log = list(self.log), deque(maxlen=LOG_LENGTH)
        return out

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


class CurvatureSpikeController:
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
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LENGTH)

    @property
    def lam(self) -> float:
        """The λ of the next active step (the base λ, times ``boost`` while boosted)."""
        return self.base_lam * (self.boost if self.boosted else 1.0)

    def decide(self, step: int) -> Decision:
        """Active once ``step`` reaches ``next_active`` (set by :meth:`update`), at the current λ."""
        active = self.base_lam > 0 and step >= self.next_active
        return Decision(step, self.lam, active, f"every {self.interval}")

    def update(self, step: int, *, sq_trace: float, **measurements: float) -> float:
        """Classify this step's estimate, set the next active step; return this step's λ."""
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

    def pop_log(self) -> list[dict[str, Any]]:
        """The decisions logged since the last call (e.g. one epoch's, for the run record)."""
        out, self.log = list(self.log), deque(maxlen=LOG_LENGTH)
        return out

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


def make_policy(
    lam: float,
    every: int = 1,
    lam_schedule: str | Schedule | None = None,
    lam_control: str | Any | None = None,
    total_steps: int | None = None,
) -> Any:
    """The λ-policy of a penalty: a fixed λ, a schedule, or a controller (one of them).

    ``lam_schedule`` as text (:func:`flatness.schedules.parse_schedule`) needs ``total_steps``;
    ``lam_control`` as text: :func:`parse_controller`; objects are used as given. λ = 0 is
    never active, whatever else is asked.
    """
    if lam_schedule is not None and lam_control is not None:
        raise ValueError("give a λ schedule or a λ controller, not both")
    if lam == 0:
        return ScheduledLam(Constant(0.0), every)
    if lam_control is not None:
        return parse_controller(lam_control, lam, every) if isinstance(lam_control, str) else lam_control
    if isinstance(lam_schedule, str):
        if total_steps is None:
            raise ValueError(
                f"the λ schedule {lam_schedule!r} needs total_steps, the length of the run in steps"
            )
        return ScheduledLam(parse_schedule(lam_schedule, lam, total_steps), every)
    return ScheduledLam(Constant(lam) if lam_schedule is None else lam_schedule, every)
