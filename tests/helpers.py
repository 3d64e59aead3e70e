"""Tiny float64 models with a dense Hessian, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def tiny_mlp(seed: int = 0, d_in: int = 3, hidden: int = 4, d_out: int = 3, dropout: float = 0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers).double()


def tiny_batch(seed: int = 1, n: int = 6, d_in: int = 3, d_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, d_out, (n,), generator=g)
    return x, y


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loss_of_flat(model: nn.Module, x, y, loss_fn=nn.functional.cross_entropy):
    """L(θ) as a function of one flat parameter vector (for autograd.functional.hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split(sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return f


def dense_hessian(model: nn.Module, x, y, loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
    return torch.autograd.functional.hessian(loss_of_flat(model, x, y, loss_fn), flat_params(model))
