"""FlatnessPenalty's λ schedules and controllers, K-FAC backend and control-variate estimator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatness.control_variate import cv_sq_trace
from flatness.kfac import kfac_sq_trace
from flatness.lam_control import CurvatureSpikeController
from flatness.methods import make_method
from flatness.penalties import FlatnessPenalty
from flatness.utils import eval_mode
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_warmup_schedule_skips_the_pass_while_lam_is_zero():
    model = tiny_mlp()
    x, y = tiny_batch()
    pen = FlatnessPenalty(model, CE, lam=0.4, probes=2, seed=0, lam_schedule="warmup:4", total_steps=10)
    values, lams = [], []
    for step in range(6):
        log: dict[str, float] = {}
        active = pen.is_active()
        values.append(float(pen(x, y, log=log).detach()))
        lams.append(log.get("lam"))
        assert active == (step > 0)
    assert values[0] == 0.0 and lams[0] is None
    assert lams[1:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])
    assert values[-1] == pytest.approx(0.4 * pen.last_sq_trace / x.shape[0], rel=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        FlatnessPenalty(model, CE, lam=0.1, lam_schedule="cosine")
    with pytest.raises(ValueError, match="not both"):
        FlatnessPenalty(model, CE, lam=0.1, lam_schedule="constant", lam_control="ratio", total_steps=5)


def test_ratio_controller_measures_on_the_first_step_then_holds_the_ratio():
    model = tiny_mlp(seed=1)
    x, y = tiny_batch(seed=2)
    params = list(model.parameters())
    pen = FlatnessPenalty(model, CE, lam=10.0, probes=3, seed=0, lam_control="ratio:0.5:0")
    # step 0: λ = 0, only measurement; the update is the task gradient alone
    log: dict[str, float] = {}
    loss = CE(model(x), y)
    (loss + pen(x, y, log=log)).backward()
    task = torch.autograd.grad(CE(model(x), y), params)
    for g, t in zip(_grads(model), task, strict=True):
        assert torch.allclose(g, t, rtol=1e-12)
    task_norm = float(torch.cat([t.flatten() for t in task]).norm())
    assert log["lam"] == 0.0 and log["task_grad_norm"] == pytest.approx(task_norm, rel=1e-10)
    # the penalty's gradient on the same probes, by hand
    with eval_mode(model):
        probe_state = torch.Generator().manual_seed(0)
        unit = FlatnessPenalty(model, CE, lam=1.0, probes=3, generator=probe_state)(x, y) / 1.0
    g_pen = torch.autograd.grad(unit, params)
    pen_norm = float(torch.cat([g.flatten() for g in g_pen]).norm())
    assert log["penalty_grad_norm"] == pytest.approx(pen_norm, rel=1e-10)
    expected = 0.5 * task_norm / pen_norm
    assert pen.policy.lam == pytest.approx(expected, rel=1e-10)
    # step 1 applies it: the update is g_L + λ g_P(step 1's probes)
    for p in params:
        p.grad = None
    log = {}
    (CE(model(x), y) + pen(x, y, log=log)).backward()
    assert log["lam"] == pytest.approx(expected, rel=1e-10)
    assert pen.last_penalty == pytest.approx(expected * pen.last_sq_trace / x.shape[0], rel=1e-10)


def test_spike_controller_object_drives_the_pass():
    model = tiny_mlp()
    x, y = tiny_batch()
    ctrl = CurvatureSpikeController(lam=0.1, factor=5.0, window=4, min_history=2, every_max=4)
    pen = FlatnessPenalty(model, CE, lam=0.1, probes=1, seed=0, lam_control=ctrl)
    active = []
    for _ in range(12):
        active.append(pen.is_active())
        pen(x, y)
    # two steps of history, then back-off 2, 4, 4 (fixed weights: no spike)
    assert [i for i, a in enumerate(active) if a] == [0, 1, 2, 4, 8]
    assert [e["reason"] for e in ctrl.log][:2] == ["collecting history"] * 2


def test_kfac_backend_and_cv_estimator_give_their_module_values():
    model = tiny_mlp(seed=3)
    x, y = tiny_batch(seed=4)
    for kwargs, reference in (
        ({"backend": "kfac"}, lambda: kfac_sq_trace(model, CE, x, y, seed=7)),
        ({"estimator": "cv"}, lambda: cv_sq_trace(model, CE, x, y, 2, seed=7)),
        ({"estimator": "cv", "backend": "autograd"}, lambda: cv_sq_trace(model, CE, x, y, 2, seed=7)),
    ):
        pen = FlatnessPenalty(model, CE, lam=0.5, probes=2, seed=7, **kwargs)
        value = pen(x, y)
        with eval_mode(model):
            ref = reference()
        assert float(value.detach()) == pytest.approx(0.5 * float(ref.detach()) / x.shape[0], rel=1e-10)
    with pytest.raises(ValueError, match="estimator"):
        FlatnessPenalty(model, CE, backend="kfac", estimator="cv")
    with pytest.raises(ValueError, match="drop params"):
        FlatnessPenalty(model, CE, estimator="cv", params=list(model.parameters())[:1])


@pytest.mark.parametrize("kwargs", [{"backend": "kfac"}, {"estimator": "cv"}])
def test_fa_step_with_a_shared_prefix_equals_the_unshared_update(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    x, y = tiny_batch(seed=5, n=8, d_in=4)
    method = make_method("fa", model, CE, lam=0.3, probes=2, seed=1, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(11)
    method.step(x, y, opt)  # the step shares the input layer with the task forward
    shared = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout mask
    loss = CE(model(x), y)
    alone = FlatnessPenalty(model, CE, lam=0.3, probes=2, seed=1, **kwargs)
    (loss + alone(x, y)).backward()
    for a, b in zip(shared, _grads(model), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dropout", [0.3, 0.0])
@pytest.mark.parametrize("kwargs", [{"backend": "kfac"}, {"estimator": "cv", "probes": 2}])
def test_a_sub_batch_shares_the_first_rows_of_the_prefix(kwargs, dropout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(dropout), nn.Linear(6, 3)).double()
    x, y = tiny_batch(seed=5, n=8, d_in=4)
    method = make_method("fa", model, CE, lam=0.3, seed=1, sub_batch=3, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(11)
    method.step(x, y, opt)
    shared = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss = CE(model(x), y)
    alone = FlatnessPenalty(model, CE, lam=0.3, seed=1, sub_batch=3, **kwargs)
    (loss + alone(x, y)).backward()  # no shared prefix: the pass runs the sub-batch itself
    for a, b in zip(shared, _grads(model), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_bad_lam_policy_arguments_are_refused_at_any_lam(lam):
    """Issue 30, finding 8: a bogus schedule or controller was accepted at λ = 0 (and written
    into the record); it is refused at construction whatever λ, naming the argument.
    """
    model = tiny_mlp()
    with pytest.raises(ValueError, match="lam_schedule"):
        FlatnessPenalty(model, CE, lam=lam, lam_schedule="bogus:3", total_steps=100)
    with pytest.raises(ValueError, match="lam_schedule.*total_steps"):
        FlatnessPenalty(model, CE, lam=lam, lam_schedule="warmup:0.1+cosine")
    with pytest.raises(ValueError, match="lam_schedule"):
        FlatnessPenalty(model, CE, lam=lam, lam_schedule=42)
    for bogus in ("bogus", "ratio:x", "spike:0.5", object()):
        with pytest.raises(ValueError, match="lam_control"):
            FlatnessPenalty(model, CE, lam=lam, lam_control=bogus)
    good = FlatnessPenalty(model, CE, lam=lam, lam_control="ratio:0.5", every=2)
    assert good.is_active() == (lam > 0)
    good = FlatnessPenalty(model, CE, lam=lam, lam_schedule="warmup:0.1+cosine", total_steps=100)
    assert good.is_active(50) == (lam > 0)


def test_every_lam_policy_implements_the_declared_protocol_with_one_log():
    from flatness.lam_control import GradRatioController, make_policy
    from flatness.schedules import DecisionLog, LamPolicy, ScheduledLam

    policies = [make_policy(0.1), make_policy(0.1, lam_schedule="constant", total_steps=4),
                make_policy(0.1, lam_control="ratio"), make_policy(0.1, lam_control="spike")]
    assert {type(p).__name__ for p in policies} == {"ScheduledLam", "GradRatioController", "CurvatureSpikeController"}
    for policy in policies:
        assert isinstance(policy, LamPolicy) and isinstance(policy, DecisionLog)
        assert type(policy).pop_log is DecisionLog.pop_log  # one implementation
    assert GradRatioController.needs_grad_norms and not ScheduledLam.needs_grad_norms
    spike = make_policy(0.1, lam_control="spike")
    spike.update(0, sq_trace=torch.tensor(3.0))  # a measurement may be a 0-d tensor
    assert len(spike.pop_log()) == 1 and spike.pop_log() == []


@pytest.mark.parametrize("probes", [0, 2**64, 1_000_001, 2.0, True])
def test_a_probe_count_out_of_range_is_one_clear_error(probes: object) -> None:
    # issue 30: 99999999999999999999 probes overflowed deep in torch ("unpacking long long")
    model, (x, y) = tiny_mlp(), tiny_batch()
    with pytest.raises(ValueError, match=r"probes \(M\) must be an integer from 1 to 1,000,000"):
        FlatnessPenalty(model, nn.CrossEntropyLoss(), lam=0.1, probes=probes)
    with pytest.raises(ValueError, match=r"probes \(M\)"):
        cv_sq_trace(model, nn.CrossEntropyLoss(), x, y, probes=probes)
