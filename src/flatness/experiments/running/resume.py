"""Epoch states of a run in progress: a killed run resumes after its last saved epoch.

After an epoch, :func:`~.training.train` hands its whole training state to an
:class:`EpochState`, which writes it atomically (``checkpoints/NAME.state.pt`` in a results
directory): the weights, the optimizer's, the learning-rate schedule's and the method's state
(:meth:`flatness.methods.Method.state_dict`: FA's probe generator and call count, NRS's draws,
controllers), the shuffling generator and the global random streams (dropout), and the history
so far. The next run of the same spec continues from there and ends with the weights and the
record an uninterrupted run gives, but for timings and the resumed epochs it names.

A state is used only where it was written by the same code and settings: the same ``identity``
(the run's spec, and the package version, git commit and dirty flag, torch version, thread count
and device of the environment). Any other state, or one that cannot be read, is set aside with
one line on standard error and the run starts over. A state is read with ``weights_only=True``:
tensors and plain data only, so a state file cannot run code. States are written at most every
``min_interval`` seconds (and after the last epoch), so short runs pay nothing for them.

Example:
    >>> import tempfile, pathlib
    >>> state = EpochState(pathlib.Path(tempfile.mkdtemp()) / "run.state.pt", {"spec": "a"})
    >>> state.load() is None
    True
    >>> state.save({"next_epoch": 3}, final=False); state.load()["next_epoch"]
    3
    >>> EpochState(state.path, {"spec": "b"}).load() is None  # other settings: not used
    True
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...utils import atomic_write_bytes

__all__ = ["EpochState", "STATE_SUFFIX", "RESUME_IDENTITY_KEYS", "saved_progress", "capture_random_streams",
           "restore_random_streams"]

STATE_SUFFIX = ".state.pt"
# the environment entries a state must share with the process that resumes it
RESUME_IDENTITY_KEYS = ("flatness", "commit", "dirty", "torch", "threads", "device")
_FORMAT = "flatness-epoch-state"


class EpochState:
    """One run's saved training state at ``path``, used only by a run of the same ``identity``.

    Args:
        path: the state file (its folder must exist).
        identity: what a resuming run must share (plain JSON-like data).
        min_interval: seconds between two writes (0: after every epoch).
    """

    def __init__(self, path: Path, identity: Mapping[str, Any], min_interval: float = 0.0) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity, default=str))  # plain data (torch's version is a str subclass)
        self.min_interval = min_interval
        self._last_write = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none or it may not be used (said once, then removed)."""
        if not self.path.exists():
            return None
        try:
            payload = _load(self.path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: start over, say why
            return self._set_aside(f"cannot be read ({type(exc).__name__})")
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            return self._set_aside("is not an epoch state")
        if payload.get("identity") != self.identity:
            differences = _differences(payload.get("identity"), self.identity)
            return self._set_aside(f"was written by other code or settings ({differences})")
        return payload["state"]

    def due(self, final: bool) -> bool:
        """Whether :meth:`save` would write now: ``final``, or the last write is ``min_interval`` old."""
        return final or time.monotonic() - self._last_write >= self.min_interval

    def save(self, state: Mapping[str, Any], *, final: bool) -> None:
        """Write ``state`` atomically if :meth:`due` (``final``: the last epoch's, always written)."""
        if not self.due(final):
            return
        payload = {"format": _FORMAT, "identity": self.identity, "state": dict(state)}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.path, lambda fh: fh.write(buffer.getvalue()))
        self._last_write = time.monotonic()

    def discard(self) -> None:
        """Remove the state (the run it belongs to has its record)."""
        self.path.unlink(missing_ok=True)

    def _set_aside(self, why: str) -> None:
        print(f"flatness: {self.path.name} {why}; training from the start", file=sys.stderr)
        self.discard()
        return None


def _load(path: Path) -> Any:
    """A state file's content: tensors and plain data only (``weights_only``), so it cannot run code.

    torch's version string (a ``str`` subclass) is allowed too: states of earlier versions hold it.
    """
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return torch.load(path, map_location="cpu", weights_only=True)


def saved_progress(path: Path) -> dict[str, Any] | None:
    """How far the state at ``path`` got: ``{"after_epoch", "done", "saved_at"}``; ``None`` if unreadable.

    ``saved_at``: the file's modification time (seconds since the epoch). Reads the whole file.
    """
    try:
        state = _load(path)["state"]
        return {"after_epoch": int(state["next_epoch"]) - 1, "done": bool(state["done"]),
                "saved_at": Path(path).stat().st_mtime}
    except Exception:  # noqa: BLE001 - anything unreadable is reported as such by the caller
        return None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}``."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(saved: Any, current: Mapping[str, Any], limit: int = 3) -> str:
    """Where two identities differ, the first ``limit`` entries as ``key saved → here``."""
    a, b = _flat(saved), _flat(current)
    keys = [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    found = [f"{key} {a.get(key)!r} → here {b.get(key)!r}" for key in keys]
    shown = "; ".join(found[:limit])
    return shown + (f"; {len(found) - limit} more" if len(found) > limit else "")


def capture_random_streams(generator: torch.Generator | None) -> dict[str, Any]:
    """The shuffling ``generator``'s state and the global CPU (and initialised CUDA) streams."""
    streams: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if generator is not None:
        streams["generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        streams["cuda"] = torch.cuda.get_rng_state_all()
    return streams


def restore_random_streams(streams: Mapping[str, Any], generator: torch.Generator | None) -> None:
    """Put back what :func:`capture_random_streams` took."""
    torch.set_rng_state(streams["cpu"])
    if generator is not None and "generator" in streams:
        generator.set_state(streams["generator"])
    if "cuda" in streams:
        torch.cuda.set_rng_state_all(streams["cuda"])
