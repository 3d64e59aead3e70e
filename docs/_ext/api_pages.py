"""The API reference, generated from ``__all__``, and the gate on missing docstrings.

Every public module of :mod:`flatness` (no ``_``-prefixed part in its dotted name; the CLI's
command modules are documented by the CLI reference instead) gets one page: its docstring, a
summary table of its ``__all__`` and the full documentation of the names documented there. Each
object is documented once, on the page of the shallowest public module that exports it — the path
users import it from (``flatness.FlatnessPenalty``); the defining module's table links there, and
a reference by any path that imports the object resolves to that page (:func:`lookup`).

The gate (:func:`missing_docstrings`) fails the build for a public module without a docstring or
without ``__all__`` (unless it binds no public name: a package of submodules), a class or
function in an ``__all__`` without a docstring, and a public method or property of such a class
without one (an inherited docstring counts). Run it alone with
``python docs/_ext/api_pages.py``.
"""

from __future__ import annotations
import __future__

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "flatness"
# Documented by the CLI reference (cli.md), not as Python API: the parsers of each command.
EXCLUDED_PREFIXES = ("flatness.cli.",)
GROUPS = (  # (caption, module prefix) in the order of the index; a module goes to its longest prefix
    ("The library", "flatness"),
    ("Measures", "flatness.measures"),
    ("Methods", "flatness.methods"),
    ("The pipeline", "flatness.experiments"),
    ("The pipeline: world (tasks, data, models)", "flatness.experiments.world"),
    ("The pipeline: running (runs, records, training)", "flatness.experiments.running"),
    ("The pipeline: reporting (statistics, reports, the study)", "flatness.experiments.reporting"),
    ("The command line", "flatness.cli"),
)


def public_modules(package: str = PACKAGE) -> list[str]:
    """Dotted names of the public modules of ``package``, the package first, then sorted."""
    root = importlib.import_module(package)
    names = [package]
    def fail(name: str) -> None:  # walk_packages would skip a package that fails to import
        raise ImportError(f"public package {name} cannot be imported (a missing optional dependency?)")

    for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=fail):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        if info.name.startswith(EXCLUDED_PREFIXES):
            continue
        names.append(info.name)
    return [package] + sorted(names[1:])


def _is_code(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def canonical_homes(modules: list[str]) -> dict[tuple[str, str], str]:
    """``(module, name) -> module`` whose page documents the name: of the public modules that
    export the same object under that name, the one users import it from — the shallowest
    (``flatness`` before ``flatness.penalties``). autodoc then records the defining module's
    name as ``:canonical:``, so references by either path resolve.
    """
    exporters: dict[tuple[int, str], list[str]] = {}
    entries: list[tuple[str, str, tuple[int, str]]] = []
    for mod_name in modules:
        module = importlib.import_module(mod_name)
        for name in getattr(module, "__all__", ()):
            if hasattr(module, name):
                key = (id(getattr(module, name)), name)
                exporters.setdefault(key, []).append(mod_name)
                entries.append((mod_name, name, key))
    homes = {}
    for mod_name, name, key in entries:
        # not where the name is also a submodule's (flatness.measures.pac_bayes, the function)
        candidates = [e for e in exporters[key] if f"{e}.{name}" not in modules] or exporters[key]
        homes[(mod_name, name)] = min(candidates, key=lambda e: (e.count("."), e))
    return homes


def _public_members(cls: type) -> list[str]:
    """Public methods and properties that ``cls`` itself defines."""
    names = []
    for key, value in vars(cls).items():
        if key.startswith("_"):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if inspect.isfunction(func) or isinstance(value, property):
            names.append(key)
    return names


def _public_attributes(module: ModuleType) -> list[str]:
    """Names ``module`` binds that look public: no ``_`` prefix, not a module, not a ``from __future__`` feature."""
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)
            and not isinstance(value, __future__._Feature)]


def missing_docstrings(modules: list[str]) -> list[str]:
    """One line per public module, name, method or property without a docstring."""
    problems: list[str] = []
    seen: set[int] = set()
    for mod_name in modules:
        module = importlib.import_module(mod_name)
        if not (module.__doc__ or "").strip():
            problems.append(f"{mod_name}: module has no docstring")
        exported = getattr(module, "__all__", None)
        if exported is None:
            if _public_attributes(module):  # a package of submodules alone declares nothing
                problems.append(f"{mod_name}: module has no __all__ (its public names are undeclared)")
            continue
        for name in exported:
            if not hasattr(module, name):
                problems.append(f"{mod_name}.{name}: listed in __all__ but not defined")
                continue
            obj = getattr(module, name)
            if not _is_code(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            problems += _undocumented(obj)
    return problems


def _undocumented(obj: Any) -> list[str]:
    """One line for ``obj`` without a docstring, and for each public member of a class without one."""
    where = f"{obj.__module__}.{obj.__qualname__}"  # where to add it
    problems = [] if (obj.__doc__ or "").strip() else [f"{where}: no docstring"]
    if inspect.isclass(obj):
        problems += [f"{where}.{member}: no docstring" for member in _public_members(obj)
                     if not inspect.getdoc(getattr(obj, member))]
    return problems


def _group(mod_name: str) -> str:
    matches = [(len(prefix), caption) for caption, prefix in GROUPS
               if mod_name == prefix or mod_name.startswith(prefix + ".")]
    return max(matches)[1]


def _relative(full: str, mod_name: str) -> str:
    return full[len(mod_name) + 1:] if full.startswith(mod_name + ".") else full


def _page(mod_name: str, homes: dict[tuple[str, str], str]) -> str:
    module = importlib.import_module(mod_name)
    title = f"``{mod_name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {mod_name}", ""]
    exported = list(getattr(module, "__all__", ()))
    if exported:
        lines += [".. rubric:: Public names", "", ".. autosummary::", "   :nosignatures:", ""]
        # names documented on this page relative to it (autosummary rejects the module's prefix)
        lines += [f"   ~{_relative(f'{homes[(mod_name, n)]}.{n}', mod_name)}" for n in exported]
        lines.append("")
    own = [n for n in exported if homes.get((mod_name, n)) == mod_name]
    for name in own:
        obj = getattr(module, name)
        full = f"{mod_name}.{name}"
        if inspect.isclass(obj):
            lines += [f".. autoclass:: {full}", "   :members:", "   :show-inheritance:", ""]
        elif inspect.isfunction(obj):
            lines += [f".. autofunction:: {full}", ""]
        else:
            long_value = isinstance(obj, (dict, list)) and len(repr(obj)) > 300
            lines += [f".. autodata:: {full}", "   :no-value:" if long_value else "", ""]
    lines += [f".. minigallery:: {' '.join(f'{mod_name}.{n}' for n in own)}", ""] if own else []
    return "\n".join(lines)


def _index(modules: list[str]) -> str:
    lines = ["API reference", "=============", "",
             "Generated from the docstrings of every public module's ``__all__``. Each object is "
             "documented once, under the shortest public path that exports it (the one to import "
             "it from); every other module that exports it links there.", ""]
    for caption, _ in GROUPS:
        members = [m for m in modules if _group(m) == caption]
        if members:
            lines += [caption, "-" * len(caption), "", ".. toctree::", "   :maxdepth: 1", ""]
            lines += [f"   {m}" for m in members] + [""]
    return "\n".join(lines)


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file holds it already (Sphinx rebuilds only changed pages)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_pages(outdir: Path, modules: list[str]) -> None:
    """Write ``outdir/index.rst`` and one ``outdir/MODULE.rst`` per module; remove stale pages."""
    outdir.mkdir(parents=True, exist_ok=True)
    homes = canonical_homes(modules)
    wanted = {"index.rst"} | {f"{m}.rst" for m in modules}
    for stale in outdir.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    write_if_changed(outdir / "index.rst", _index(modules))
    for mod_name in modules:
        write_if_changed(outdir / f"{mod_name}.rst", _page(mod_name, homes))


# (id(object), name) -> the module whose page documents it; set when the pages are written
_HOME_OF: dict[tuple[int, str], str] = {}


def index_homes(modules: list[str]) -> None:
    """Record where each exported object is documented, for resolving references to it."""
    _HOME_OF.clear()
    for (mod_name, name), home in canonical_homes(modules).items():
        _HOME_OF[(id(getattr(importlib.import_module(mod_name), name)), name)] = home


def lookup(path: str) -> tuple[bool, str | None]:
    """Whether ``path`` names an existing module or attribute of the package, and the path of
    the page entry that documents it (``None`` if none does).
    """
    parts = path.split(".")
    if parts[0] != PACKAGE:
        return False, None
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        rest = parts[i:]
        if not rest:
            return True, None
        obj: Any = module
        for depth, attr in enumerate(rest):
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif inspect.isclass(obj) and any(attr in getattr(k, "__annotations__", {}) for k in obj.__mro__):
                return True, None  # an annotated (dataclass) field: exists, not a page entry
            else:
                return False, None
            if depth == 0:
                home = _HOME_OF.get((id(obj), attr))
                top = f"{home}.{attr}" if home else None
        return True, ".".join([top, *rest[1:]]) if top else None
    return False, None


def _candidates(target: str, node: Any) -> list[str]:
    """Absolute paths a reference may mean: relative to the documented object's class and
    module, to the page's, then to each enclosing package, then as written.
    """
    name = target.lstrip(".")
    scopes: list[str] = []
    source = str(node.source or "")
    if "docstring of " in source:  # autodoc: "FILE:docstring of flatness.x.y.Obj"
        scopes.append(source.rsplit("docstring of ", 1)[1].split(":")[0])
    module, cls = node.get("py:module"), node.get("py:class")
    if module:
        scopes.append(f"{module}.{cls}" if cls else module)
    paths: list[str] = []
    for scope in scopes:
        parts = scope.split(".")
        paths += [".".join([*parts[:i], name]) for i in range(len(parts), 0, -1)]
    return [*dict.fromkeys(paths), name]


def _unique_suffix(domain: Any, target: str, module: str | None) -> str | None:
    """The one documented object under ``module`` whose name ends with ``.target``."""
    if not module:
        return None
    found = [n for n in domain.objects if n.startswith(module + ".") and n.endswith("." + target)]
    return found[0] if len(found) == 1 else None


def _resolve_alias(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a Python reference that names an object by another of its import paths (the
    defining module's, a module-relative or class-relative name) to the page that documents it.
    A reference to an existing object that no page documents (a helper outside every
    ``__all__``) is shown as code, unlinked; a reference to nothing stays a warning.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    builder = app.builder
    for path in _candidates(node["reftarget"], node):
        exists, documented = lookup(path)
        if not exists:
            continue
        if documented and documented != path:
            found = domain.resolve_any_xref(env, node["refdoc"], builder, documented, node, contnode)
            if found:
                return found[0][1]
        return contnode
    if "<autosummary>" in str(node.source or ""):
        # a summary line out of its class's context; the full docstring (rendered with that
        # context) is checked where it is documented
        unique = _unique_suffix(domain, node["reftarget"].lstrip("."), node.get("py:module"))
        found = unique and domain.resolve_any_xref(env, node["refdoc"], builder, unique, node, contnode)
        return found[0][1] if found else contnode
    return None


def _builder_inited(app: Any) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    modules = public_modules()
    for problem in missing_docstrings(modules):
        logger.warning(f"missing docstring: {problem}", type="flatness", subtype="docstring")
    write_pages(Path(app.srcdir) / "api", modules)
    index_homes(modules)


def _drop_type_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """A constant without a ``#:`` comment would show its type's docstring (``dict``'s): drop it."""
    if what in ("data", "attribute") and not _is_code(obj):
        text = "\n".join(lines).strip()
        for source in (type(obj), getattr(obj, "__origin__", None)):  # dict[str, Tensor]: dict
            doc = getattr(source, "__doc__", None)
            if isinstance(doc, str) and text == inspect.cleandoc(doc).strip():
                lines.clear()


def _dataclass_factories(app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None,
                         return_annotation: str | None) -> tuple[str | None, str | None] | None:
    """A dataclass field's ``default_factory`` shows as ``<factory>``, which is not Python and
    breaks the signature's parsing (``dict[str`` as a type): show ``...`` instead.
    """
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point: generate the API pages and check docstrings before reading sources."""
    app.connect("builder-inited", _builder_inited)
    app.connect("autodoc-process-docstring", _drop_type_docstring)
    app.connect("autodoc-process-signature", _dataclass_factories)
    app.connect("missing-reference", _resolve_alias)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main() -> int:
    """``python docs/_ext/api_pages.py``: print every missing docstring; exit 1 if there is one."""
    problems = missing_docstrings(public_modules())
    for problem in problems:
        print(f"missing docstring: {problem}")
    print(f"{len(problems)} missing docstring(s) in {len(public_modules())} public modules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
