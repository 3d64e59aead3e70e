"""The results pages: ``results/README.md`` and one page per folder of committed results.

Every folder under ``results/`` that holds a Markdown report or a PNG figure gets a page
(``results/TASK-SUB.md``, written before Sphinx reads the sources) that includes its reports
(``summary.md``, ``ranking.md``, ...) as they are and shows its figures. So a result committed
with ``flatness report`` appears in the documentation without anyone copying it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_pages import write_if_changed

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
# Reports first in this order, then the others alphabetically.
REPORT_ORDER = ("summary.md", "ranking.md", "reparam.md", "equal_compute.md")


def results_dirs(results: Path = RESULTS) -> list[str]:
    """Folders (relative, ``/``-separated) below ``results`` with a report or a figure."""
    found = []
    for folder in sorted(p for p in results.rglob("*") if p.is_dir()):
        if any(folder.glob("*.md")) or any(folder.glob("*.png")):
            found.append(folder.relative_to(results).as_posix())
    return found


def _order(path: Path) -> tuple[int, str]:
    return (REPORT_ORDER.index(path.name) if path.name in REPORT_ORDER else len(REPORT_ORDER), path.name)


def folder_page(rel: str, results: Path = RESULTS) -> str:
    """The page of ``results/REL``: its reports included, then its figures."""
    folder = results / rel
    up = "../../results"  # from docs/results/ to the repository's results/
    lines = [f"# `results/{rel}/`", ""]
    for report in sorted(folder.glob("*.md"), key=_order):
        lines += [f"```{{include}} {up}/{rel}/{report.name}", ":heading-offset: 1", "```", ""]
    figures = sorted(folder.glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            lines += [f"```{{figure}} {up}/{rel}/{figure.name}", ":width: 90%", "",
                      f"`{figure.name}`", "```", ""]
    return "\n".join(lines)


def write_results_pages(outdir: Path, results: Path = RESULTS) -> list[str]:
    """Write ``outdir/index.md`` (``results/README.md`` and the folder list) and the folder pages; remove stale ones.

    Returns the folders.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    folders = results_dirs(results)
    pages = {rel: rel.replace("/", "-") for rel in folders}
    wanted = {"index.md"} | {f"{p}.md" for p in pages.values()}
    for stale in outdir.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()
    index = ["```{include} ../../results/README.md", "```", "", "## Every results folder", "",
             "Each folder's reports, as `flatness report` / `compare` / `study` wrote them, and its "
             "figures:", ""]
    index += [f"- [`results/{rel}/`]({page}.md)" for rel, page in pages.items()]
    index += ["", "```{toctree}", ":hidden:", "", *pages.values(), "```", ""]
    write_if_changed(outdir / "index.md", "\n".join(index))
    for rel, page in pages.items():
        write_if_changed(outdir / f"{page}.md", folder_page(rel, results))
    return folders


def _builder_inited(app: Any) -> None:
    write_results_pages(Path(app.srcdir) / "results")


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point: write the results pages before the sources are read."""
    app.connect("builder-inited", _builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
