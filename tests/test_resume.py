"""A run interrupted after an epoch resumes from its epoch state (flatness.experiments.running.resume)
and ends with the weights and the record of an uninterrupted run, for every training method; a
state from other settings, or an unreadable one, is set aside with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flatness.experiments.running import runner
from flatness.experiments.running.claims import clear_leftovers
from flatness.experiments.running.resume import STATE_SUFFIX, EpochState
from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.specs import build_grid
from test_determinism import CASES, STRENGTH, _without_timings


class _Killed(BaseException):
    """Stands for a kill right after an epoch state was written (not an Exception: nothing catches it)."""


def _spec(method: str, settings: dict[str, Any], epochs: int = 3, **overrides: Any):
    value = STRENGTH.get(method.split("+")[0])
    (spec,) = build_grid("breast-cancer-mlp", method, None if value is None else [value], [1],
                         config_overrides={"epochs": epochs, **overrides}, method_kwargs=settings,
                         model_kwargs={"hidden": [32, 16]})
    return spec


def _run(spec, out: Path) -> dict[str, Any]:
    run_grid([spec], out, progress=False, log=lambda msg: None)
    return json.loads((out / "breast-cancer-mlp" / f"{spec.name}.json").read_text())


def _interrupt_after(monkeypatch, epoch: int) -> None:
    real = EpochState.save

    def save_then_die(self, state, *, final):
        real(self, state, final=final)
        if state["next_epoch"] == epoch + 1:
            raise _Killed

    monkeypatch.setattr(EpochState, "save", save_then_die)


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    saved = torch.load(out / "breast-cancer-mlp" / "checkpoints" / f"{name}.pt", weights_only=False)
    return saved["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("method, settings", CASES, ids=[f"{m}{'-' + '-'.join(map(str, s.values())) if s else ''}"
                                                         for m, s in CASES])
def test_a_run_resumed_after_an_epoch_equals_the_uninterrupted_run(tmp_path, monkeypatch, method, settings):
    monkeypatch.setattr(runner, "EPOCH_STATE_INTERVAL", 0.0)
    spec = _spec(method, settings)
    straight = _run(spec, tmp_path / "straight")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Killed):
            _run(spec, tmp_path / "resumed")
    state = tmp_path / "resumed" / "breast-cancer-mlp" / "checkpoints" / f"{spec.name}{STATE_SUFFIX}"
    assert state.exists() and not (tmp_path / "resumed" / "breast-cancer-mlp" / f"{spec.name}.json").exists()
    resumed = _run(spec, tmp_path / "resumed")
    assert straight["status"] == "complete", straight.get("error")
    assert resumed["environment"].pop("resumed_after_epochs") == [1]
    assert "resumed_after_epochs" not in straight["environment"]
    assert _without_timings(resumed) == _without_timings(straight)
    a, b = _weights(tmp_path / "straight", spec.name), _weights(tmp_path / "resumed", spec.name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()  # discarded once the record is written


@pytest.mark.slow
def test_a_run_killed_while_measuring_resumes_without_training_again(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "EPOCH_STATE_INTERVAL", 3600.0)  # only the final state is written
    spec = _spec("fa", {}, epochs=2)
    straight = _run(spec, tmp_path / "straight")

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(runner, "measure_final", killed)
        with pytest.raises(_Killed):
            _run(spec, tmp_path / "resumed")
    trained = []
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: trained.append(real_train(*a, **k)) or trained[-1])
    resumed = _run(spec, tmp_path / "resumed")
    assert trained[0].resumed_after_epochs == [2] and trained[0].train_seconds == pytest.approx(
        resumed["train_seconds"])
    assert resumed["environment"].pop("resumed_after_epochs") == [2]
    assert _without_timings(resumed) == _without_timings(straight)


def test_a_stopping_rule_run_resumes_after_the_epoch_that_met_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "EPOCH_STATE_INTERVAL", 0.0)
    spec = _spec("none", {}, epochs=40, stop_train_acc=0.9)
    straight = _run(spec, tmp_path / "straight")
    met = len(straight["curves"]["epoch"])
    assert met < 40  # the rule stopped it
    with monkeypatch.context() as patch:
        _interrupt_after(patch, met)
        with pytest.raises(_Killed):
            _run(spec, tmp_path / "resumed")
    resumed = _run(spec, tmp_path / "resumed")
    assert resumed["environment"].pop("resumed_after_epochs") == [met]
    assert _without_timings(resumed) == _without_timings(straight)


def test_a_state_of_other_settings_or_unreadable_is_set_aside_with_one_line(tmp_path, capsys):
    path = tmp_path / f"run{STATE_SUFFIX}"
    EpochState(path, {"spec": 1}).save({"next_epoch": 2}, final=True)
    assert EpochState(path, {"spec": 2}).load() is None
    assert not path.exists()
    path.write_bytes(b"not a torch file")
    assert EpochState(path, {"spec": 1}).load() is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"flatness: run{STATE_SUFFIX} was written by other code or settings (spec 1 → here 2); "
                     "training from the start",
                     f"flatness: run{STATE_SUFFIX} cannot be read (UnpicklingError); training from the start"]
    assert not path.exists()


def test_the_set_aside_line_names_what_differs(tmp_path, capsys):
    path = tmp_path / f"run{STATE_SUFFIX}"
    saved = {"spec": {"config": {"lr": 0.1, "epochs": 5}}, "environment": {"commit": "abc", "threads": 1}}
    EpochState(path, saved).save({}, final=True)
    here = {"spec": {"config": {"lr": 0.2, "epochs": 5}}, "environment": {"commit": "def", "threads": 2}}
    assert EpochState(path, here).load() is None
    assert capsys.readouterr().err.strip() == (
        f"flatness: run{STATE_SUFFIX} was written by other code or settings (environment.commit 'abc' → here "
        "'def'; environment.threads 1 → here 2; spec.config.lr 0.1 → here 0.2); training from the start"
    )


def test_states_are_written_at_most_every_interval_but_always_at_the_end(tmp_path):
    state = EpochState(tmp_path / f"run{STATE_SUFFIX}", {}, min_interval=3600.0)
    state.save({"next_epoch": 2}, final=False)
    assert not state.path.exists()
    state.save({"next_epoch": 3}, final=True)
    assert state.load() == {"next_epoch": 3}


def test_clear_leftovers_removes_states_of_finished_runs_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("done", "running"):
        EpochState(tmp_path / "checkpoints" / f"{name}{STATE_SUFFIX}", {}).save({}, final=True)
    (tmp_path / "done.json").write_text("{}")
    removed = clear_leftovers(tmp_path)
    assert [p.name for p in removed] == [f"done{STATE_SUFFIX}"]
    assert (tmp_path / "checkpoints" / f"running{STATE_SUFFIX}").exists()


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_epoch_state_interval_is_one_error_line_before_any_run(tmp_path, capsys, monkeypatch, value):
    from flatness.cli import main

    monkeypatch.setenv("FLATNESS_EPOCH_STATE_SECONDS", value)
    out = tmp_path / "runs"
    assert main(["run", "breast-cancer-mlp", "--seeds", "1", "--epochs", "1", "--quiet", "--no-plots",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flatness: error: FLATNESS_EPOCH_STATE_SECONDS must be a number of seconds >= 0, got {value!r}"]
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True


class _Payload:
    """An arbitrary class in a state file: unpickling it would run code."""

    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return {}


def test_a_state_holding_arbitrary_objects_is_set_aside_without_running_them(tmp_path, capsys):
    path = tmp_path / f"run{STATE_SUFFIX}"
    torch.save({"format": "flatness-epoch-state", "identity": {}, "state": {"x": _Payload()}}, path)
    assert EpochState(path, {}).load() is None
    assert not _Payload.ran
    assert "cannot be read (UnpicklingError)" in capsys.readouterr().err
