r"""Perturb-and-restore of weights, and replay of the random stream, shared by the methods.

SAM and the finite-difference gradient-norm penalty evaluate a gradient at
:math:`\theta + \delta` and must put back :math:`\theta` exactly. :func:`perturbed` adds
:math:`\delta` in place and restores bit-exact copies with ``copy_`` in a ``finally`` block, so
no perturbed weight survives the step, also when the perturbed pass raises.

A perturbed pass should see the same sub-network as the clean pass it is compared with (the
same dropout mask): :class:`RandomReplay` snapshots the global random state before the clean
pass and replays it for the perturbed pass inside :func:`torch.random.fork_rng`, after which
the stream continues exactly as if the perturbed pass had drawn nothing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods.perturb import perturbed, RandomReplay
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    >>> x = torch.randn(3, 4)
    >>> replay = RandomReplay.capture(model.parameters())
    >>> clean = model(x)
    >>> params = list(model.parameters())
    >>> with perturbed(params, [torch.zeros_like(p) for p in params]), replay():
    ...     again = model(x)
    >>> torch.equal(clean, again)  # same weights, same dropout mask
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..passes import frozen_running_stats
from ..utils import unwrap

__all__ = [
    "trainable_parameters",
    "global_norm",
    "perturbed",
    "stash_for",
    "RandomReplay",
    "extra_pass",
    "WrappingOptimizer",
    "require_nonnegative",
    "require_positive",
]


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters of ``model`` that require grad (what a method perturbs and trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    return params


def global_norm(tensors: Iterable[Tensor | None]) -> Tensor:
    """Euclidean norm of all tensors taken together as one vector (``None`` counts as zero)."""
    norms = [torch.linalg.vector_norm(t) for t in tensors if t is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


@contextlib.contextmanager
def perturbed(
    params: Sequence[Tensor],
    deltas: Sequence[Tensor | None],
    scale: Tensor | float | None = None,
    stash: Sequence[Tensor] | None = None,
) -> Iterator[None]:
    """Run the body at ``params + scale·deltas`` (in place), then restore the exact originals.

    The originals are saved as copies (into ``stash``, a list of tensors shaped like
    ``params``, when given, so that repeated steps allocate nothing) and put back with
    ``copy_`` in ``finally``: restoration is bit-exact (not ``p - delta``) and happens also when
    the body raises. ``scale`` may be a 0-d tensor (no device synchronisation).
    """
    if len(params) != len(deltas):
        raise ValueError(f"{len(params)} parameters but {len(deltas)} perturbations")
    with torch.no_grad():
        if stash is None:
            saved = [p.detach().clone() for p in params]
        else:
            saved = list(stash)
            for s, p in zip(saved, params, strict=True):
                s.copy_(p)
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas, strict=True):
                if d is None:
                    continue
                if scale is None:
                    p.add_(d)
                elif isinstance(scale, Tensor):
                    p.addcmul_(d, scale)
                else:
                    p.add_(d, alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def stash_for(params: Sequence[Tensor], stash: list[Tensor] | None) -> list[Tensor]:
    """``stash`` if it still fits ``params`` (shapes, dtypes, devices), else fresh buffers."""
    fits = stash is not None and len(stash) == len(params) and all(
        s.shape == p.shape and s.dtype == p.dtype and s.device == p.device
        for s, p in zip(stash, params, strict=True)
    )
    if fits:
        return stash  # type: ignore[return-value]
    return [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]


class RandomReplay:
    """A snapshot of the global random state (CPU and the CUDA devices in use) to replay.

    ``with replay(): ...`` runs its body with the random state set back to the snapshot, inside
    :func:`torch.random.fork_rng`, so a second forward pass draws the same dropout mask as the
    first, and the global stream afterwards is untouched by the body.
    """

    def __init__(self, cpu_state: Tensor, cuda_states: dict[int, Tensor]) -> None:
        self.cpu_state = cpu_state
        self.cuda_states = cuda_states

    @classmethod
    def capture(cls, tensors: Iterable[Tensor]) -> "RandomReplay":
        """Snapshot the CPU state and that of every CUDA device holding one of ``tensors``."""
        devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        cuda = {i: torch.cuda.get_rng_state(i) for i in devices}
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """A context running its body from the snapshot's random state; the global stream is untouched."""
        with torch.random.fork_rng(devices=list(self.cuda_states)):
            torch.set_rng_state(self.cpu_state)
            for index, state in self.cuda_states.items():
                torch.cuda.set_rng_state(state, index)
            yield


def extra_pass(model: nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """Around an optimizer wrapper's closure call at a perturbed point.

    ``model``'s running statistics are frozen (:func:`flatness.passes.frozen_running_stats`);
    nothing without a model.
    """
    return contextlib.nullcontext() if model is None else frozen_running_stats(unwrap(model))


class WrappingOptimizer(torch.optim.Optimizer):
    """An optimizer around a base optimizer that shares its parameter groups (SAM, GNP, NRS).

    The base optimizer, ``base_optimizer_cls(param_groups, **kwargs)``, takes the update step;
    the wrapper's ``param_groups`` are the base's, so a learning-rate scheduler or a change of
    ``lr`` reaches it, and its ``state_dict`` is the base's (the wrappers keep no state between
    steps but what a subclass adds). ``model``: the network the closures run (for
    :func:`extra_pass`), or ``None``.
    """

    def __init__(
        self, params: Any, base_optimizer_cls: type[torch.optim.Optimizer], model: nn.Module | None, **kwargs: Any
    ) -> None:
        self.model = model
        torch.optim.Optimizer.__init__(self, params, dict(kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum etc.)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer's state (and share its parameter groups)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def require_nonnegative(name: str, value: object) -> float:
    """``float(value)`` if it is a finite number >= 0, else a ``ValueError`` naming ``name``."""
    number = _check_number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def require_positive(name: str, value: object) -> float:
    """``float(value)`` if it is a finite number > 0, else a ``ValueError`` naming ``name``."""
    number = _check_number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number
