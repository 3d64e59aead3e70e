"""What a results directory holds and what is still being trained (``flatness status``).

For a task folder (``RUNS/TASK``: run records, claims, ``checkpoints/``), or each task folder
directly under a results root: how many run records are complete or failed (and which files
are damaged), and every run *in flight* — a run with a claim or an epoch state and no record —
with its claim's holder (live, or gone: a rerun takes the run over) and the epoch its last state
was saved after (:mod:`.resume`; a rerun by the same code and settings resumes there). Reads only.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "task" / "checkpoints").mkdir(parents=True)
    >>> [f["directory"].endswith("task") for f in results_status(root)]
    [True]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...utils import FlatnessError
from .claims import CLAIM_SUFFIX, is_stale, read_claim
from .record import read_record
from .resume import STATE_SUFFIX, saved_progress

__all__ = ["results_status", "folder_status"]


def _is_task_folder(path: Path) -> bool:
    return any(path.glob("*.json")) or any(path.glob(f"*{CLAIM_SUFFIX}")) or (path / "checkpoints").is_dir()


def results_status(directory: str | Path) -> list[dict[str, Any]]:
    """:func:`folder_status` of ``directory`` if it is a task folder, else of each task folder in it."""
    root = Path(directory)
    if not root.is_dir():
        raise FlatnessError(f"{root}: no such results directory")
    if _is_task_folder(root):
        return [folder_status(root)]
    return [folder_status(p) for p in sorted(root.iterdir()) if p.is_dir() and _is_task_folder(p)]


def folder_status(folder: Path) -> dict[str, Any]:
    """The records' counts and the runs in flight of one task folder (module docs)."""
    complete, failed, damaged, finished = 0, 0, [], set()
    for path in sorted(folder.glob("*.json")):
        try:
            record = read_record(path)
        except FlatnessError:
            damaged.append(path.name)
            continue
        if record is None:
            continue  # JSON of another kind (a summary, a cache)
        finished.add(path.stem)
        complete, failed = (complete + 1, failed) if record.complete else (complete, failed + 1)
    claims = {p.name[: -len(CLAIM_SUFFIX)]: p for p in folder.glob(f"*{CLAIM_SUFFIX}")}
    states = {p.name[: -len(STATE_SUFFIX)]: p for p in folder.glob(f"checkpoints/*{STATE_SUFFIX}")}
    in_flight = []
    for name in sorted((set(claims) | set(states)) - finished):
        run: dict[str, Any] = {"name": name, "holder": None, "live": None, "saved": None}
        if name in claims:
            holder = read_claim(claims[name])
            run["holder"] = {k: v for k, v in (holder or {}).items() if k != "token"}
            run["live"] = holder is not None and not is_stale(claims[name], holder)
        if name in states:
            run["saved"] = saved_progress(states[name]) or "unreadable"
        in_flight.append(run)
    return {"directory": str(folder), "complete": complete, "failed": failed, "damaged": damaged,
            "in_flight": in_flight}
