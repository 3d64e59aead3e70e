"""Claims on runs, so that several ``flatness run`` processes on one ``--out`` split the work.

Before training run ``NAME`` a process creates ``NAME.claim`` next to its record with an
exclusive create (``O_CREAT | O_EXCL``: of two processes exactly one succeeds, also on NFS v3+),
holding its host, pid, start time and a random token. Others skip a claimed run. While the run
trains, a background thread refreshes the claim's modification time every
:data:`HEARTBEAT_SECONDS`; the claim is removed when the run ends (finished, failed or
interrupted).

A claim is *stale*, and is taken over, when its process is gone: on the same host, its pid no
longer names a running process that started when the claim's did (killed — also a zombie not yet
reaped — or the pid since reused by another process); on any host, it has not been refreshed for
:data:`STALE_SECONDS` (the process was killed with the machine, or hangs). Taking over moves the
stale file aside under a unique name (an atomic rename), checks that it moved the claim it judged
stale, and claims afresh. :func:`clear_leftovers` removes, before a sweep starts, what killed
processes left: stale claims (also those of runs finished just before the kill), temporary
files of writes cut short (:func:`flatness.utils.remove_orphaned_files`) and epoch states of runs
that have their record (:mod:`.resume`; the states of runs still to finish are kept: they resume).

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> claim = try_claim(out, "fa_lam0_seed0")
    >>> claim is not None, try_claim(out, "fa_lam0_seed0") is None  # a second claimant is refused
    (True, True)
    >>> claim.release()
    >>> sorted(p.name for p in out.iterdir())
    []
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...utils import process_alive, process_start, remove_orphaned_files, writer_tag
from .resume import STATE_SUFFIX

__all__ = [
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "Claim",
    "claim_path",
    "clear_leftovers",
    "is_stale",
    "read_claim",
    "try_claim",
]

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0
CLAIM_SUFFIX = ".claim"


def claim_path(directory: Path, name: str) -> Path:
    """The claim file of run ``name`` in ``directory``."""
    return Path(directory) / f"{name}{CLAIM_SUFFIX}"


def read_claim(path: Path) -> dict[str, Any] | None:
    """The claim's content; ``{}`` if unreadable or still empty; ``None`` if there is no claim."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}  # being written right now, or damaged: judged by its age alone
    return data if isinstance(data, dict) else {}


def is_stale(path: Path, holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether the claim at ``path`` (content ``holder``) was left by a process that is gone."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > STALE_SECONDS:
        return True
    pid, start = holder.get("pid"), holder.get("start")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return not process_alive(pid, start if isinstance(start, int) else None)
    return False


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


@dataclass
class Claim:
    """A claim this process holds; :meth:`release` removes it (only if it is still ours)."""

    path: Path
    token: str
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _ours(self) -> bool:
        holder = read_claim(self.path)
        return bool(holder) and holder.get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if not self._ours():
                return  # taken over (we looked stale): stop refreshing someone else's claim
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def start_heartbeat(self) -> None:
        """Refresh the claim file every :data:`HEARTBEAT_SECONDS` from a daemon thread, while it is ours."""
        self._thread = threading.Thread(target=self._heartbeat, name=f"claim {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _take_over(path: Path, holder: dict[str, Any]) -> None:
    """Remove the stale claim ``holder`` at ``path`` unless a fresh one replaced it meanwhile."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{writer_tag()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else took it over first
    moved = read_claim(aside)
    if moved and moved.get("token") != holder.get("token"):
        # a fresh claim appeared between our look and the rename: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)


def try_claim(directory: Path, name: str, attempts: int = 3) -> Claim | None:
    """Claim run ``name`` in ``directory``; ``None`` if another live process holds it."""
    path = claim_path(directory, name)
    token = secrets.token_hex(8)
    content = json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": token,
        }
    ).encode()
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = read_claim(path)
            if holder is None:
                continue  # released just now: try again
            if not is_stale(path, holder):
                return None
            _take_over(path, holder)
            continue
        try:
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        claim = Claim(path, token)
        claim.start_heartbeat()
        return claim
    return None


def clear_leftovers(directory: Path) -> list[Path]:
    """Remove what killed processes left in ``directory`` and below; returns the paths.

    Stale claims (:func:`is_stale`): those of runs still to do, and those of runs whose record
    was written just before the kill (nobody would claim them again). Temporary files and
    take-over files whose writer is gone (:func:`flatness.utils.remove_orphaned_files`). Epoch
    states (``checkpoints/NAME.state.pt``) of runs whose record ``NAME.json`` exists. Live
    processes' claims and files, and other hosts' files, are left alone.
    """
    removed = []
    for path in sorted(Path(directory).glob(f"*{CLAIM_SUFFIX}")):
        holder = read_claim(path)
        if holder is not None and is_stale(path, holder):
            _take_over(path, holder)
            removed.append(path)
    for path in sorted(Path(directory).glob(f"checkpoints/*{STATE_SUFFIX}")):
        if (Path(directory) / f"{path.name[: -len(STATE_SUFFIX)]}.json").exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed + remove_orphaned_files(directory)
