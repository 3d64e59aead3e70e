r"""Norm-based reference measures of Jiang et al. (2019, "Fantastic generalization measures").

Parameter norm, distance from initialisation and path norm.

.. math::

    \mu_{\text{param}} = \sum_{\ell} \lVert W_\ell \rVert_F^2, \qquad
    \mu_{\text{dist}} = \sum_{\ell} \lVert W_\ell - W_\ell^{0} \rVert_F^2, \qquad
    \mu_{\text{path}} = \sum_{i} f_{w^2}(\mathbf{1})_i,

where the sums run over the weight matrices W_ℓ (parameters with two or more dimensions; biases
and other 1-d parameters join with ``include_1d=True``), W⁰ are the initial weights, and
f_{w²} is the network with every trainable parameter squared, evaluated (eval mode: dropout
off) on one all-ones input. For a ReLU network without biases f_{w²}(𝟏) sums, over all
input-output paths, the product of the squared weights along the path: the squared path norm
(Neyshabur et al., 2015). Biases enter as paths that start at the bias (Jiang et al. square them
too). For other activations the same number is computed but is not a path norm.

None of these looks at the loss; they take the model (and, for the path norm, the shape of one
input) and never write to it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import parameter_norm, path_norm
    >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    ...     _ = model[2].weight.copy_(torch.tensor([[3.0, -1.0]]))
    >>> parameter_norm(model)  # 1 + 4 + 0.25 + 0 + 9 + 1
    15.25
    >>> path_norm(model, torch.zeros(4, 2))  # 9·(1 + 4) + 1·(0.25 + 0)
    45.25
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..utils import FlatnessError, eval_mode
from .functional import call_at, trainable_params

__all__ = ["norm_params", "parameter_norm", "distance_from_init", "path_norm"]


def norm_params(model: nn.Module, include_1d: bool = False) -> dict[str, Tensor]:
    """The trainable parameters the norms sum over, by name (weight matrices unless ``include_1d``)."""
    params = {n: p for n, p in trainable_params(model).items() if include_1d or p.dim() >= 2}
    if not params:
        raise FlatnessError("the model has no weight matrices (use include_1d=True to count vectors)")
    return params


def parameter_norm(model: nn.Module, *, include_1d: bool = False) -> float:
    """Σ_ℓ ‖W_ℓ‖_F²: the sum of squared weights (Jiang et al.'s ``param_norm``)."""
    return float(sum(p.double().pow(2).sum() for p in norm_params(model, include_1d).values()))


def distance_from_init(
    model: nn.Module,
    initial: nn.Module | Mapping[str, Tensor],
    *,
    include_1d: bool = False,
) -> float:
    """Σ_ℓ ‖W_ℓ − W_ℓ⁰‖_F² (Jiang et al.'s ``dist_init``, Frobenius distance, squared).

    ``initial`` is the model at initialisation, or its ``state_dict`` (or any mapping holding the
    same parameter names).

    Raises:
        FlatnessError: ``initial`` lacks a parameter or holds one of another shape.
    """
    state = initial.state_dict() if isinstance(initial, nn.Module) else initial
    total = 0.0
    for name, p in norm_params(model, include_1d).items():
        if name not in state:
            raise FlatnessError(f"the initial weights have no parameter {name!r}")
        w0 = state[name].detach()
        if w0.shape != p.shape:
            raise FlatnessError(
                f"initial parameter {name!r} has shape {tuple(w0.shape)}, the model's {tuple(p.shape)}"
            )
        total += float((p.double() - w0.to(p.device).double()).pow(2).sum())
    return total


def path_norm(model: nn.Module, example: Tensor) -> float:
    """Σ_i f_{w²}(𝟏)_i: the network with squared parameters on one all-ones input (eval mode).

    ``example`` is any input batch of the model (dense or sparse); only its per-example shape is
    used. The model is evaluated functionally: its own weights are never written to.
    """
    if example.dim() < 2:
        raise FlatnessError("example must be a batch of inputs (with a batch dimension)")
    squared = {n: p.pow(2) for n, p in trainable_params(model).items()}
    dtype = next(iter(squared.values())).dtype
    device = next(iter(squared.values())).device
    ones = torch.ones((1, *example.shape[1:]), dtype=dtype, device=device)
    with eval_mode(model), torch.no_grad():
        out = call_at(model, squared, ones)
    return float(out.double().sum())
