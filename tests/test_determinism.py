"""The same run twice gives the same record except its timings (and the same checkpoint), for
every training method, composed methods and FA's estimator backends included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.specs import build_grid
from flatness.methods import METHODS

# what may differ between two runs of the same spec: wall-clock times, when, and the process
TIMING_KEYS = {"train_seconds", "seconds_per_epoch", "eval_seconds", "total_seconds", "finished_at",
               "seconds", "measure_seconds"}
VOLATILE_ENVIRONMENT = {"pid"}

STRENGTH = {"fa": 0.1, "sam": 0.05, "gnp": 0.05, "curvature": 0.001, "nrs": 0.1, "rpr": 0.1}
CASES = [(m, {}) for m in METHODS] + [
    ("fa", {"backend": "autograd"}),
    ("fa", {"backend": "finite-difference"}),
    ("fa", {"backend": "kfac"}),
    ("sam+fa", {"fa.lam": 0.1}),
]


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k not in TIMING_KEYS and k not in VOLATILE_ENVIRONMENT}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("method, settings", CASES, ids=[f"{m}{'-' + '-'.join(map(str, s.values())) if s else ''}"
                                                         for m, s in CASES])
def test_a_run_twice_gives_the_same_record_but_for_timings(
    tmp_path: Path, method: str, settings: dict[str, Any]
) -> None:
    value = STRENGTH.get(method.split("+")[0])
    (spec,) = build_grid("breast-cancer-mlp", method, None if value is None else [value], [1],
                         config_overrides={"epochs": 2}, method_kwargs=settings,
                         model_kwargs={"hidden": [32, 16]})
    records = []
    for attempt in ("a", "b"):
        run_grid([spec], tmp_path / attempt, progress=False, log=lambda msg: None)
        path = tmp_path / attempt / "breast-cancer-mlp" / f"{spec.name}.json"
        records.append(json.loads(path.read_text()))
    first, second = records
    assert first["status"] == "complete", first.get("error")
    assert first["environment"].get("commit") == second["environment"].get("commit")
    assert _without_timings(first) == _without_timings(second)
    weights = [torch.load(tmp_path / a / "breast-cancer-mlp" / "checkpoints" / f"{spec.name}.pt", weights_only=False)
               for a in ("a", "b")]
    state_a, state_b = (w["state_dict"] if "state_dict" in w else w for w in weights)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if isinstance(state_a[key], torch.Tensor):
            assert torch.equal(state_a[key], state_b[key]), key
