"""The one training loop: method-agnostic, reproducible, mode-preserving, schedules."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from flatness.experiments.running.training import (
    TrainingDiverged,
    evaluate,
    lr_factor,
    make_optimizer,
    make_scheduler,
    train,
)
from flatness.experiments.world.data import Splits
from flatness.experiments.world.tasks import TrainConfig
from flatness.methods import Method, make_method


def _toy_data(n: int = 96, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 40, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return Splits(x[:n], y[:n], x[n + 20 :], y[n + 20 :], 2, x[n : n + 20], y[n : n + 20])


def _toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.03, weight_decay=1e-4)


def _run(method_name: str = "none", seed: int = 0, **hp: Any):
    model = _toy_model(seed)
    method = make_method(method_name, model, nn.functional.cross_entropy, **hp)
    hist = train(
        model, method, make_optimizer(model, CONFIG), _toy_data(), CONFIG,
        generator=torch.Generator().manual_seed(seed),
    )
    return model, hist


def test_history_records_per_epoch_curves_and_learns():
    _, hist = _run()
    assert [e["epoch"] for e in hist.epochs] == [1, 2, 3]
    assert hist.steps == 3 * 6 and all(e["steps"] == 6 for e in hist.epochs)
    for e in hist.epochs:
        assert {"loss", "val_acc", "test_acc", "test_loss", "seconds", "lr"} <= set(e)
    assert hist.epochs[-1]["test_acc"] > 0.8
    assert hist.train_seconds > 0 and hist.as_dict()["steps"] == 18


def test_same_seed_same_curves_and_different_seed_differs():
    _, a = _run(seed=0)
    _, b = _run(seed=0)
    _, c = _run(seed=1)
    assert a.curve("loss") == b.curve("loss") and a.curve("test_acc") == b.curve("test_acc")
    assert a.curve("loss") != c.curve("loss")


def test_fa_infos_are_averaged_over_the_steps_that_computed_them():
    _, hist = _run("fa", lam=0.01, probes=2, every=4, seed=0)
    # 6 steps per epoch, a curvature step every 4 calls: calls 0, 4 | 8 | 12, 16
    assert [e.get("sq_trace_steps") for e in hist.epochs] == [2, 1, 2]
    assert all(e["sq_trace"] > 0 and e["penalty"] > 0 for e in hist.epochs)


class _Recorder(Method):
    """A method that is not special-cased anywhere: reports a constant and counts calls."""

    name = "recorder-test"

    def __init__(self, model, loss_fn):
        super().__init__(model, loss_fn)
        self.calls = 0

    def step(self, x, y, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(x, y)
        loss.backward()
        optimizer.step()
        self.calls += 1
        return {"loss": float(loss.detach()), "custom": 2.0 * self.calls}


def test_loop_is_method_agnostic_and_restores_modes():
    model = _toy_model()
    model.eval()
    model[2].train()  # a mixed-mode model must come back exactly like this
    method = _Recorder(model, nn.functional.cross_entropy)
    seen_modes = []
    hist = train(
        model, method, make_optimizer(model, CONFIG), _toy_data(), CONFIG,
        on_step_end=lambda step, info: seen_modes.append(model.training),
        on_epoch_end=lambda epoch, rec: {"extra": epoch * 10},
    )
    assert method.calls == 18 and all(seen_modes)
    assert [e["custom"] for e in hist.epochs] == [7.0, 19.0, 31.0]  # mean of 2,4..12 etc.
    assert [e["extra"] for e in hist.epochs] == [10, 20, 30]
    assert not model.training and model[2].training


class _Exploding(_Recorder):
    name = "exploding-test"

    def step(self, x, y, optimizer):
        info = super().step(x, y, optimizer)
        return {**info, "loss": math.nan} if self.calls == 3 else info


class _ExplodingTensor(_Recorder):
    """Returns its losses as detached 0-d tensors, as the plain and FA steps do (no sync)."""

    name = "exploding-tensor-test"

    def step(self, x, y, optimizer):
        info = super().step(x, y, optimizer)
        loss = torch.tensor(math.nan if self.calls == 3 else float(info["loss"]))
        return {**info, "loss": loss}


def test_tensor_losses_are_averaged_and_a_nan_names_its_step():
    model = _toy_model()
    hist = train(model, make_method("none", model, nn.functional.cross_entropy),
                 make_optimizer(model, CONFIG), _toy_data(), CONFIG)
    assert all(isinstance(e["loss"], float) and math.isfinite(e["loss"]) for e in hist.epochs)
    with pytest.raises(TrainingDiverged, match="nan at epoch 1, step 3"):
        train(model, _ExplodingTensor(model, nn.functional.cross_entropy),
              make_optimizer(model, CONFIG), _toy_data(), CONFIG)


def test_nan_loss_raises_training_diverged_and_restores_mode():
    model = _toy_model()
    model.eval()
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(model, _Exploding(model, nn.functional.cross_entropy), make_optimizer(model, CONFIG), _toy_data(), CONFIG)
    assert not model.training


def test_evaluate_counts_correct_predictions_in_eval_mode():
    model = _toy_model()
    data = _toy_data()
    model.train()
    acc = evaluate(model, data.x_test, data.y_test, lambda z: z.argmax(-1), batch_size=7)["acc"]
    with torch.no_grad():
        expected = (model.eval()(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(expected)


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(70, 100, 0, "constant", 0.0) == 1.0
    config = TrainConfig(epochs=2, batch_size=4, lr=0.1, weight_decay=0.0, schedule="cosine", warmup_epochs=0.5)
    model = _toy_model()
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.01
    assert make_scheduler(opt, CONFIG, 10) is None
