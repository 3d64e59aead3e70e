r"""The paper's models: a ReLU MLP with dropout, and multinomial logistic regression.

Logistic regression on TF-IDF text takes sparse inputs through
:class:`flatness.layers.SparseLinear`.

Example:
    >>> import torch
    >>> from flatness.experiments.world.models import logistic_regression
    >>> model = logistic_regression(5, 3)
    >>> x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    >>> torch.allclose(model(x.to_sparse_csr()), model(x))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...layers import SparseLinear

__all__ = ["mlp", "logistic_regression", "check_mlp_setting"]


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.3,
    weight_scale: float = 1.0,
) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks then a linear output layer (logits).

    The paper's CIFAR-100 and Breast-Cancer model is ``mlp(d, c, (512, 256), 0.3)``.
    ``weight_scale`` multiplies every Linear weight after PyTorch's default initialisation
    (uniform in ±1/√fan_in); biases keep theirs. It draws no random numbers, so a seed gives the
    same initial directions for every scale.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not (math.isfinite(weight_scale) and weight_scale > 0):
        raise ValueError(f"weight_scale must be finite and > 0, got {weight_scale}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    model = nn.Sequential(*layers)
    if weight_scale != 1.0:
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(weight_scale)
    return model


def check_mlp_setting(name: str, value: Any) -> Any:
    """A keyword of :func:`mlp` (``hidden``, ``dropout``, ``weight_scale``) checked and normalised.

    Values come as JSON gives them (a command line's ``weight_scale=1``): ``hidden`` becomes a
    list of positive ints, the others floats, so ``1`` and ``1.0`` name the same run. An invalid
    value is a ``ValueError`` saying what is expected.
    """
    if name == "hidden":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in value
        ):
            raise ValueError(f"hidden must be a list of positive integers (e.g. [512,256]), got {value!r}")
        return [int(h) for h in value]
    if name not in ("dropout", "weight_scale"):
        raise ValueError(f"mlp takes no setting {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if name == "dropout" and not 0 <= value < 1:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")
    if name == "weight_scale" and value <= 0:
        raise ValueError(f"weight_scale must be > 0, got {value!r}")
    return float(value)


def logistic_regression(in_features: int, num_classes: int) -> SparseLinear:
    """One linear layer; softmax cross-entropy on its logits is multinomial logistic regression.

    Accepts dense or sparse (CSR/COO) inputs; a dense input behaves exactly like ``nn.Linear``.
    """
    return SparseLinear(in_features, num_classes)
