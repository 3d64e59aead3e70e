"""One documentation page per built-in task, generated from the task registry.

Each page (``tasks/NAME.md``, written before Sphinx reads the sources) shows what the registry
says about the task: its description, the paper's table it reproduces, its model settings and
method defaults, every named protocol field by field, the study grids defined for it, and links
to its committed results. Nothing is copied by hand, so a changed protocol changes its page.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from api_pages import write_if_changed

ROOT = Path(__file__).resolve().parents[2]


def _registry() -> dict[str, Any]:
    return dict(importlib.import_module("flatness.experiments.world.tasks").TASKS)


def _study_grids(name: str) -> list[str]:
    grids = importlib.import_module("flatness.experiments.running.study_population").GRIDS
    return [grid for task, grid in grids if task == name]


def _value(value: Any) -> str:
    if value is None:
        return "—"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _protocol_table(task: Any) -> list[str]:
    protocols = task.protocols
    names = list(protocols)
    fields = [f.name for f in dataclasses.fields(next(iter(protocols.values())))]
    lines = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for field in fields:
        values = [getattr(protocols[n], field) for n in names]
        lines.append(f"| `{field}` | " + " | ".join(_value(v) for v in values) + " |")
    return lines


def _results_links(name: str, results_pages: list[str]) -> list[str]:
    own = [p for p in results_pages if p == name or p.startswith(name + "/")]
    return [f"- [`results/{p}/`](../results/{p.replace('/', '-')}.md)" for p in own]


def task_page(task: Any, results_pages: list[str]) -> str:
    """The Markdown page of one task."""
    cls = type(task)
    lines = [f"# `{task.name}`", "", task.description + ".", ""]
    facts = []
    if task.paper_table:
        facts.append(f"- Reproduces the FA paper's {task.paper_table}.")
    width = f"{task.num_features}." if task.num_features else "set by the data (known after loading)."
    facts.append(f"- Classes: {task.num_classes}; input width: {width}")
    facts.append(f"- Task class: {{class}}`~{cls.__module__}.{cls.__qualname__}`"
                 f" (version {task.version}: records of another version are not reused).")
    if task.model_defaults:
        settings = ", ".join(f"`{k}={v!r}`" for k, v in task.model_defaults.items())
        facts.append(f"- Model settings (`--model-arg KEY=VALUE`) and their defaults: {settings}.")
    else:
        facts.append("- Model settings: none.")
    for method, settings in task.method_defaults.items():
        values = ", ".join(f"`{k}={v!r}`" for k, v in settings.items())
        facts.append(f"- Default settings of method `{method}` on this task: {values}.")
    lines += facts + [""]
    names = ", ".join(f"`{n}`" for n in task.protocols)
    lines += ["## Protocols", "",
              f"Named training protocols (`flatness run {task.name} --protocol NAME`; the first is the "
              f"default): {names}.", ""]
    lines += _protocol_table(task) + [""]
    lines += ["## Commands", "", "```bash", f"flatness run {task.name} --seeds 5",
              f"flatness report runs/{task.name}", f"flatness compare {task.name} --seeds 5"]
    grids = _study_grids(task.name)
    if grids:
        lines.append(f"flatness study {task.name} --grid {grids[0]} --list")
    lines += ["```", "", "Tasks whose data are not bundled with scikit-learn read them from "
              "`--data-dir` (default `$FLATNESS_DATA`, else `~/.cache/flatness`).", ""]
    if grids:
        lines += [f"Study grids (`flatness study {task.name} --grid NAME`): "
                  + ", ".join(f"`{g}`" for g in grids) + ".", ""]
    links = _results_links(task.name, results_pages)
    if links:
        lines += ["## Committed results", ""] + links + [""]
    return "\n".join(lines)


def write_task_pages(outdir: Path, results_pages: list[str]) -> None:
    """Write ``outdir/index.md`` and one page per registered task; remove stale pages."""
    outdir.mkdir(parents=True, exist_ok=True)
    tasks = _registry()
    wanted = {"index.md"} | {f"{n}.md" for n in tasks}
    for stale in outdir.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()
    index = ["# Built-in tasks", "",
             "One page per task of the registry ({data}`flatness.experiments.world.tasks.TASKS`), generated "
             "from it when the documentation is built.", "",
             "| task | description | protocols |", "|---|---|---|"]
    for name, task in tasks.items():
        index.append(f"| [`{name}`]({name}.md) | {task.description} | "
                     + ", ".join(f"`{p}`" for p in task.protocols) + " |")
    index += ["", "```{toctree}", ":hidden:", "", *tasks, "```", ""]
    write_if_changed(outdir / "index.md", "\n".join(index))
    for name, task in tasks.items():
        write_if_changed(outdir / f"{name}.md", task_page(task, results_pages))


def _builder_inited(app: Any) -> None:
    from results_pages import results_dirs

    write_task_pages(Path(app.srcdir) / "tasks", results_dirs())


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point: write the task pages before the sources are read."""
    app.connect("builder-inited", _builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
