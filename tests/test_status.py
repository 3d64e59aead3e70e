"""``flatness status``: records counted, runs in flight named with their holder and saved epoch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flatness.cli import main
from flatness.experiments.running import runner
from flatness.experiments.running.claims import claim_path, try_claim
from flatness.experiments.running.resume import STATE_SUFFIX, EpochState
from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.specs import build_grid
from flatness.experiments.running.status import results_status

BC = "breast-cancer-mlp"


class _Killed(BaseException):
    pass


def _specs():
    return build_grid(BC, "fa", [0.0, 0.01, 0.1], [1], config_overrides={"epochs": 3},
                      model_kwargs={"hidden": [8]})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def results(tmp_path, monkeypatch):
    """One finished run, one interrupted after epoch 2 (its process gone), one claimed by us."""
    monkeypatch.setattr(runner, "EPOCH_STATE_INTERVAL", 0.0)
    done, killed, live = _specs()
    run_grid([done], tmp_path, progress=False, log=lambda m: None)
    real = EpochState.save

    def save_then_die(self, state, *, final):
        real(self, state, final=final)
        if state["next_epoch"] == 3:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(EpochState, "save", save_then_die)
        with pytest.raises(_Killed):
            run_grid([killed], tmp_path, progress=False, log=lambda m: None)
    folder = tmp_path / BC
    claim_path(folder, killed.name).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "since": "then", "token": "t"}))
    claim = try_claim(folder, live.name)
    yield tmp_path, (done, killed, live)
    claim.release()


def test_records_and_runs_in_flight_with_holder_and_saved_epoch(results):
    root, (done, killed, live) = results
    (folder,) = results_status(root)
    assert (folder["complete"], folder["failed"], folder["damaged"]) == (1, 0, [])
    runs = {r["name"]: r for r in folder["in_flight"]}
    assert sorted(runs) == sorted([killed.name, live.name])
    assert runs[killed.name]["live"] is False and runs[killed.name]["saved"]["after_epoch"] == 2
    assert runs[killed.name]["saved"]["done"] is False
    assert runs[live.name]["live"] is True and runs[live.name]["saved"] is None
    assert "token" not in runs[live.name]["holder"]
    assert results_status(root / BC) == [folder]  # the task folder itself


def test_the_command_prints_a_line_per_folder_and_per_run_in_flight(results, capsys):
    root, (done, killed, live) = results
    (root / BC / "broken.json").write_text('{"format": "flatness-run", ')  # a damaged record
    assert main(["status", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{root / BC}: records 1 complete, 0 failed, damaged: broken.json; 2 in flight"
    by_name = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert "its process is gone" in by_name[killed.name] and "saved after epoch 2 (" in by_name[killed.name]
    assert by_name[killed.name].endswith("; a rerun by the same code resumes it")
    assert "trained by pid" in by_name[live.name] and by_name[live.name].endswith("; no epoch state yet")
    assert main(["status", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["damaged"] == ["broken.json"]


def test_a_missing_directory_is_one_error_line(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"flatness: error: {tmp_path / 'nowhere'}: no such results directory"


def test_an_unreadable_state_is_said_to_be(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"run{STATE_SUFFIX}").write_bytes(b"junk")
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  run: no process holds it; its epoch state cannot be read; a rerun starts it over" in out


def test_status_reads_only(results):
    root, _ = results
    before = sorted((p, p.stat().st_mtime_ns) for p in Path(root).rglob("*"))
    results_status(root)
    assert sorted((p, p.stat().st_mtime_ns) for p in Path(root).rglob("*")) == before
