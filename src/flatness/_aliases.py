"""Import paths of earlier releases, kept for one release as thin aliases (deprecated).

Two kinds, both resolved only when an old path is imported (so ``import flatness`` stays free of
the pipeline and the CLI), both with a :class:`DeprecationWarning` naming the new home:

- the 0.1 paths (``flatness.tasks``, ``flatness.train``, ...), from before the split into the
  library, the pipeline and the command line: modules that forward attribute lookups to the
  modules that now hold their names;
- the 0.2 paths of the pipeline (``flatness.experiments.tasks``, ``flatness.experiments.runner``,
  ...), from before ``flatness.experiments`` was split into ``world`` / ``running`` /
  ``reporting``: the old name is the new module itself (same object, so patching one patches
  the other).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["ALIASES", "MOVED", "install"]

_ROOMS = {
    "world": ("tasks", "data", "models", "architectures", "augment"),
    "running": (
        "specs", "runner", "training", "claims", "checkpoints", "record", "distributed",
        "measure", "progress", "platforms", "study_population", "bench",
    ),
    "reporting": (
        "stats", "groups", "tables", "plots", "report", "compare", "equal_compute",
        "kfac_agreement", "study_report", "study",
    ),
}

# 0.2 pipeline module -> its home since 0.3 (the same module object under both names)
MOVED: dict[str, str] = {
    f"flatness.experiments.{name}": f"flatness.experiments.{room}.{name}"
    for room, names in _ROOMS.items()
    for name in names
}

# 0.1 module -> the modules that now hold its names, searched in order
ALIASES: dict[str, tuple[str, ...]] = {
    "flatness.data": ("flatness.experiments.world.data",),
    "flatness.models": ("flatness.experiments.world.models", "flatness.layers"),
    "flatness.tasks": (
        "flatness.experiments.world.tasks",
        "flatness.experiments.running.checkpoints",
        "flatness.experiments.world.data",
        "flatness.utils",
    ),
    "flatness.train": ("flatness.experiments.running.training",),
    "flatness.report": ("flatness.experiments.reporting.report",),
    "flatness.compare": ("flatness.experiments.reporting.compare",),
    "flatness.distributed": ("flatness.experiments.running.distributed", "flatness.probes"),
    "flatness.demo": ("flatness.cli.demo",),
    "flatness.inspect_cli": ("flatness.cli.inspect",),
    "flatness.bench": ("flatness.experiments.running.bench",),
}


class _AliasModule(types.ModuleType):
    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = tuple(targets)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (deprecated alias) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self._targets:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in flatness 0.4; import from {new} instead",
        DeprecationWarning,
        stacklevel=4,
    )


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in ALIASES and fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if spec.name in MOVED:
            _deprecated(spec.name, MOVED[spec.name])
            return importlib.import_module(MOVED[spec.name])
        targets = ALIASES[spec.name]
        _deprecated(spec.name, " / ".join(targets))
        return _AliasModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
