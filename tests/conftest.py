import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _shared_data() -> Path | None:
    """The real datasets, if this machine has them: $FLATNESS_DATA, else ../shared/data."""
    env = os.environ.get("FLATNESS_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def real_data_dir() -> Path:
    path = _shared_data()
    if path is None:
        pytest.skip("real datasets not found (set FLATNESS_DATA to a directory holding them)")
    return path
