"""The typed run record: schema versions, conversion of version 1, damaged files, report refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flatness.cli import main
from flatness.experiments.running.record import (
    SCHEMA_VERSION,
    RecordError,
    RunRecord,
    load_records,
    read_record,
    write_record,
)
from flatness.experiments.running.runner import pending_runs
from flatness.experiments.running.specs import build_grid
from flatness.experiments.world.tasks import get_task

BC = "breast-cancer-mlp"
RESULTS = Path(__file__).resolve().parents[1] / "results"
# version-1 records as release 0.1 committed them (results/ now holds version 2)
V1_RECORDS = Path(__file__).resolve().parent / "data" / "v1_records"


def _record(**changes) -> RunRecord:
    values = dict(name="fa_lam0.01_seed0", task=BC, method="fa", seed=0, status="complete",
                  hparam="lam", value=0.01, final_test_acc=0.95, final_test_loss=0.2,
                  config=get_task(BC).config.as_dict(), method_kwargs={"probes": 5, "every": 10},
                  curves={"test_acc": [0.9, 0.95], "loss": [0.5, 0.3]})
    values.update(changes)
    return RunRecord(**values)


def test_round_trip_keeps_every_field_and_extras(tmp_path):
    record = _record(measured_sq_trace_per_B=math.nan, extras={"lambda_max": 3.5})
    write_record(tmp_path / "r.json", record)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == "flatness-run" and data["version"] == SCHEMA_VERSION == 3
    back = read_record(tmp_path / "r.json")
    assert math.isnan(back.measured_sq_trace_per_B)
    back.measured_sq_trace_per_B = record.measured_sq_trace_per_B = 0.0
    assert back == record
    assert back.get("lambda_max") == 3.5 and back.get("final_test_acc") == 0.95
    assert back.get("final_train_acc") is None and back.get("nope", "x") == "x"
    assert "extras" not in _record().to_json()  # written only when there are some


def test_committed_version_1_records_are_read_and_match_their_runs():
    paths = sorted(V1_RECORDS.glob("*/*.json"))
    assert len(paths) == 6 and all(json.loads(p.read_text())["version"] == 1 for p in paths)
    for directory in sorted({p.parent for p in paths}):
        for record in load_records(directory):
            assert record.complete and record.final_test_acc is not None
            assert record.final_train_loss is None and record.final_val_loss is None  # not in v1
            assert record.final_test_loss == record.curves["test_loss"][-1]  # v1 had it as a curve
    # the committed runs count as done for the command that made them (same identity)
    specs = build_grid(BC, "fa", [0.0, 0.01], seeds=3)
    todo, done = pending_runs(specs, V1_RECORDS / BC)
    assert todo == [] and len(done) == 6


def test_committed_results_are_version_2_records():
    paths = sorted(RESULTS.glob("*/*.json"))
    assert len(paths) > 100 and all(json.loads(p.read_text())["version"] == 2 for p in paths)
    for directory in sorted({p.parent for p in paths}):
        assert all(r.complete and r.final_train_loss is not None for r in load_records(directory))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 4}, "version 4 run record, newer than this flatness reads (up to 3)"),
        ({"version": 2}, "is marked version 2 but has the version-3 field(s) ['resolved', 'task_source']"),
        ({"version": "2"}, "invalid record version"),
        ({"status": "running"}, "status 'running'"),
        ({"final_test_acc": "high"}, "malformed field 'final_test_acc'"),
        ({"seed": 1.5}, "malformed field 'seed'"),
        ({"colour": "blue"}, "unknown field(s) ['colour']"),
        ({"version": 1}, "is marked version 1 but has the version-2 field(s) ['train_eval_samples',"),
    ],
)
def test_malformed_or_newer_records_are_refused_with_one_message(tmp_path, change, message):
    data = {**_record().to_json(), **change}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError) as info:
        read_record(path)
    text = str(info.value)
    assert text.startswith(f"run record {path} ") and message in text and "\n" not in text


def test_missing_fields_and_other_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": "flatness-run", "version": 2, "status": "complete"}))
    with pytest.raises(RecordError, match=r"lacks the field\(s\) \['name', 'task', 'method', 'seed'\]"):
        read_record(path)
    path.write_text(json.dumps({"format": "flatness-compare", "task": BC}))
    assert read_record(path) is None  # another kind of file: not a run record


def test_a_truncated_record_is_named_and_report_exits_non_zero(tmp_path, capsys):
    directory = tmp_path / BC
    for seed in (0, 1):
        write_record(directory / f"fa_lam0.01_seed{seed}.json", _record(name=f"fa_lam0.01_seed{seed}", seed=seed))
    damaged = directory / "fa_lam0.01_seed1.json"
    damaged.write_bytes(damaged.read_bytes()[:200])  # a copy cut short
    with pytest.raises(RecordError, match="1 unreadable run record"):
        load_records(directory)
    assert main(["report", str(directory), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatness: error: 1 unreadable run record(s)")
    assert f"run record {damaged} is damaged (not valid JSON" in err[0]
    assert not (directory / "summary.md").exists()  # no table that silently lacks a run
    damaged.write_bytes(b"\xff\xfe garbage")
    assert main(["report", str(directory), "--no-plots"]) == 2
    assert str(damaged) in capsys.readouterr().err


def test_records_name_the_package_version_and_the_checkout_commit():
    """A record says what made it: the package version always, the commit and dirty flag when the
    package runs from a git checkout (the test suite does: it runs from the source tree).
    """
    import re
    import subprocess

    import flatness
    from flatness.experiments.running.platforms import environment

    env = environment("cpu")
    assert env["flatness"] == flatness.__version__
    assert env["torch"] and env["threads"] >= 1
    src = Path(flatness.__file__).resolve().parents[1]
    inside = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if inside.returncode != 0:
        pytest.skip("the package is not running from a git checkout")
    assert env["commit"] == inside.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", env["commit"])
    assert isinstance(env["dirty"], bool)
