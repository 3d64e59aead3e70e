"""Tables generated from the package's registries, for the user guide.

``.. flatness-methods::`` lists :data:`flatness.methods.METHODS` (name, swept strength, default
sweep, summary line, class); ``.. flatness-measures::`` lists the measure names that
:func:`flatness.measures.compute_measures` and ``flatness measure --measures`` accept, marking
the default set. A method or measure added to a registry appears in the guide with no edit.
The cells are reStructuredText: in a Markdown page, use them inside an ``{eval-rst}`` block.
"""

from __future__ import annotations

import inspect
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _summary(obj: Any) -> str:
    return (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")


class _Table(SphinxDirective):
    def rows(self) -> tuple[list[str], list[list[str]]]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        header, rows = self.rows()
        lines = [".. list-table::", "   :header-rows: 1", ""]
        for row in [header, *rows]:
            lines.append(f"   * - {row[0]}")
            lines += [f"     - {cell}" for cell in row[1:]]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="<registry table>"), self.content_offset, container)
        return container.children


class MethodsTable(_Table):
    """The registered training methods."""

    def rows(self) -> tuple[list[str], list[list[str]]]:
        from flatness.methods import METHODS

        rows = []
        for name, cls in METHODS.items():
            grid = ", ".join(f"{v:g}" for v in cls.default_grid) or "—"
            rows.append([f"``{name}``", f"``{cls.hparam}``" if cls.hparam else "—", grid,
                         _summary(cls), f":class:`~{cls.__module__}.{cls.__qualname__}`"])
        return ["name", "strength", "default sweep", "what", "class"], rows


class MeasuresTable(_Table):
    """The measure names of :func:`flatness.measures.compute_measures`."""

    def rows(self) -> tuple[list[str], list[list[str]]]:
        from flatness.measures import DEFAULT_MEASURES, MEASURES

        rows = [[f"``{name}``", "yes" if name in DEFAULT_MEASURES else ""] for name in MEASURES]
        return ["name", "in the default set"], rows


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point: register the directives."""
    app.add_directive("flatness-methods", MethodsTable)
    app.add_directive("flatness-measures", MeasuresTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
