r"""Schedules of the penalty strength λ over optimisation steps, and the policy that applies one.

A schedule is a pure function of the step, :math:`\lambda(t)`, optax style: the position lives
with its caller (the penalty counts its calls), so a schedule has no state of its own.

- :class:`Constant`: :math:`\lambda(t) = \lambda`.
- :class:`WarmUp`: 0 before ``start``, then linear from 0 to λ over ``steps`` steps. While
  λ(t) = 0 the curvature pass is skipped, so the warm-up costs nothing.
- :class:`Cosine`: from ``start_lam`` to ``end_lam`` along a half cosine over ``steps`` steps
  (decay when ``end_lam < start_lam``, a smooth ramp when greater), then ``end_lam``.
- :class:`Step`: λ·factorⁿ, n the number of milestones ≤ t.
- :class:`Join`: schedule i from boundary i on, counted from that boundary
  (``optax.join_schedules``).

:func:`parse_schedule` reads the short form (``"warmup:0.2+cosine"``, fractions of the run).
:class:`LamPolicy` declares the λ-policy interface that the penalty calls (a :class:`Decision`
per step, explicit state, a decision log); :class:`ScheduledLam` implements it for a schedule
and the controllers of :mod:`flatness.lam_control` for adaptive λ, all keeping their log through
the one :class:`DecisionLog`.

Example:
    >>> from flatness.schedules import Cosine, Join, WarmUp, parse_schedule
    >>> warm = WarmUp(0.01, steps=100)
    >>> warm(0), warm(50), warm(500)
    (0.0, 0.005, 0.01)
    >>> sched = Join([WarmUp(0.01, 100), Cosine(0.01, 0.0, 900)], boundaries=[100])
    >>> round(sched(100), 6), round(sched(550), 6), sched(1000)
    (0.01, 0.005, 0.0)
    >>> parse_schedule("warmup:0.1+cosine", lam=0.01, total_steps=1000)(550) == sched(550)
    True
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Constant",
    "Cosine",
    "Decision",
    "DecisionLog",
    "Join",
    "LamPolicy",
    "Schedule",
    "ScheduledLam",
    "Step",
    "WarmUp",
    "parse_schedule",
]


LOG_LENGTH = 4096  # decisions kept in a policy's log (the oldest go first); pop_log() drains it


class Schedule(Protocol):
    """λ as a function of the 0-based optimisation step."""

    def __call__(self, step: int) -> float:
        """λ at the 0-based optimisation ``step``."""


def _check_lam(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_steps(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Constant:
    """λ(t) = lam."""

    lam: float

    def __post_init__(self) -> None:
        _check_lam("lam", self.lam)

    def __call__(self, step: int) -> float:
        """λ = lam at every step."""
        return float(self.lam)


@dataclass(frozen=True)
class WarmUp:
    """0 before ``start``; then lam·(t − start)/steps, reaching lam at t = start + steps."""

    lam: float
    steps: int
    start: int = 0

    def __post_init__(self) -> None:
        _check_lam("lam", self.lam)
        _check_steps("steps", self.steps, 1)
        _check_steps("start", self.start)

    def __call__(self, step: int) -> float:
        """λ at ``step``: 0 before ``start``, then rising linearly to lam."""
        progress = (step - self.start) / self.steps
        return float(self.lam) * min(1.0, max(0.0, progress))


@dataclass(frozen=True)
class Cosine:
    """end + (start − end)·(1 + cos(π·min(t, steps)/steps))/2."""

    start_lam: float
    end_lam: float
    steps: int

    def __post_init__(self) -> None:
        _check_lam("start_lam", self.start_lam)
        _check_lam("end_lam", self.end_lam)
        _check_steps("steps", self.steps, 1)

    def __call__(self, step: int) -> float:
        """λ at ``step`` on the cosine from ``start_lam`` to ``end_lam``."""
        progress = min(1.0, max(0.0, step / self.steps))
        return self.end_lam + (self.start_lam - self.end_lam) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Step:
    """lam·factorⁿ with n = #{milestones ≤ t} (factor < 1 decays, > 1 raises)."""

    lam: float
    milestones: tuple[int, ...]
    factor: float = 0.1

    def __post_init__(self) -> None:
        _check_lam("lam", self.lam)
        _check_lam("factor", self.factor)
        if list(self.milestones) != sorted(self.milestones) or any(
            _check_steps("milestone", m) != m for m in self.milestones
        ):
            raise ValueError(f"milestones must be increasing integers >= 0, got {self.milestones!r}")

    def __call__(self, step: int) -> float:
        """λ at ``step``: lam times ``factor`` for each milestone passed."""
        return float(self.lam) * self.factor ** bisect.bisect_right(self.milestones, step)


@dataclass(frozen=True)
class Join:
    """``schedules[i]`` from ``boundaries[i-1]`` on, evaluated at t − boundaries[i-1]."""

    schedules: Sequence[Schedule]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError("Join needs exactly one boundary fewer than schedules")
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"boundaries must be increasing, got {list(self.boundaries)}")

    def __call__(self, step: int) -> float:
        """The value of the schedule whose segment holds ``step``, counted from the segment's start."""
        i = bisect.bisect_right(self.boundaries, step)
        offset = self.boundaries[i - 1] if i > 0 else 0
        return self.schedules[i](step - offset)


def _steps_of(text: str, total_steps: int, what: str) -> int:
    """A step count: an int as is, a fraction in (0, 1] of the run."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {text!r}") from None
    if 0 < value <= 1 and "." in text:
        return max(1, round(value * total_steps))
    if value != int(value) or value < 0:
        raise ValueError(f"{what}: expected a fraction in (0, 1] or a step count, got {text!r}")
    return int(value)


def _schedule_part(part: str, lam: float, total_steps: int, start: int, last: bool) -> tuple[Schedule, int | None]:
    """One part of :func:`parse_schedule`'s short form, starting at ``start``, and its length (``None``: to the end)."""
    name, *args = part.split(":")
    if name == "constant" and not args:
        return Constant(lam), None
    if name in ("warmup", "delay") and len(args) == 1:
        length = _steps_of(args[0], total_steps, f"{name} length")
        if length < 1:
            raise ValueError(f"{name} length must be >= 1 step")
        return (WarmUp(lam, length) if name == "warmup" else Constant(0.0)), length
    if name == "cosine" and len(args) <= 1 and last:
        final = float(args[0]) if args else 0.0
        return Cosine(lam, final * lam, max(1, total_steps - start)), None
    if name == "step" and 1 <= len(args) <= 2:
        milestones = tuple(_steps_of(m, total_steps, "milestone") for m in args[0].split(","))
        return Step(lam, milestones, float(args[1]) if len(args) == 2 else 0.1), None
    raise ValueError(
        f"unknown λ schedule part {part!r}; expected constant, warmup:S, delay:S, "
        "cosine[:END] (last) or step:M1,M2[:F]"
    )


def parse_schedule(spec: str, lam: float, total_steps: int) -> Schedule:
    """A schedule from its short form, peak λ ``lam``, for a run of ``total_steps`` steps.

    Parts joined by ``+`` run one after another; step counts are integers or fractions of the
    run (a number with a decimal point in (0, 1]):

    - ``constant``;
    - ``warmup:S`` — linear from 0 to λ over S;
    - ``delay:S`` — λ = 0 (no curvature pass) for S steps;
    - ``cosine[:END]`` — half-cosine decay from λ to END·λ (default 0) over the remaining steps;
    - ``step:M1,M2,...[:F]`` — λ multiplied by F (default 0.1) at each milestone (from the
      part's own start).

    The last part runs to the end of the run; only it may be ``cosine``.
    """
    _check_lam("lam", lam)
    _check_steps("total_steps", total_steps, 1)
    parts = [p.strip() for p in spec.split("+")]
    if not spec.strip() or any(not p for p in parts):
        raise ValueError(f"empty λ schedule part in {spec!r}")
    schedules: list[Schedule] = []
    boundaries: list[int] = []
    start = 0
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        schedule, length = _schedule_part(part, lam, total_steps, start, last)
        schedules.append(schedule)
        if length is None and not last:
            raise ValueError(f"λ schedule part {part!r} has no length: it must come last")
        if not last:
            start += length  # type: ignore[operator]
            boundaries.append(start)
    if start >= total_steps and len(parts) > 1:
        raise ValueError(f"λ schedule {spec!r} is longer than the run ({total_steps} steps)")
    return schedules[0] if len(schedules) == 1 else Join(schedules, boundaries)


@dataclass(frozen=True)
class Decision:
    """What a λ-policy decided for one step: λ, whether the curvature pass runs, and why."""

    step: int
    lam: float
    active: bool
    reason: str
    data: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The decision as a flat dict (its ``data`` merged in), one entry of the λ log."""
        return {"step": self.step, "lam": self.lam, "active": self.active, "reason": self.reason, **self.data}


@runtime_checkable
class LamPolicy(Protocol):
    """The λ-policy interface of :class:`flatness.FlatnessPenalty` (optax style: declared state).

    - :meth:`decide` before a step: λ and whether the curvature pass runs;
    - :meth:`update` after an active step's curvature quantities are known, with keyword
      measurements — ``sq_trace`` (the estimate, a detached 0-d tensor: read it only if the
      policy needs it, every read waits for the device), or with ``needs_grad_norms`` the two
      floats ``task_grad_norm`` and ``penalty_grad_norm`` — returns the λ applied on that step;
    - ``needs_grad_norms``: declares which of the two :meth:`update` takes;
    - ``log``, :meth:`pop_log`: the decisions (:class:`DecisionLog`);
    - :meth:`state_dict` / :meth:`load_state_dict`: everything needed to resume exactly.
    """

    needs_grad_norms: bool
    log: deque[dict[str, Any]]

    def decide(self, step: int) -> Decision:
        """λ at ``step`` and whether the curvature pass runs."""
        ...

    def update(self, step: int, **measurements: Any) -> float:
        """Take an active step's measurements; return the λ applied on that step."""
        ...

    def pop_log(self) -> list[dict[str, Any]]:
        """The decisions logged since the last call."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The policy's running state, to resume a run exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`."""
        ...


class DecisionLog:
    """The decision log of a λ-policy: ``log`` and :meth:`pop_log`.

    ``log`` holds the last :data:`LOG_LENGTH` decisions, the oldest first; every policy here keeps
    its log through this class.
    """

    def __init__(self) -> None:
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LENGTH)

    def pop_log(self) -> list[dict[str, Any]]:
        """The decisions logged since the last call (e.g. one epoch's, for the run record)."""
        out, self.log = list(self.log), deque(maxlen=LOG_LENGTH)
        return out


class ScheduledLam(DecisionLog):
    """The λ-policy of a fixed schedule: λ = schedule(t); the pass runs when λ > 0 and t % every == 0.

    Implements :class:`LamPolicy`; the log holds the decisions of active steps and of every
    change of activity; :meth:`update` returns the schedule's value (it needs no measurement).

    Example:
        >>> from flatness.schedules import ScheduledLam, WarmUp
        >>> policy = ScheduledLam(WarmUp(1.0, steps=4))
        >>> [(d.lam, d.active) for d in map(policy.decide, range(3))]
        [(0.0, False), (0.25, True), (0.5, True)]
    """

    needs_grad_norms = False

    def __init__(self, schedule: Schedule, every: int = 1) -> None:
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                f"lam_schedule must be a schedule (a function of the step) or its short form, got {schedule!r}"
            )
        self.schedule = schedule
        self.every = _check_steps("every", every, 1)
        self._was_active: bool | None = None
        self._last_step: int | None = None

    def decide(self, step: int) -> Decision:
        """λ(step) and whether the pass runs; logged once per step (active steps, changes)."""
        lam = float(self.schedule(step))
        active = lam > 0 and step % self.every == 0
        reason = "schedule" if lam > 0 else "schedule: λ = 0"
        decision = Decision(step, lam, active, reason)
        if step != self._last_step:
            if active or active != self._was_active:
                self.log.append(decision.as_dict())
            self._was_active, self._last_step = active, step
        return decision

    def update(self, step: int, **measurements: Any) -> float:
        """λ for an active step: the schedule's value (measurements are not used)."""
        return float(self.schedule(step))

    def state_dict(self) -> dict[str, Any]:
        """The last step seen and whether it was active (for the log), to resume a run exactly."""
        return {"was_active": self._was_active, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`."""
        self._was_active = state.get("was_active")
        self._last_step = state.get("last_step")

    def __repr__(self) -> str:
        return f"ScheduledLam({self.schedule!r}, every={self.every})"
