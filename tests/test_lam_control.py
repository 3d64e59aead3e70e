"""λ schedules and adaptive-λ controllers: values by hand, decisions on known sequences, state."""

from __future__ import annotations

import math

import pytest
import torch

from flatness.hutchinson import sq_trace
from flatness.lam_control import CurvatureSpikeController, GradRatioController
from flatness.schedules import (
    Constant,
    Cosine,
    Join,
    ScheduledLam,
    Step,
    WarmUp,
    parse_schedule,
)


def test_schedule_values():
    assert [WarmUp(2.0, 4, start=2)(t) for t in range(8)] == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0]
    cos = Cosine(1.0, 0.0, 10)
    assert cos(0) == 1.0 and cos(10) == 0.0 and cos(99) == 0.0
    assert cos(5) == pytest.approx(0.5)
    ramp = Cosine(0.0, 1.0, 10)  # a cosine ramp up
    assert ramp(0) == 0.0 and ramp(10) == 1.0 and ramp(3) < 0.3
    step = Step(1.0, (3, 6), factor=0.5)
    assert [step(t) for t in (0, 2, 3, 5, 6, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    joined = Join([Constant(0.0), WarmUp(1.0, 2)], boundaries=[3])
    assert [joined(t) for t in range(6)] == [0, 0, 0, 0, 0.5, 1.0]


def test_parse_schedule_forms():
    total = 100
    assert parse_schedule("constant", 0.5, total)(77) == 0.5
    warm = parse_schedule("warmup:0.1", 1.0, total)
    assert warm(5) == 0.5 and warm(10) == 1.0
    assert parse_schedule("warmup:10", 1.0, total)(5) == 0.5  # integer: steps
    delayed = parse_schedule("delay:20+warmup:10+cosine", 1.0, total)
    assert delayed(19) == 0 and delayed(25) == 0.5 and delayed(30) == 1.0 and delayed(100) == 0
    assert delayed(65) == pytest.approx(0.5)  # cosine over the remaining 70 steps
    assert parse_schedule("cosine:0.5", 1.0, total)(100) == 0.5
    assert parse_schedule("step:0.5,0.75:0.1", 1.0, total)(80) == pytest.approx(0.01)
    for bad in ("", "warmup", "cosine+warmup:3", "step:5:0.1+constant", "nope:3", "warmup:-2",
                "warmup:200+cosine", "warmup:2.5"):
        with pytest.raises(ValueError):
            parse_schedule(bad, 1.0, total)


def test_scheduled_policy_skips_zero_lam_and_logs_transitions():
    policy = ScheduledLam(Join([Constant(0.0), Constant(0.3)], [2]), every=2)
    decisions = [policy.decide(t) for t in range(6)]
    assert [d.active for d in decisions] == [False, False, True, False, True, False]
    assert [d.lam for d in decisions] == [0, 0, 0.3, 0.3, 0.3, 0.3]
    log = policy.pop_log()
    assert [e["step"] for e in log] == [0, 2, 3, 4, 5]  # transitions and active steps
    assert log[0]["reason"] == "schedule: λ = 0" and not policy.log


def _quartic(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (c * w**4).sum() / 4  # H = diag(3 c w²): Hutchinson with ±1 probes is exact


def test_grad_ratio_controller_matches_the_hand_computed_ratio():
    c = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    w = torch.tensor([0.7, -1.1, 1.5], dtype=torch.float64, requires_grad=True)
    rho = 0.25
    ctrl = GradRatioController(target=rho, smoothing=0.0)
    assert ctrl.decide(0).active and ctrl.needs_grad_norms
    loss = _quartic(c, w)
    (g_task,) = torch.autograd.grad(loss, w, create_graph=True)
    (g_pen,) = torch.autograd.grad(sq_trace(_quartic(c, w), [w], probes=2, seed=0), w)
    # by hand: g_L = c w³, ∇Tr(H²) = ∇ Σ 9 c² w⁴ = 36 c² w³
    hand_task = c * w.detach() ** 3
    hand_pen = 36 * c**2 * w.detach() ** 3
    assert torch.allclose(g_task.detach(), hand_task) and torch.allclose(g_pen, hand_pen)
    lam = ctrl.update(0, task_grad_norm=float(g_task.detach().norm()), penalty_grad_norm=float(g_pen.norm()))
    assert lam == pytest.approx(rho * float(hand_task.norm() / hand_pen.norm()), rel=1e-12)
    assert float((lam * g_pen).norm()) == pytest.approx(rho * float(g_task.detach().norm()), rel=1e-12)


def test_grad_ratio_controller_smooths_in_log_space_and_clips():
    beta = 0.5
    ctrl = GradRatioController(target=1.0, smoothing=beta, lam_max=5.0, every=3)
    raws = [1.0, 4.0, 2.0]
    lams = [ctrl.update(3 * i, task_grad_norm=r, penalty_grad_norm=1.0) for i, r in enumerate(raws)]
    for n in range(1, 4):  # bias-corrected EMA of log λ*: a weighted geometric mean
        weights = [(1 - beta) * beta ** (n - 1 - i) for i in range(n)]
        expected = math.exp(sum(w * math.log(r) for w, r in zip(weights, raws[:n], strict=True)) / sum(weights))
        assert lams[n - 1] == pytest.approx(expected, rel=1e-12)
    assert [ctrl.decide(t).active for t in range(4)] == [True, False, False, True]
    lam = ctrl.update(9, task_grad_norm=1e6, penalty_grad_norm=1.0)
    assert lam == 5.0 and ctrl.log[-1]["reason"] == "ratio: clipped at lam_max"
    assert ctrl.update(12, task_grad_norm=1.0, penalty_grad_norm=0.0) == 5.0  # kept
    assert ctrl.log[-1]["reason"] == "ratio: a zero gradient norm, λ kept"
    with pytest.raises(ValueError):
        GradRatioController(target=0.0)
    with pytest.raises(ValueError):
        GradRatioController(smoothing=1.0)


def test_grad_ratio_controller_state_round_trip():
    a = GradRatioController(target=0.3, smoothing=0.8)
    for t, r in enumerate([2.0, 3.0, 1.0]):
        a.update(t, task_grad_norm=r, penalty_grad_norm=1.5)
    b = GradRatioController(target=0.3, smoothing=0.8)
    b.load_state_dict(a.state_dict())
    assert a.update(3, task_grad_norm=5.0, penalty_grad_norm=1.0) == b.update(
        3, task_grad_norm=5.0, penalty_grad_norm=1.0
    )


def _run_spike(ctrl: CurvatureSpikeController, values: dict[int, float], steps: range) -> list[tuple]:
    out = []
    for t in steps:
        d = ctrl.decide(t)
        if d.active:
            lam = ctrl.update(t, sq_trace=values.get(t, 10.0))
            out.append((t, lam))
    return out


def test_spike_controller_backs_off_then_reacts_to_a_spike():
    ctrl = CurvatureSpikeController(lam=0.1, factor=3.0, window=8, min_history=3, every_max=8)
    spike_at = 33
    runs = _run_spike(ctrl, {spike_at: 40.0}, range(60))
    steps = [t for t, _ in runs]
    # 3 steps of history, then the interval doubles: 1, 2, 4, 8, 8, ...
    assert steps[:8] == [0, 1, 2, 3, 5, 9, 17, 25]
    assert spike_at in steps
    lam_of = dict(runs)
    assert lam_of[25] == pytest.approx(0.1) and lam_of[spike_at] == pytest.approx(0.2)
    after = [t for t in steps if t > spike_at]
    assert after[:3] == [34, 36, 40]  # every step right after the spike, then backing off
    assert lam_of[34] == pytest.approx(0.1)  # calm again: λ back to its base
    reasons = [e["reason"] for e in ctrl.log]
    assert reasons.count("spike: 4.0× the median") == 1
    assert reasons[:3] == ["collecting history"] * 3


def test_spike_controller_state_round_trip_and_validation():
    a = CurvatureSpikeController(lam=1.0, factor=2.0, window=4, min_history=2, every_max=4)
    _run_spike(a, {}, range(10))
    b = CurvatureSpikeController(lam=1.0, factor=2.0, window=4, min_history=2, every_max=4)
    b.load_state_dict(a.state_dict())
    values = {12: 100.0}
    assert _run_spike(a, values, range(10, 30)) == _run_spike(b, values, range(10, 30))
    for kwargs in ({"factor": 1.0}, {"window": 2, "min_history": 3}, {"every_min": 4, "every_max": 2}):
        with pytest.raises(ValueError):
            CurvatureSpikeController(lam=1.0, **kwargs)
    zero = CurvatureSpikeController(lam=0.0)
    assert not zero.decide(0).active
