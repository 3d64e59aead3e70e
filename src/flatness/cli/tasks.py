"""``flatness tasks``: the built-in tasks, the installed task plugins, and any named plugin.

One line per task: name, where it comes from, its protocols (``flatness run --protocol NAME``)
and its description. ``flatness tasks FILE.py:FACTORY`` also loads and checks that plugin
(:mod:`flatness.experiments.world.plugins`). A plugin that cannot be loaded is listed with the
reason, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json

from ..experiments.world.plugins import ENTRY_POINT_GROUP, list_tasks

__all__ = ["add_cli"]


def _cmd_tasks(args: argparse.Namespace) -> int:
    rows = list_tasks(args.references)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            origin = "" if r["kind"] == "built-in" else f" {r['origin']}"
            head = f"{r['name']:<{width}}  {r['kind']}{origin}"
            if r["error"]:
                print(f"{head}  cannot be loaded: {r['error']}")
                continue
            text = r["description"]
            text = text if len(text) <= 90 or args.json else text[:89] + "…"
            print(f"{head}  [protocols: {', '.join(r['protocols'])}]  {text}")
    return 1 if any(r["error"] for r in rows) else 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness tasks`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "tasks",
        help="list the built-in tasks and the task plugins, with their protocols",
        description=(
            "List the built-in tasks, the tasks installed packages register (entry-point group "
            f"{ENTRY_POINT_GROUP}) and the plugins named here (FILE.py:FACTORY or "
            "package.module:FACTORY, loaded and checked), with their protocols."
        ),
    )
    p.add_argument("references", nargs="*", metavar="PLUGIN", help="task plugins to load and check too")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=_cmd_tasks)
