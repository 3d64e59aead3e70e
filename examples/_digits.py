"""scikit-learn's digits as tensors, shared by the examples (shipped with scikit-learn)."""

import torch
from sklearn.datasets import load_digits


def digits_loaders(batch_size: int = 64) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """(train, validation) loaders of the 8×8 digits as 64 features in [0, 1]."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    train = torch.utils.data.TensorDataset(x[:1400], y[:1400])
    val = torch.utils.data.TensorDataset(x[1400:], y[1400:])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))
