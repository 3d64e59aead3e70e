"""Report: grouping, Welch p-values (incl. degenerate cases), summary files, plots, CLI."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
from scipy import stats

from flatness.cli import main
from flatness.experiments.record import RunRecord, write_record
from flatness.experiments.report import summarize, welch_p, write_report
from flatness.experiments.tasks import get_task

BC = "breast-cancer-mlp"


def _record(value, seed, acc, *, method="fa", hparam="lam", status="complete", protocol_id="", flat=1.0):
    name = f"{method}" + (f"_{hparam}{value:g}" if hparam else "") + f"_seed{seed}" + (f"_p{protocol_id}" if protocol_id else "")
    r = RunRecord(
        status=status,
        name=name,
        task=BC,
        method=method,
        hparam=hparam,
        value=value,
        seed=seed,
        config=get_task(BC).config.as_dict(),
        method_kwargs={"probes": 5, "every": 10} if method == "fa" else {},
        protocol_id=protocol_id,
    )
    if status == "complete":
        r = dataclasses.replace(
            r,
            final_test_acc=acc,
            best_test_acc=acc + 0.01,
            val_chosen_test_acc=acc - 0.01,
            avg_train_sq_trace_per_B=None if not value else 2.0 * flat,
            avg_epoch_sq_trace_per_B=1.5 * flat,
            measured_sq_trace_per_B=flat,
            train_seconds=10.0 + seed,
            seconds_per_epoch=0.2,
            curves={"test_acc": [acc - 0.02, acc - 0.01, acc]},
        )
    else:
        r.error = "TrainingDiverged: loss is nan"
    return r


def _write(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_record(directory / f"{r.name}.json", r)


def test_welch_p_matches_scipy_and_handles_degenerate_cases():
    a, b = [0.95, 0.96, 0.97], [0.91, 0.93, 0.92]
    assert welch_p(a, b)[0] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    p, note = welch_p([0.9, 0.9, 0.9], [0.9, 0.9, 0.9])
    assert math.isnan(p) and "identical" in note
    assert welch_p([0.9, 0.9], [0.8, 0.8]) == (0.0, "zero variance, different means")
    assert math.isnan(welch_p([0.9], [0.8, 0.7])[0])


def test_summarize_groups_by_method_and_protocol_with_baselines():
    records = [_record(v, s, 0.9 + 0.01 * s + v / 10) for v in (0.0, 0.01, 0.1) for s in range(3)]
    records += [_record(0.01, 0, 0.5, status="failed")]
    records += [_record(None, s, 0.9 + 0.01 * s, method="none", hparam=None) for s in range(3)]
    records += [_record(0.1, s, 0.8, method="sam", hparam="rho") for s in range(2)]
    records += [_record(0.0, s, 0.7, protocol_id="abc123") for s in range(2)]
    groups = {(g.method, g.protocol_id): g for g in summarize(records)}
    fa = groups[("fa", "")]
    assert [row.value for row in fa.rows] == [0.0, 0.01, 0.1]
    assert fa.rows[0].p_note == "baseline" and fa.baseline == "λ = 0"
    row = fa.rows[1]
    assert len(row.runs) == 3 and len(row.failed) == 1 and row.seeds == [0, 1, 2]
    mean, std, n = row.stats["final_test_acc"]
    assert n == 3 and mean == pytest.approx(0.911) and std == pytest.approx(0.01)
    assert row.p_value == pytest.approx(
        stats.ttest_ind([0.901, 0.911, 0.921], [0.9, 0.91, 0.92], equal_var=False).pvalue
    )
    assert fa.rows[0].stats["avg_train_sq_trace_per_B"][2] == 0  # λ = 0 computes no penalty
    sam = groups[("sam", "")]
    assert sam.baseline == "method none" and 0 <= sam.rows[0].p_value <= 1
    other_protocol = groups[("fa", "abc123")]
    assert other_protocol.rows[0].p_note == "baseline"


def test_write_report_files_and_tables(tmp_path):
    d = tmp_path / BC
    _write(d, [_record(v, s, 0.95 + 0.005 * s, flat=10 / (1 + 100 * v)) for v in (0.0, 0.001, 0.01) for s in range(3)])
    (d / ".fa_lam0_seed9.json.x1y2.tmp").write_text("{half")  # what a kill -9 can leave: ignored
    text = write_report(d)
    md = (d / "summary.md").read_text()
    assert md == text and "(the paper's Table 3)" in md
    assert "| λ | runs | Final acc | Best acc† | Val-chosen acc |" in md
    assert "| 0 | 3 | 0.9550 ± 0.0050 |" in md and "not computed" in md
    assert md.count(" | 1 | 0.5") == 2  # identical accuracies on both sides: p = 1
    assert "0.5556" in md  # the paper's column
    rows = list(csv.DictReader((d / "summary.csv").open()))
    assert [r["value"] for r in rows] == ["0.0", "0.001", "0.01"] and rows[0]["runs"] == "3"
    assert float(rows[2]["measured_sq_trace_per_B_mean"]) == pytest.approx(5.0)
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert pngs == ["fa_accuracy.png", "fa_curves.png", "fa_flatness.png"]
    assert all((d / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_report_cli_on_a_parent_directory_and_errors(tmp_path, capsys):
    _write(tmp_path / "runs" / BC, [_record(0.0, s, 0.95) for s in range(2)])
    assert main(["report", str(tmp_path / "runs"), "--no-plots"]) == 0
    assert "## breast-cancer-mlp" in capsys.readouterr().out
    assert (tmp_path / "runs" / BC / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    for target in ("empty", "missing"):
        assert main(["report", str(tmp_path / target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flatness: error:")
