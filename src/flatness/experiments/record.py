"""Run records on disk: written atomically, read back with a clear verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..utils import FlatnessError, atomic_write_bytes

__all__ = ["RECORD_FORMAT", "write_json", "read_record", "check_writable"]

RECORD_FORMAT = "flatness-run"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same folder, then rename)."""
    data = (json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(data))


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run record if ``path`` holds a finished one (complete or failed), else ``None``."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if record.get("status") not in ("complete", "failed"):
        return None
    return record


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / ".write-test", lambda fh: fh.write(b"ok"))
        (directory / ".write-test").unlink()
    except OSError as exc:
        raise FlatnessError(f"cannot write results to {directory}: {exc.strerror or exc}") from None
