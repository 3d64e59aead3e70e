"""CurvatureMonitor: the values of the measures it names, on its schedule, into CSV and TensorBoard,
and nothing of the model or of the random streams changed.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

from flatness import CurvatureMonitor, FlatnessError
from flatness.measures import hessian_sq_trace, hessian_trace, top_eigenvalues
from flatness.passes import measure_pass

F = nn.functional


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).double()


def _batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k  # weights, running stats, counters
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["flags"] == b["flags"]
    assert torch.equal(a["torch"], b["torch"])
    assert a["python"] == b["python"]
    sa, sb = a["numpy"], b["numpy"]
    assert sa[0] == sb[0] and np.array_equal(sa[1], sb[1]) and sa[2:] == sb[2:]


@pytest.mark.parametrize("function", ["deployed", "batch_stats"])
def test_a_measurement_leaves_model_and_random_states_bitwise_unchanged(tmp_path, function):
    model = _model().train()
    model[3].eval()  # a mixed-mode model: flags are restored one by one
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()  # BN running stats moved, .grad set
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = _state(model)
    monitor = CurvatureMonitor(
        model, F.cross_entropy, _batch(seed=2), every=1, path=tmp_path / "c.csv", function=function,
        measures=("lambda_max", "trace", "sq_trace", "eps_sharpness", "noise_loss"),
    )
    record = monitor.step()
    assert record is not None and record["lambda_max"] > 0
    _assert_same(before, _state(model))


def test_training_with_a_monitor_is_the_same_run_as_without(tmp_path):
    def train(monitored: bool) -> list[torch.Tensor]:
        model = _model().train()
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = CurvatureMonitor(model, F.cross_entropy, _batch(seed=9), every=2, path=tmp_path / f"{monitored}.csv")
        for step in range(5):
            x, y = _batch(16, seed=10 + step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()  # dropout draws from the global stream
            if monitored:
                monitor.step()
            opt.step()
        return [t.clone() for t in model.state_dict().values()]

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)


def test_values_are_those_of_the_measures_on_the_held_out_batch(tmp_path):
    model = _model().eval()
    batch = _batch(seed=4)
    monitor = CurvatureMonitor(model, F.cross_entropy, batch, every=1, path=None)
    record = monitor.measure(7)
    opts = monitor.options
    with measure_pass(model):
        lam = top_eigenvalues(model, F.cross_entropy, [batch], 1, tol=opts.eigen_tol, seed=opts.seed).lambda_max
        tr = hessian_trace(model, F.cross_entropy, [batch], opts.matvecs, seed=opts.seed).value
        sq = hessian_sq_trace(model, F.cross_entropy, [batch], opts.matvecs, seed=opts.seed).value
    assert record["step"] == 7
    assert record["lambda_max"] == pytest.approx(lam, rel=1e-9)
    assert record["hessian_trace"] == pytest.approx(tr, rel=1e-9)
    assert record["hessian_sq_trace"] == pytest.approx(sq, rel=1e-9)
    assert record["hessian_sq_trace_per_B"] == pytest.approx(sq / 24, rel=1e-12)
    # its own cost: the products the measures report, and the wall time
    assert record["hvps"] == record["eigen_matvecs"] + record["hessian_trace_matvecs"] + opts.matvecs
    assert record["seconds"] > 0


def test_schedule_csv_header_once_and_resume(tmp_path):
    path = tmp_path / "logs" / "curv.csv"
    model = _model()
    monitor = CurvatureMonitor(model, F.cross_entropy, _batch(), every=3, path=path, measures=["lambda_max"])
    measured = [s for s in range(7) if monitor.step() is not None]
    assert measured == [0, 3, 6]
    lines = path.read_text().splitlines()
    assert lines[0].startswith("step,") and [line.split(",")[0] for line in lines[1:]] == ["0", "3", "6"]
    header = lines[0].split(",")
    assert {"lambda_max", "seconds", "hvps", "eigen_matvecs"} <= set(header)
    assert "top_eigenvalues" not in header  # lists stay in the record only

    # a restarted run: the steps the file holds are skipped, the rest appended under one header
    again = CurvatureMonitor(model, F.cross_entropy, _batch(), every=3, path=path, measures=["lambda_max"])
    assert again.step(6) is None and again.step(9) is not None
    lines = path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "0", "3", "6", "9"]

    # a line cut by a crash is dropped with a warning; the file goes on
    path.write_text(path.read_text() + "12,0.5")
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        third = CurvatureMonitor(model, F.cross_entropy, _batch(), every=3, path=path, measures=["lambda_max"])
    third.step(12)
    assert [line.split(",")[0] for line in path.read_text().splitlines()][-2:] == ["9", "12"]

    # other measures into the same file: one clear error, the file untouched
    text = path.read_text()
    other = CurvatureMonitor(model, F.cross_entropy, _batch(), every=3, path=path, measures=["trace"])
    with pytest.raises(FlatnessError, match="has the columns"):
        other.step(15)
    assert path.read_text() == text


def test_tensorboard_event_files_get_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    monitor = CurvatureMonitor(_model(), F.cross_entropy, _batch(), every=2, path=None, writer=writer)
    for _ in range(3):
        monitor.step()
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"curvature/lambda_max", "curvature/hessian_trace", "curvature/hessian_sq_trace_per_B",
            "curvature/seconds", "curvature/hvps"} <= tags
    assert [e.step for e in events.Scalars("curvature/lambda_max")] == [0, 2]


def test_bad_arguments_are_one_clear_error(tmp_path):
    model = _model()
    with pytest.raises(FlatnessError, match="unknown measure"):
        CurvatureMonitor(model, F.cross_entropy, _batch(), measures=["lambda_min"], path=None)
    with pytest.raises(FlatnessError, match="every"):
        CurvatureMonitor(model, F.cross_entropy, _batch(), every=0, path=None)
    with pytest.raises(FlatnessError, match="pair"):
        CurvatureMonitor(model, F.cross_entropy, _batch()[0], path=None)
    with pytest.raises(FlatnessError, match="add_scalar"):
        CurvatureMonitor(model, F.cross_entropy, _batch(), path=None, writer=object())
    (tmp_path / "x.csv").write_text("epoch,loss\n1,2\n")
    with pytest.raises(FlatnessError, match="not a curvature monitor log"):
        CurvatureMonitor(model, F.cross_entropy, _batch(), path=tmp_path / "x.csv")


def test_inside_autocast_and_no_grad_the_monitor_measures_in_full_precision():
    model = _model()
    monitor = CurvatureMonitor(model, F.cross_entropy, _batch(), every=1, path=None, measures=["lambda_max"])
    plain = monitor.measure(0)["lambda_max"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = monitor.measure(1)["lambda_max"]
    assert inside == plain
