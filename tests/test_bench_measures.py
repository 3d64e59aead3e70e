"""``flatness bench measures`` and ``bench overhead``: every reported key, end to end on a tiny model.

No timing assertions here (speed targets are checked by running the benchmarks).
"""

import contextlib
import json
import math

import pytest
import torch

from flatness.cli import main
from flatness.experiments.running.bench.overhead import TARGETS
from flatness.experiments.running.platforms import cpu_model


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads 1`` sets torch's thread count for the process: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


OVERHEAD_KEYS = ("hessian_trace_hvp_overhead", "density_hvp_overhead", "lambda_max_hvp_overhead")


def test_bench_measures_reports_the_hvp_floor_and_overheads(capsys):
    args = ["bench", "measures", "--quick", "--json", "--examples", "64", "--matvecs", "6",
            "--density-steps", "5", "--grid", "3", "--train-steps", "2", "--threads", "1"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    low, high = result["hvp_ms_range"]
    assert 0 < low <= result["hvp_ms"] <= high
    for key in (*OVERHEAD_KEYS, "density_reorth_overhead"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["hessian_trace_matvecs"] == 6 and result["density_steps"] == 5
    assert 1 <= result["lambda_max_hvps"] <= result["num_params"]
    # λ_max to 1e-3 agrees with the default-tolerance value to that accuracy
    assert result["lambda_max_rel_error"] <= 1e-3
    assert isinstance(result["targets_met"], bool) and result["threads"] == 1
    assert result["cpu"] == cpu_model() and result["torch"] == torch.__version__  # platform named


def test_bench_measures_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["bench", "measures", "--quick", "--density-steps", "1"]) == 2
    assert "density-steps" in capsys.readouterr().err
    for args in (["overhead", "--batch", "-3"], ["overhead", "--threads", "0"], ["measures", "--threads", "-1"],
                 ["variance", "--threads", "0"]):
        with pytest.raises(SystemExit) if "--threads" in args else contextlib.nullcontext():
            assert main(["bench", *args]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and ("--batch" in err or "--threads" in err), (args, err)
    # A named data directory without CIFAR-100 is an error, not synthetic timings.
    for bench in ("measures", "variance"):
        assert main(["bench", bench, "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flatness: error: no CIFAR-100 in --data-dir") and len(err.strip().splitlines()) == 1


def test_bench_overhead_reports_targets_and_cpu_ratios(capsys):
    assert main(["bench", "overhead", "--quick", "--json", "--steps", "2", "--rounds", "1",
                 "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in TARGETS:
        assert result[key] > 0 and result[key.replace("_ratio", "_cpu_ratio")] > 0
    assert isinstance(result["targets_met"], bool) and result["plain_cpu_ms"] > 0
    assert result["cpu"] == cpu_model() and result["threads"] == 1
