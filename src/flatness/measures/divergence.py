r"""NRS model divergence: the expected KL between the outputs at θ and at a random θ + δθ.

.. math::

    d_p(\theta, \theta + \delta\theta)
    = \mathbb{E}_x\, D_{\mathrm{KL}}\big(f(x;\theta)\,\|\,f(x;\theta+\delta\theta)\big),
    \qquad \delta\theta \sim \mathcal{U}\big(B(0, \varepsilon)\big)

(NRS paper, eq. 2 and Algorithm 1: δθ uniform in the Euclidean ball of radius ε over all
parameters). It is averaged over ``samples`` draws of δθ (mean ± standard error over draws) and
over all examples of the batches. Outputs are read as class probabilities: softmax over the last
axis, or a Bernoulli sigmoid for a single logit per example (``output="auto"`` picks).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import model_divergence
    >>> model = nn.Linear(3, 4, dtype=torch.float64)
    >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 4, (16,)))]
    >>> d = model_divergence(model, data, eps=0.1, samples=4)
    >>> d.value > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hutchinson import Estimate
from ..probes import make_generator
from ..utils import FlatnessError, eval_mode
from .functional import Batch, call_at, collect_batches, select_params

__all__ = ["OutputKind", "kl_from_logits", "divergence_at", "model_divergence"]

OutputKind = Literal["auto", "softmax", "sigmoid"]


def kl_from_logits(p_logits: Tensor, q_logits: Tensor, output: OutputKind = "auto") -> Tensor:
    """Per-example KL(p ‖ q) between the distributions given by two logit tensors."""
    if output == "auto":
        output = "sigmoid" if p_logits.dim() == 1 or p_logits.shape[-1] == 1 else "softmax"
    if output == "softmax":
        log_p = F.log_softmax(p_logits, dim=-1)
        log_q = F.log_softmax(q_logits, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl.reshape(kl.shape[0], -1).sum(1) if kl.dim() > 1 else kl
    if output == "sigmoid":
        p, q = p_logits.reshape(p_logits.shape[0], -1), q_logits.reshape(q_logits.shape[0], -1)
        log_p1, log_p0 = F.logsigmoid(p), F.logsigmoid(-p)
        log_q1, log_q0 = F.logsigmoid(q), F.logsigmoid(-q)
        kl = log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)
        return kl.sum(1)
    raise ValueError(f"output must be 'auto', 'softmax' or 'sigmoid', got {output!r}")


@torch.no_grad()
def divergence_at(
    model: nn.Module,
    batches: list[Batch],
    delta: dict[str, Tensor],
    output: OutputKind = "auto",
) -> float:
    """E_x KL(f(x; θ) ‖ f(x; θ + δ)) for one given δ (names → tensors)."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    moved = {n: theta[n] + d for n, d in delta.items()}
    total = 0.0
    for b in batches:
        p_logits = call_at(model, theta, b.x)
        q_logits = call_at(model, moved, b.x)
        total += b.weight * float(kl_from_logits(p_logits, q_logits, output).mean())
    return total


def model_divergence(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    eps: float = 0.1,
    samples: int = 10,
    *,
    output: OutputKind = "auto",
    seed: int | None = 0,
    params: Iterable[Tensor] | None = None,
) -> Estimate:
    """NRS model divergence d_p(θ, θ + δθ), δθ ~ U(B(0, ε)), averaged over ``samples`` draws.

    ``batches`` yields ``(x, y)`` pairs like everywhere else; the targets are not used.
    """
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    data = collect_batches(batches)
    named = select_params(model, params)
    dim = sum(p.numel() for _, p in named)
    gen = make_generator(seed)
    values = []
    with eval_mode(model):
        for _ in range(samples):
            direction = {
                n: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for n, p in named
            }
            norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values()))
            radius = eps * float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / dim)
            delta = {n: d * (radius / norm) for n, d in direction.items()}
            values.append(divergence_at(model, data, delta, output))
    arr = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(arr).all():
        raise FlatnessError(f"non-finite model divergence at eps={eps}; use a smaller eps")
    return Estimate.from_samples(arr)
