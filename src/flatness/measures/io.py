"""Atomic writers for result files: a temporary file in the same folder, then ``os.replace``.

A crash or an interrupt never leaves a half-written PNG, ``.npz`` or JSON behind.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from flatness.measures.io import save_npz
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "surface.npz"
    >>> _ = save_npz(path, loss=np.zeros(3))
    >>> sorted(np.load(path).files)
    ['loss']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..utils import atomic_write_bytes

__all__ = ["atomic_write", "save_npz", "save_json", "save_figure"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    atomic_write_bytes(path, write)
    return Path(path)


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """``numpy.savez`` written atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Pretty JSON (sorted keys) written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure (a ``matplotlib.figure.Figure``) as PNG atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
