"""``flatness status RUNS``: finished records and the runs still in flight, per task folder.

A line per task folder (records complete / failed, damaged files, runs in flight), then a line per
run in flight: who trains it (pid, host, since) or that its process is gone, and the epoch its
last epoch state was saved after — where a rerun by the same code resumes it
(:mod:`flatness.experiments.running.status`). ``--json`` prints the same as one JSON list.
Reads only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..experiments.running.claims import describe_holder
from ..experiments.running.status import results_status

__all__ = ["add_cli"]


def _saved(saved: Any) -> str:
    if saved is None:
        return "no epoch state yet"
    if saved == "unreadable":
        return "its epoch state cannot be read"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved["saved_at"]))
    what = "training done, final measurement pending" if saved["done"] else f"saved after epoch {saved['after_epoch']}"
    return f"{what} ({when})"


def _describe(run: dict[str, Any]) -> str:
    """Who holds the run, how far its state got, and what a rerun does with it."""
    holder = run["holder"]
    if holder is None:
        who = "no process holds it"
    else:
        where = describe_holder(holder)
        who = f"trained by {where}" if run["live"] else f"its process is gone ({where})"
    line = f"{who}; {_saved(run['saved'])}"
    if not run["live"]:
        readable = isinstance(run["saved"], dict)
        line += "; a rerun by the same code resumes it" if readable else "; a rerun starts it over"
    return line


def _cmd_status(args: argparse.Namespace) -> int:
    folders = results_status(args.directory)
    if args.json:
        print(json.dumps(folders, indent=1))
        return 0
    if not folders:
        print(f"{args.directory}: no run records, claims or checkpoints")
    for folder in folders:
        parts = [f"{folder['complete']} complete", f"{folder['failed']} failed"]
        if folder["damaged"]:
            parts.append(f"damaged: {', '.join(folder['damaged'])}")
        print(f"{folder['directory']}: records {', '.join(parts)}; {len(folder['in_flight'])} in flight")
        for run in folder["in_flight"]:
            print(f"  {run['name']}: {_describe(run)}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness status`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "status",
        help="finished records and runs in flight (with their saved epoch) of a results directory",
        description=(
            "For a results directory (RUNS, or one task folder RUNS/TASK): per task folder, how many "
            "run records are complete or failed, and every run in flight — who trains it, or that "
            "its process is gone, and the epoch its last epoch state was saved after (where a rerun "
            "by the same code resumes it). Reads only."
        ),
    )
    p.add_argument("directory", metavar="RUNS", help="a results directory (--out) or one of its task folders")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=_cmd_status)
