"""The paper's models: a ReLU MLP with dropout, and multinomial logistic regression."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp", "logistic_regression"]


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.3,
) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks then a linear output layer (logits).

    The paper's CIFAR-100 and Breast-Cancer model is ``mlp(d, c, (512, 256), 0.3)``.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def logistic_regression(in_features: int, num_classes: int) -> nn.Linear:
    """One linear layer; softmax cross-entropy on its logits is multinomial logistic regression."""
    return nn.Linear(in_features, num_classes)
