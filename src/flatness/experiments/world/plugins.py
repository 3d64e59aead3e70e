r"""Tasks from outside the package: the one resolution of a task name (:func:`resolve_task`).

Every command that takes a task accepts, besides a built-in name (``breast-cancer-mlp``):

* ``FILE.py:FACTORY`` — a Python file (relative to the working directory, or absolute); it is
  imported as a module of its own with its folder put on ``sys.path`` (as when Python runs a
  script, so it can import its neighbours), and ``FACTORY()`` returns the task
  (:func:`~flatness.experiments.world.custom.custom_task`, or a
  :class:`~flatness.experiments.world.tasks.Task`; ``FACTORY`` may also name a task object);
* ``package.module:FACTORY`` — the same, from an importable module (the working directory is
  searched last, as by ``python -m``);
* ``NAME`` — a task an installed package registers under the entry-point group
  ``flatness.tasks`` (``NAME = "package.module:FACTORY"``; the entry point's name must be its
  task's name).

A loaded task gets a ``source``: the reference as given, its kind, the resolved file or module,
the factory, the SHA-256 of the factory's file, and for an entry point its distribution. Run
records and checkpoints store it, so later commands (``report --measures``, ``measure``, a
worker process) load the same task again from it (:func:`recorded_task`) — and refuse, in one
line, when the file's hash differs from the recorded one (:func:`check_source`): the task's code
changed, so its old runs are not runs of the new one. The hash covers the factory's file only,
not modules it imports or data files it reads: raise the task's ``version`` when those change.

A plugin that cannot work is one :class:`PluginError` line naming the reference and what is
wrong: a missing file, an import that fails (the exception's type and message, and its line), a
missing factory, a factory that raises or returns something else than a task, a task whose
definition fails its checks (:class:`~flatness.experiments.world.custom.TaskDefinitionError`).

Example:
    >>> from flatness.experiments.world.plugins import resolve_task
    >>> resolve_task("breast-cancer-mlp").name
    'breast-cancer-mlp'
    >>> resolve_task("no/such/file.py:make_task")
    Traceback (most recent call last):
    ...
    flatness.experiments.world.plugins.PluginError: task plugin no/such/file.py:make_task: no file no/such/file.py
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...utils import FlatnessError
from .custom import NAME_PATTERN, TaskDefinitionError
from .tasks import PLUGIN_TASKS, TASKS, Task, get_task

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "resolve_task",
    "recorded_task",
    "check_source",
    "known_task",
    "plugin_sources",
    "restore_plugins",
    "entry_point_tasks",
    "list_tasks",
    "file_sha256",
]

ENTRY_POINT_GROUP = "flatness.tasks"
# (kind, location, factory, sha256) -> the task it made, so one process calls a factory once
_LOADED: dict[tuple[str, str, str, str | None], Task] = {}


class PluginError(FlatnessError):
    """A task plugin that cannot be used: one line naming it and what is wrong."""


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's bytes, hex (what records store of a plugin's file)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _line_in(exc: BaseException, file: str | None) -> str:
    """`` (FILE line N)``: the deepest frame of ``exc``'s traceback in ``file`` (or its syntax error)."""
    if file is None:
        return ""
    if isinstance(exc, SyntaxError):
        return ""  # its message names the file and line already
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == Path(file)]
    return f" ({Path(file).name} line {lines[-1]})" if lines else ""


def known_task(name: str) -> Task | None:
    """The built-in or already loaded plugin task called ``name``, else ``None`` (loads nothing)."""
    return TASKS.get(name) or PLUGIN_TASKS.get(name)


def resolve_task(reference: str) -> Task:
    """The task a command line names.

    A built-in name, ``FILE.py:FACTORY``, ``package.module:FACTORY`` or an installed entry point's
    name (module docs).

    Loaded plugin tasks are registered under their name, so the pipeline finds them with
    :func:`~flatness.experiments.world.tasks.get_task` for the rest of the process.
    """
    if reference in TASKS:
        return TASKS[reference]
    target, colon, factory = reference.rpartition(":")
    if colon:
        if not target or not factory.isidentifier():
            raise PluginError(f"task plugin {reference}: name it as FILE.py:FACTORY or package.module:FACTORY")
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _load_file(reference, target, factory)
        return _load_module(reference, target, factory)
    if reference in PLUGIN_TASKS:
        return PLUGIN_TASKS[reference]
    points = entry_point_tasks()
    if reference in points:
        return _load_entry_point(reference, points[reference])
    installed = f", installed: {', '.join(sorted(points))}" if points else ""
    raise FlatnessError(
        f"unknown task {reference!r}; expected one of: {', '.join(TASKS)}{installed}, or a plugin "
        "FILE.py:FACTORY or package.module:FACTORY (`flatness tasks` lists them)"
    )


def _load_file(reference: str, target: str, factory: str, *, recorded: bool = False) -> Task:
    path = Path(target).expanduser()
    if not path.is_file():
        why = "the file the records name no longer exists" if recorded else f"no file {target}"
        raise PluginError(f"task plugin {reference}: {why}" + (f" ({path})" if recorded else ""))
    path = path.resolve()
    sha = file_sha256(path)
    key = ("file", str(path), factory, sha)
    if key in _LOADED:
        return _register(key, _LOADED[key], _LOADED[key].source or {})
    module_name = "flatness_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"task plugin {reference}: {target} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[module_name] = module  # dataclasses, pickling and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: B036 - a plugin's SystemExit is a failed import too
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PluginError(f"task plugin {reference}: importing it failed: "
                          f"{_oneline(exc)}{_line_in(exc, str(path))}") from None
    source = {"reference": reference, "kind": "file", "location": str(path), "factory": factory,
              "file": str(path), "sha256": sha}
    return _register(key, _call_factory(reference, module, factory, str(path)), source)


def _load_module(reference: str, module_name: str, factory: str) -> Task:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `flatness` is a console script: its sys.path[0] is its own folder
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise PluginError(f"task plugin {reference}: no module named {exc.name!r} "
                              "(is its package installed, or its folder on PYTHONPATH?)") from None
        raise PluginError(f"task plugin {reference}: importing {module_name} failed: {_oneline(exc)}") from None
    except Exception as exc:
        file = getattr(sys.modules.get(module_name), "__file__", None)
        raise PluginError(f"task plugin {reference}: importing {module_name} failed: "
                          f"{_oneline(exc)}{_line_in(exc, file)}") from None
    file = getattr(module, "__file__", None)
    sha = file_sha256(file) if file else None
    key = ("module", module_name, factory, sha)
    if key in _LOADED:
        return _register(key, _LOADED[key], _LOADED[key].source or {})
    source = {"reference": reference, "kind": "module", "location": module_name, "factory": factory,
              "file": file and str(Path(file).resolve()), "sha256": sha}
    return _register(key, _call_factory(reference, module, factory, file), source)


def entry_point_tasks() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed task plugins.

    Entry-point group ``flatness.tasks``, by name; a name two distributions register with different
    targets is a ``PluginError``.
    """
    out: dict[str, importlib.metadata.EntryPoint] = {}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name in out and out[point.name].value != point.value:
            raise PluginError(f"two installed packages register the task {point.name!r} "
                              f"({out[point.name].value} and {point.value}); uninstall one")
        out[point.name] = point
    return out


def _load_entry_point(name: str, point: importlib.metadata.EntryPoint) -> Task:
    dist = getattr(point, "dist", None)
    origin = f"entry point {name} = {point.value}" + (f" of {dist.name} {dist.version}" if dist else "")
    module_name, _, factory = point.value.partition(":")
    module_name = module_name.strip()
    factory = factory.strip()
    if not factory:
        raise PluginError(f"task plugin {origin}: name the factory as package.module:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        file = getattr(sys.modules.get(module_name), "__file__", None)
        raise PluginError(f"task plugin {origin}: importing {module_name} failed: "
                          f"{_oneline(exc)}{_line_in(exc, file)}") from None
    file = getattr(module, "__file__", None)
    sha = file_sha256(file) if file else None
    key = ("entry-point", name, point.value, sha)
    if key in _LOADED:
        return _register(key, _LOADED[key], _LOADED[key].source or {})
    task = _call_factory(origin, module, factory, file)
    if task.name != name:
        raise PluginError(f"task plugin {origin}: it makes a task called {task.name!r}; an entry point's "
                          "name must be its task's name")
    source = {"reference": name, "kind": "entry-point", "location": name, "factory": factory,
              "module": module_name, "file": file and str(Path(file).resolve()), "sha256": sha,
              "distribution": f"{dist.name} {dist.version}" if dist else None}
    return _register(key, task, source)


def _call_factory(reference: str, module: Any, factory: str, file: str | None) -> Task:
    where = Path(file).name if file else getattr(module, "__name__", "the module")
    if not hasattr(module, factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        defined = f" (it defines: {', '.join(names)})" if names else ""
        raise PluginError(f"task plugin {reference}: {where} has no {factory!r}{defined}")
    made = getattr(module, factory)
    if not isinstance(made, Task):
        if not callable(made):
            raise PluginError(f"task plugin {reference}: {factory} is a {type(made).__name__}, not a function")
        try:
            made = made()
        except TaskDefinitionError as exc:
            raise PluginError(f"task plugin {reference}: {exc}") from None
        except Exception as exc:
            raise PluginError(f"task plugin {reference}: {factory}() raised {_oneline(exc)}"
                              f"{_line_in(exc, file)}") from None
    if not isinstance(made, Task):
        raise PluginError(f"task plugin {reference}: {factory}() returned {type(made).__name__}, expected a "
                          "task (return flatness.experiments.custom_task(...))")
    if made.name in TASKS or any(made is t for t in TASKS.values()):
        raise PluginError(f"task plugin {reference}: its task is called {made.name!r}, a built-in task's name")
    if not isinstance(made.name, str) or not NAME_PATTERN.fullmatch(made.name):
        raise PluginError(f"task plugin {reference}: task name {made.name!r}: use letters, digits, '.', '_', '-'")
    return made


def _register(key: tuple[str, str, str, str | None], task: Task, source: dict[str, Any]) -> Task:
    held = PLUGIN_TASKS.get(task.name)
    if held is not None and held.source is not None and held is not task:
        same_place = (held.source["kind"], held.source["location"], held.source["factory"]) == key[:3]
        if not same_place:  # the same file loaded again after an edit replaces its older self
            raise PluginError(f"two plugins define a task called {task.name!r}: {held.source['reference']} "
                              f"and {source['reference']}")
    task.source = source
    _LOADED[key] = task
    PLUGIN_TASKS[task.name] = task
    return task


def _load_recorded(name: str, source: Mapping[str, Any]) -> Task:
    kind, reference = source.get("kind"), str(source.get("reference"))
    if kind == "file":
        return _load_file(reference, str(source["location"]), str(source["factory"]), recorded=True)
    if kind == "module":
        return _load_module(reference, str(source["location"]), str(source["factory"]))
    if kind == "entry-point":
        return resolve_task(name)
    raise PluginError(f"task {name}: the records name a plugin of unknown kind {kind!r}")


def check_source(recorded: Mapping[str, Any] | None, task: Task, what: str) -> None:
    """``PluginError`` unless ``task`` comes from the file ``recorded``.

    A record's or a checkpoint's ``task_source`` names, unchanged: same SHA-256. ``what``: whose
    source it is (the message).
    """
    if not recorded:
        return
    current = task.source or {}
    old, new = recorded.get("sha256"), current.get("sha256")
    if old != new:
        raise PluginError(
            f"{what} were made by the task plugin {recorded.get('reference')} ({recorded.get('file')}, SHA-256 "
            f"{str(old)[:12]}); the task {task.name} now comes from {current.get('file') or 'built-in code'} "
            f"(SHA-256 {str(new)[:12]}): its code changed since. "
            "Restore that file (or, for new runs, use another results directory)"
        )


def recorded_task(name: str, source: Mapping[str, Any] | None) -> Task:
    """The task of a record or checkpoint.

    Built-in, loaded in this process, or loaded again from the ``source`` it stored; ``PluginError``
    when that plugin's file changed (:func:`check_source`).
    """
    if not source:
        return get_task(name)
    task = PLUGIN_TASKS.get(name)
    if task is None:
        task = _load_recorded(name, source)
        if task.name != name:
            raise PluginError(f"the task plugin {source.get('reference')} now makes a task called "
                              f"{task.name!r}, not {name!r}")
    check_source(source, task, f"the runs of task {name}")
    return task


def plugin_sources() -> list[tuple[str, dict[str, Any]]]:
    """The plugin tasks loaded in this process, as ``(name, source)`` (for worker processes)."""
    return [(name, dict(task.source)) for name, task in PLUGIN_TASKS.items() if task.source]


def restore_plugins(sources: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Load the plugin tasks of :func:`plugin_sources` in this (worker) process."""
    for name, source in sources:
        recorded_task(name, source)


def list_tasks(references: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The built-in tasks, the installed task plugins and ``references``.

    One dict each with ``name``, ``kind``, ``origin``, ``protocols``, ``description``, and ``error``
    when a plugin cannot be loaded (the others are listed all the same).
    """
    rows: list[dict[str, Any]] = []

    def row(task: Task, kind: str, origin: str) -> dict[str, Any]:
        return {"name": task.name, "kind": kind, "origin": origin, "protocols": list(task.protocols),
                "description": task.description, "error": None}

    for task in TASKS.values():
        rows.append(row(task, "built-in", "flatness"))
    try:
        points = entry_point_tasks()
    except PluginError as exc:
        points = {}
        rows.append({"name": "?", "kind": "entry point", "origin": ENTRY_POINT_GROUP, "protocols": [],
                     "description": "", "error": str(exc)})
    for name, point in sorted(points.items()):
        try:
            rows.append(row(_load_entry_point(name, point), "entry point", point.value))
        except FlatnessError as exc:
            rows.append({"name": name, "kind": "entry point", "origin": point.value, "protocols": [],
                         "description": "", "error": str(exc)})
    for reference in references:
        try:
            task = resolve_task(reference)
            source = task.source or {}
            rows.append(row(task, str(source.get("kind", "built-in")), reference))
        except FlatnessError as exc:
            rows.append({"name": reference, "kind": "plugin", "origin": reference, "protocols": [],
                         "description": "", "error": str(exc)})
    return rows
