"""The pipeline's three rooms: arrows only downward (reporting → running → world), nothing left at
the top of ``flatness.experiments`` but its ``__init__``, and the 0.2 import paths kept as
deprecated aliases of the very same modules."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import flatness
from flatness._aliases import MOVED

EXPERIMENTS = Path(flatness.__file__).parent / "experiments"
ORDER = ("world", "running", "reporting")  # a room may import only rooms before it


def _imported_rooms(path: Path, room: str) -> set[str]:
    """The rooms of ``flatness.experiments`` that the module at ``path`` (in ``room``) imports."""
    package = ["flatness", "experiments", *path.relative_to(EXPERIMENTS).parent.parts]
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = (node.module or "").split(".")
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = [], []
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["flatness", "experiments"] and len(parts) > 2:
                    rooms.add(parts[2])
            continue
        else:
            continue
        if target[:2] == ["flatness", "experiments"]:
            if len(target) > 2:
                rooms.add(target[2])
            else:
                rooms.update(n for n in names if n in ORDER)
    rooms.discard(room)
    return rooms


@pytest.mark.parametrize("room", ORDER)
def test_rooms_import_only_downward(room):
    allowed = set(ORDER[: ORDER.index(room)])
    for path in (EXPERIMENTS / room).rglob("*.py"):
        assert _imported_rooms(path, room) <= allowed, f"{path.relative_to(EXPERIMENTS)} imports upward"


def test_the_pipeline_top_level_holds_only_its_rooms():
    modules = sorted(p.name for p in EXPERIMENTS.glob("*.py"))
    assert modules == ["__init__.py"]
    assert {p.name for p in EXPERIMENTS.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ORDER)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_pipeline_paths_are_deprecated_aliases_of_the_same_module(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)
