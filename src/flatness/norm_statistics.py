r"""BatchNorm running statistics re-estimated from data, for models made by moving weights.

Weights that were never trained as such — a point between two models, on a curve joining them,
an average — come without running statistics that fit them; interpolating the endpoints'
statistics does not give them (the activations' statistics are not linear in the weights).
Mode-connectivity work re-estimates them at every point (Garipov et al. 2018; Frankle et al.
2020; as SWA does after averaging): reset, then one pass over data in train mode.

:func:`reestimate_norm_statistics` does that on the model it is given (so give it a copy): every
norm layer that tracks running statistics gets the size-weighted mean over ``batches`` of the
per-batch means and (unbiased) variances — the momentum b/(n + b) after n examples, as in
Garipov et al.'s ``bn_update`` — with dropout off (eval mode for everything but the norm layers)
and no gradients; train/eval flags and momenta are restored, also when the body raises.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.norm_statistics import reestimate_norm_statistics
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    >>> x = torch.randn(40, 2)
    >>> reestimate_norm_statistics(model, [(x[:30], None), (x[30:], None)])
    >>> torch.allclose(model[1].running_mean, model[0](x).mean(0), atol=1e-6), model.training
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .passes import norm_layers
from .utils import batch_size, call_model, preserved_mode

__all__ = ["tracked_norm_layers", "reestimate_norm_statistics"]


def tracked_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model`` that keep running statistics (what re-estimation rewrites)."""
    return [m for m in norm_layers(model) if m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def reestimate_norm_statistics(model: nn.Module, batches: Iterable[tuple[Any, Any]]) -> None:
    """Replace the running statistics of ``model``'s norm layers by those of ``batches``.

    Writes to ``model`` (its buffers): call it on a copy. A model without such layers is left
    as it is and ``batches`` is not read.
    """
    layers = tracked_norm_layers(model)
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    try:
        with preserved_mode(model):
            model.eval()
            for m in layers:
                m.reset_running_stats()
                m.train()
            seen = 0
            for x, _ in batches:
                b = batch_size(x)
                for m in layers:
                    m.momentum = b / (seen + b)  # running = size-weighted mean of batch statistics
                call_model(model, x)
                seen += b
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
