"""Datasets of the paper's experiments, and where they are looked for.

The data directory is, in order: an explicit ``data_dir`` argument (``--data-dir``), the
``FLATNESS_DATA`` environment variable, then ``~/.cache/flatness``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATA_ENV", "data_dir", "Splits", "load_breast_cancer"]

DATA_ENV = "FLATNESS_DATA"


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data directory (argument, then ``$FLATNESS_DATA``, then the user cache)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flatness"


@dataclass
class Splits:
    """Train and test tensors of one task (inputs may be sparse)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def load_breast_cancer(split_seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled Breast Cancer Wisconsin data, a fixed stratified split, standardised.

    569 samples, 30 features; 80/20 gives 455 training samples as in the paper. Features are
    standardised with training-set statistics. Labels are float {0, 1} for BCE-with-logits.
    """
    from sklearn.datasets import load_breast_cancer as _load
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    bunch = _load()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data,
        bunch.target,
        test_size=test_fraction,
        stratify=bunch.target,
        random_state=split_seed,
    )
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Splits(
        as_x(scaler.transform(x_tr)), as_y(y_tr), as_x(scaler.transform(x_te)), as_y(y_te), 2
    )
