"""``flatness bench methods``: runs end to end (tiny model) and reports every ratio; no timing
assertions here (speed targets are checked by running the benchmark itself).
"""

import json

from flatness.cli import main
from flatness.experiments.running.bench.methods import TARGETS


def test_bench_methods_quick_json_has_every_ratio(capsys):
    assert main(["bench", "methods", "--quick", "--json", "--steps", "2", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (*TARGETS, "gnp_exact_ratio", "rpr_ratio", "nrs_gaussian_ratio", "plain_ms"):
        assert result[key] > 0, key
    assert isinstance(result["targets_met"], bool)


def test_bench_methods_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "methods", "--quick", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness: error:") and len(err.strip().splitlines()) == 1
