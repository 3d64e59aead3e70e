"""The paper's pipeline, in three rooms; arrows point only downward (reporting → running → world).

- :mod:`.world` — what an experiment is about: :mod:`~.world.tasks` (a task and its training
  protocols), :mod:`~.world.data` (datasets, splits, mini-batches), :mod:`~.world.models`,
  :mod:`~.world.architectures`, :mod:`~.world.augment`.
- :mod:`.running` — making runs: :mod:`~.running.specs` (what identifies a run),
  :mod:`~.running.runner` (one run, a resumable grid of runs), :mod:`~.running.training` (the
  one training loop), :mod:`~.running.claims`, :mod:`~.running.checkpoints`,
  :mod:`~.running.record` (the typed run record), :mod:`~.running.measure` (fixed measurement
  protocols), :mod:`~.running.distributed` (DDP), :mod:`~.running.platforms`,
  :mod:`~.running.progress`, :mod:`~.running.study_population`, :mod:`~.running.bench`.
- :mod:`.reporting` — reading runs: :mod:`~.reporting.stats` (the one statistics module),
  :mod:`~.reporting.groups`, :mod:`~.reporting.tables`, :mod:`~.reporting.plots`,
  :mod:`~.reporting.report`, :mod:`~.reporting.compare`, :mod:`~.reporting.equal_compute`,
  :mod:`~.reporting.study` and :mod:`~.reporting.study_report`, :mod:`~.reporting.kfac_agreement`.

Everything here builds on the library (:mod:`flatness`) and nothing in the library imports it.
The 0.2 paths (``flatness.experiments.tasks``, ...) still import, with a deprecation warning.

The most used names are importable from here (loaded on first use):
``custom_task`` and ``TrainConfig`` (your own task from parts: ``docs/own-task.md``),
``resolve_task`` (a task by name, ``FILE.py:FACTORY``, ``package.module:FACTORY`` or entry point),
``build_grid``, ``run_grid``, ``execute_run``, ``RunSpec``, ``get_task``, ``train``.

Example:
    >>> import flatness.experiments as fx
    >>> fx.TrainConfig(epochs=3, batch_size=64, lr=1e-3, weight_decay=0.0).optimizer
    'adam'
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "custom_task", "TrainConfig", "resolve_task",
    "build_grid", "run_grid", "execute_run", "RunSpec", "get_task", "train",
]

_HOMES = {
    "custom_task": ".world.custom",
    "resolve_task": ".world.plugins",
    "build_grid": ".running.specs",
    "RunSpec": ".running.specs",
    "run_grid": ".running.runner",
    "execute_run": ".running.runner",
    "get_task": ".world.tasks",
    "TrainConfig": ".world.config",
    "train": ".running.training",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
