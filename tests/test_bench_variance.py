"""``flatness bench variance``: runs end to end (tiny model) and reports every figure; no timing
assertions here (the target is checked by running the benchmark itself).
"""

import json

from flatness.cli import main
from flatness.experiments.running.platforms import cpu_model


def test_bench_variance_quick_json_has_every_figure(capsys):
    args = ["bench", "variance", "--quick", "--json", "--train-steps", "5", "--examples", "200",
            "--draws", "12", "--grad-draws", "2", "--steps", "1", "--rounds", "1"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hutchinson_m5_variance_time_ratio"] == 1.0 and result["plain_ms"] > 0
    for m in (1, 2, 5, 10):
        for name in (f"hutchinson_m{m}", f"cv_m{m}", f"gaussian_m{m}", f"cv_gaussian_m{m}"):
            assert result[f"{name}_ms"] > 0 and result[f"{name}_variance"] > 0, name
    assert result["best_estimator"].startswith(("cv_m", "gaussian_m", "cv_gaussian_m"))
    assert result["cv_gaussian_variance_fraction"] > 0
    assert result["variance_time_ratio"] == result[f"{result['best_estimator']}_variance_time_ratio"]
    for key in ("cv_variance_fraction_ci95", "gaussian_variance_fraction_ci95"):
        low, high = result[key]
        assert 0 < low < high
    assert result["cv_m5_grad_variance_ratio"] > 0
    assert result["cpu"] == cpu_model() and "threads" in result


def test_bench_variance_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "variance", "--quick", "--draws", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness: error:") and len(err.strip().splitlines()) == 1
