"""Result files of the measures: ``.npz``, JSON and PNG.

Each is written atomically by :func:`flatness.utils.atomic_write_bytes` (a temporary file in the
same folder, then ``os.replace``).

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

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write_bytes, write_json, write_png

__all__ = ["save_npz", "save_json", "save_figure"]


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """``numpy.savez`` written atomically."""
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return Path(path)


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Pretty JSON (sorted keys) written atomically."""
    return write_json(path, obj, indent=2, sort_keys=True)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure (a ``matplotlib.figure.Figure``) as PNG atomically."""
    return write_png(fig, path, dpi=dpi)
