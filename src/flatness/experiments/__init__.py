"""The paper's pipeline: data, models, tasks, run records, the training loop, sweeps, reports.

Everything here builds on the library (:mod:`flatness`) and nothing in the library imports it.

- :mod:`.data` (datasets, splits, mini-batches), :mod:`.models`, :mod:`.tasks` (task + its
  training protocol), :mod:`.training` (the one training loop);
- :mod:`.specs` (what identifies a run), :mod:`.record` (the typed run record),
  :mod:`.checkpoints`, :mod:`.measure` (fixed measurement protocols), :mod:`.runner`
  (one run, a resumable grid of runs), :mod:`.distributed` (DDP);
- :mod:`.stats` (the one statistics module), :mod:`.groups`, :mod:`.tables`, :mod:`.plots`,
  :mod:`.report`, :mod:`.compare` (tables, statistics, plots); :mod:`.bench` (benchmarks).

The most used names are importable from here (loaded on first use):
``build_grid``, ``run_grid``, ``execute_run``, ``RunSpec``, ``get_task``, ``train``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_grid", "run_grid", "execute_run", "RunSpec", "get_task", "train"]

_HOMES = {
    "build_grid": ".specs",
    "RunSpec": ".specs",
    "run_grid": ".runner",
    "execute_run": ".runner",
    "get_task": ".tasks",
    "train": ".training",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
