"""Import paths of release 0.1, kept for one release as thin aliases (deprecated).

Release 0.2 split the flat package into the library (``flatness``), the paper's pipeline
(``flatness.experiments``) and the command line (``flatness.cli``). ``import flatness.tasks``
and the other old paths below still work: they resolve to a module that forwards attribute
lookups to the new homes, with a :class:`DeprecationWarning` naming them. Nothing is imported
until an old path is used, so ``import flatness`` stays free of the pipeline and the CLI.
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

__all__ = ["ALIASES", "install"]

# old module -> the modules that now hold its names, searched in order
ALIASES: dict[str, tuple[str, ...]] = {
    "flatness.data": ("flatness.experiments.data",),
    "flatness.models": ("flatness.experiments.models", "flatness.layers"),
    "flatness.tasks": (
        "flatness.experiments.tasks",
        "flatness.experiments.checkpoints",
        "flatness.experiments.data",
        "flatness.utils",
    ),
    "flatness.train": ("flatness.experiments.training",),
    "flatness.report": ("flatness.experiments.report",),
    "flatness.compare": ("flatness.experiments.compare",),
    "flatness.distributed": ("flatness.experiments.distributed", "flatness.probes"),
    "flatness.demo": ("flatness.cli.demo",),
    "flatness.inspect_cli": ("flatness.cli.inspect",),
    "flatness.bench": ("flatness.experiments.bench",),
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


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = ALIASES[spec.name]
        warnings.warn(
            f"{spec.name} is deprecated and will be removed in flatness 0.3; import from "
            f"{' / '.join(targets)} instead",
            DeprecationWarning,
            stacklevel=3,
        )
        return _AliasModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
