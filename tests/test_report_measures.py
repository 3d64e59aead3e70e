"""`flatness report --measures` adds λ_max and Tr(H) of every final model, computed once."""

import json

from flatness.experiments import build_grid, execute_run
from flatness.report import write_report


def test_report_measures_fill_lambda_max_and_trace_from_checkpoints(tmp_path):
    spec = build_grid("breast-cancer-mlp", "fa", [0.0], 1, config_overrides={"epochs": 1})[0]
    record = execute_run(spec, tmp_path)
    assert "lambda_max" not in record
    plain = write_report(tmp_path, plots=False)
    assert "not measured" in plain
    text = write_report(tmp_path, plots=False, measures=True)
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    assert "not measured" not in row
    cached = json.loads((tmp_path / "measures" / f"{spec.name}.json").read_text())
    assert cached["lambda_max"] > 0 and cached["hessian_trace"] > 0
    assert f"{cached['lambda_max']:.3g}" in row
