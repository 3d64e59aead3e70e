"""The sweep runner: run identity, fixed flatness measurement, records, resume, kill -9, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flatness.cli import main
from flatness.experiments.running.checkpoints import load_checkpoint
from flatness.experiments.running.measure import measure_sq_trace_per_B
from flatness.experiments.running.record import RunRecord, read_record
from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.specs import RunSpec, build_grid
from flatness.experiments.running.training import evaluate
from flatness.experiments.world.tasks import get_task
from flatness.methods import METHODS, Method
from flatness.utils import FlatnessError
from helpers import dense_hessian, tiny_batch, tiny_mlp

BC = "breast-cancer-mlp"
QUICK = ["--epochs", "2", "--quiet", "--no-plots"]


def test_run_names_identify_method_value_seed_and_protocol():
    names = [s.name for s in build_grid(BC, "fa", [0, 0.001, 0.01, 1], seeds=2)]
    assert names[:3] == ["fa_lam0_seed0", "fa_lam0_seed1", "fa_lam0.001_seed0"]
    assert names[-1] == "fa_lam1_seed1"
    short = build_grid(BC, "fa", [0.01], seeds=1, config_overrides={"epochs": 3})[0]
    assert short.name.startswith("fa_lam0.01_seed0_p") and short.config["epochs"] == 3
    probes = build_grid(BC, "fa", [0.01], seeds=1, method_kwargs={"probes": 2})[0]
    assert probes.name.startswith("fa_lam0.01_k") and probes.method_kwargs == {"probes": 2, "every": 10}
    plain = build_grid(BC, "none", None, seeds=[4])[0]
    assert plain.name == "none_seed4" and plain.value is None
    assert RunSpec.from_dict(json.loads(json.dumps(short.as_dict()))) == short
    assert [s.value for s in build_grid(BC, "fa", None, seeds=1)] == [0.0, 0.001, 0.01, 0.1, 1.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": [-0.1]}, ">= 0"),
        ({"values": [float("nan")]}, ">= 0"),
        ({"seeds": 0}, "seeds"),
        ({"method": "nope"}, "unknown method"),
        ({"method": "none", "values": [0.1]}, "no strength"),
        ({"config_overrides": {"epochs": 0}}, "invalid training protocol"),
    ],
)
def test_build_grid_rejects_bad_input(kwargs, match):
    with pytest.raises(FlatnessError, match=match):
        build_grid(BC, kwargs.pop("method", "fa"), kwargs.pop("values", [0.0]), kwargs.pop("seeds", 1), **kwargs)


def test_measured_flatness_is_a_fixed_unbiased_protocol():
    model = tiny_mlp(seed=0, dropout=0.5)
    x, y = tiny_batch(n=8)
    task = SimpleNamespace(loss_fn=nn.functional.cross_entropy)
    model.train()
    a = measure_sq_trace_per_B(model, task, x, y, 4, num_samples=8, probes=3)
    b = measure_sq_trace_per_B(model, task, x, y, 4, num_samples=8, probes=3)
    assert a == b and a["samples"] == 8 and model.training  # same probes; mode restored
    many = measure_sq_trace_per_B(model, task, x, y, 4, num_samples=8, probes=400)
    model.eval()  # the protocol measures in eval mode (dropout off)
    exact = 0.0
    for i in (0, 4):
        H = dense_hessian(model, x[i : i + 4], y[i : i + 4])
        exact += float(torch.trace(H @ H)) / 4 / 2
    assert 0 < many["stderr"] < 0.1 * many["value"]
    assert abs(many["value"] - exact) < 4 * many["stderr"]  # unbiased: within 4 standard errors
    partial = measure_sq_trace_per_B(model, task, x, y, 3, num_samples=8, probes=2)
    assert partial["samples"] == 6  # full batches of B only


def _records(directory: Path) -> dict[str, RunRecord | None]:
    return {p.stem: read_record(p) for p in sorted(directory.glob("*.json"))}


def test_cli_run_writes_records_checkpoints_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["run", BC, "--lambdas", "0", "0.01", "--seeds", "2", "--out", str(out), "--trajectory", "3",
            "--epochs", "2", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| λ | runs | Final acc" in printed and "p (final acc)" in printed
    d = out / BC
    records = _records(d)
    assert len(records) == 4 and all(r.status == "complete" for r in records.values())
    assert all(json.loads(p.read_text())["version"] == 3 for p in d.glob("*.json"))
    r = next(r for name, r in records.items() if name.startswith("fa_lam0_seed0"))
    assert r.measured_sq_trace_per_B > 0  # measured for λ = 0 too
    assert r.avg_train_sq_trace_per_B is None  # no penalty, nothing to average
    assert len(r.curves["test_acc"]) == 2 and len(r.curves["sq_trace_per_B"]) == 2
    assert r.val_chosen_epoch in (1, 2) and r.train_seconds > 0 and r.seconds_per_epoch > 0
    fa = next(r for name, r in records.items() if name.startswith("fa_lam0.01_seed1"))
    assert fa.avg_train_sq_trace_per_B > 0 and fa.method_kwargs == {"probes": 5, "every": 10}
    # every epoch: eval-mode loss and accuracy on train (all 409 samples), validation and test
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        assert len(r.curves[key]) == 2 and all(v is not None for v in r.curves[key])
        assert getattr(r, f"final_{key}") == r.curves[key][-1]
    assert r.train_eval_samples == r.train_samples == 409
    # the checkpoint is the final model: it reproduces the recorded final values
    model, meta = load_checkpoint(d / r.checkpoint, task=BC)
    task = get_task(BC)
    splits = task.load()
    for name, x, y in (("train", splits.x_train, splits.y_train), ("val", splits.x_val, splits.y_val),
                       ("test", splits.x_test, splits.y_test)):
        result = evaluate(model, x, y, task.predict, loss_fn=task.loss_fn)
        assert result["acc"] == getattr(r, f"final_{name}_acc")
        assert result["loss"] == pytest.approx(getattr(r, f"final_{name}_loss"), rel=1e-6)
    assert meta["seed"] == 0
    traj = torch.load(d / r.trajectory_file, weights_only=True)
    assert traj["steps"] == [0, r.steps // 2, r.steps] and len(traj["state_dicts"]) == 3
    for name in ("summary.md", "summary.csv"):
        assert (d / name).is_file()
    assert len(list(d.glob("*.png"))) == 4  # accuracy, flatness, curves, reliability
    assert not [p for p in d.rglob(".*") if p.is_file()]  # no temp files left
    assert not list(d.glob("*.claim"))  # claims released

    stamps = {p: p.stat().st_mtime_ns for p in d.glob("*.json")}
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 of 4 runs already finished" in err
    assert stamps == {p: p.stat().st_mtime_ns for p in d.glob("*.json")}


def test_kill_9_loses_only_runs_in_flight_and_resume_finishes(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "flatness", "run", BC, "--lambdas", "0", "0.01", "--seeds", "2",
           "--out", str(out), "--jobs", "2", *QUICK]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not list((out / BC).glob("*.json")) and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker processes
        proc.wait()
    finished = _records(out / BC)
    assert all(r is not None and r.status == "complete" for r in finished.values())
    for p in (out / BC).glob("*.json"):
        json.loads(p.read_text())  # every JSON present is whole
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    done = _records(out / BC)
    assert len(done) == 4 and all(r.status == "complete" for r in done.values())


class _Diverging(Method):
    name = "diverging-test"
    hparam = "lam"

    def __init__(self, model, loss_fn, lam=0.0):
        super().__init__(model, loss_fn)
        self.lam = lam

    def step(self, x, y, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(x, y)
        loss.backward()
        optimizer.step()
        return {"loss": float("nan") if self.lam > 0 else float(loss.detach())}


def test_diverged_runs_are_recorded_as_failed_and_not_rerun(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, _Diverging.name, _Diverging)
    specs = build_grid(BC, _Diverging.name, [0.0, 1.0], seeds=1, config_overrides={"epochs": 1})
    results = run_grid(specs, tmp_path, progress=False, log=lambda m: None)
    statuses = sorted(r.status for r in results[str(tmp_path / BC)])
    assert statuses == ["complete", "failed"]
    failed = read_record(tmp_path / BC / f"{specs[1].name}.json")
    assert "TrainingDiverged" in failed.error and failed.final_test_acc is None
    messages = []
    run_grid(specs, tmp_path, progress=False, log=messages.append)
    assert messages == ["2 of 2 runs already finished; skipping them"]
    messages.clear()
    run_grid(specs, tmp_path, progress=False, retry_failed=True, log=messages.append)
    assert messages[0] == "1 of 2 runs already finished; skipping them"


def _cli_error(args, capsys) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatness: error:"), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_bad_input_gives_one_line_and_keeps_existing_results(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", BC, "--lambdas", "0", "--seeds", "1", "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (out / BC).rglob("*") if p.is_file()}
    base = ["--out", str(out), *QUICK]
    assert "unknown task" in _cli_error(["run", "mnist", *base], capsys)
    assert ">= 0" in _cli_error(["run", BC, "--lambdas", "-0.5", *base], capsys)
    assert "--seeds" in _cli_error(["run", BC, "--seeds", "0", *base], capsys)
    assert "--jobs" in _cli_error(["run", BC, "--jobs", "0", *base], capsys)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot write results" in _cli_error(["run", BC, "--out", str(blocker / "sub"), *QUICK], capsys)
    empty = tmp_path / "no-data"
    empty.mkdir()
    msg = _cli_error(["run", "cifar100-mlp", "--data-dir", str(empty), "--no-download", *base], capsys)
    assert "cifar-100-python.tar.gz" in msg and str(empty) in msg
    (empty / "cifar-100-python.tar.gz").write_bytes(b"corrupt")
    assert "corrupted" in _cli_error(["run", "cifar100-mlp", "--data-dir", str(empty), *base], capsys)
    assert "no strength" in _cli_error(["run", BC, "--method", "none", "--lambdas", "1", *base], capsys)
    after = {p: p.read_bytes() for p in (out / BC).rglob("*") if p.is_file()}
    assert before == after


def test_a_record_with_other_settings_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = build_grid(BC, "fa", [0.0], seeds=1, config_overrides={"epochs": 2})[0]
    path = out / BC / f"{spec.name}.json"
    path.parent.mkdir(parents=True)
    record = {"format": "flatness-run", "name": spec.name, "status": "complete", "task_version": 1, **spec.as_dict()}
    args = ["run", BC, "--lambdas", "0", "--seeds", "1", "--out", str(out), *QUICK]
    for key, value, message in (("value", 5.0, "other settings"), ("task_version", 0, "version 0")):
        path.write_text(json.dumps({**record, key: value}))
        assert message in _cli_error(args, capsys)
        assert json.loads(path.read_text())[key] == value


def test_run_with_measures_fills_lambda_max_in_the_table(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", BC, "--lambdas", "0", "--seeds", "1", "--out", str(out), "--measures", *QUICK]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| λ | runs |")).split("|")
    row = next(line for line in lines if line.startswith("| 0 | 1 |")).split("|")
    (cached,) = (out / BC / "measures").glob("fa_lam0_seed0*.json")
    values = json.loads(cached.read_text())
    assert row[header.index(" λ_max ")].strip() == f"{values['lambda_max']:.3g}"
    assert values["lambda_max"] > 0 and values["hessian_trace"] > 0
