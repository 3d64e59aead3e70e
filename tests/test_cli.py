"""The CLI's own contract: one JSON object from `bench overhead`, one-line errors, exit codes."""

import json
import subprocess
import sys


def _flatness(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flatness", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bench_overhead_prints_one_json_object_with_the_ratios():
    proc = _flatness("bench", "overhead", "--quick", "--json", "--steps", "4", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("plain_ms", "fa_m1_k1_ratio", "fa_m5_k1_ratio", "fa_m5_k10_ratio",
                "reference_m5_k1_ratio", "fa_m5_k1_sub32_ratio", "fa_kfac_k1_ratio",
                "fa_m1_k1_gaussian_ratio", "fa_m5_k10_gaussian_ratio", "fa_m1_k1_floor_ratio",
                "fa_m5_k10_floor_ratio"):
        assert result[key] > 0
    assert result["fa_m5_k1_ratio"] > 1.0  # a curvature step costs more than a plain one
    assert 1.0 < result["fa_m5_k10_floor_ratio"] and 1.0 < result["fa_m1_k1_floor_ratio"]


def test_bad_input_is_one_line_and_exit_2():
    for args in (["demo", "--lam", "-1"], ["bench", "overhead", "--steps", "0"],
                 ["run", "no-such-task"], ["frobnicate"]):
        proc = _flatness(*args)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert lines and "Traceback" not in proc.stderr, args
        assert lines[-1].startswith("flatness") and "error" in lines[-1], args
