"""`flatness report --measures` adds λ_max and Tr(H) of every final model, computed once."""

import json

from flatness.experiments.reporting.report import write_report
from flatness.experiments.running.runner import execute_run
from flatness.experiments.running.specs import build_grid


def test_report_measures_fill_lambda_max_and_trace_from_checkpoints(tmp_path):
    spec = build_grid("breast-cancer-mlp", "fa", [0.0], 1, config_overrides={"epochs": 1})[0]
    record = execute_run(spec, tmp_path)
    assert record.get("lambda_max") is None and record.final_val_loss is not None
    plain = write_report(tmp_path, plots=False)
    assert "not measured" in plain
    text = write_report(tmp_path, plots=False, measures=True)
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    assert "not measured" not in row
    cached = json.loads((tmp_path / "measures" / f"{spec.name}.json").read_text())
    assert cached["lambda_max"] > 0 and cached["hessian_trace"] > 0
    assert f"{cached['lambda_max']:.3g}" in row
    # later reports show the cached values without computing anything
    again = write_report(tmp_path, plots=False)
    assert next(line for line in again.splitlines() if line.startswith("| 0 |")) == row
    # committed results keep no checkpoints: `--measures` still shows what the cache holds
    (tmp_path / str(record.checkpoint)).unlink()
    kept = write_report(tmp_path, plots=False, measures=True)
    assert next(line for line in kept.splitlines() if line.startswith("| 0 |")) == row


def test_a_checkpoint_from_another_training_is_not_measured(tmp_path, capsys):
    spec = build_grid("breast-cancer-mlp", "fa", [0.0], 1, config_overrides={"epochs": 1})[0]
    record = execute_run(spec, tmp_path)
    # the record now claims a different training than the one that wrote the checkpoint (as when
    # records are copied from one results directory into another that holds older checkpoints)
    path = tmp_path / f"{spec.name}.json"
    data = json.loads(path.read_text())
    data["finished_at"] = "2000-01-01T00:00:00+00:00"
    path.write_text(json.dumps(data))
    text = write_report(tmp_path, plots=False, measures=True)
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    assert "not measured" in row
    err = capsys.readouterr().err
    warning = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("flatness: warning:")]
    assert len(warning) == 1 and f"is not the one run {spec.name} recorded" in warning[0]
    assert not (tmp_path / "measures" / f"{spec.name}.json").exists()
    assert record.finished_at in err
