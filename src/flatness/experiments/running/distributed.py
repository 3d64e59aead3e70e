r"""Training on ``torch.distributed``: DistributedDataParallel runs, and their one-process twin.

Launch with ``torchrun --nproc-per-node N -m flatness run TASK ...`` (or ``flatness run --ddp``
under torchrun). Each global mini-batch of the protocol's size B is split into N contiguous
shards, one per rank; gradients are averaged over ranks by DDP's ordinary ``backward()``.

Semantics of the curvature-type methods under DDP (documented contract, tested):

- **FA**: every rank builds its penalty out of place on its *local* shard,
  ``λ·Tr(H_r²)/B_r`` with ``autograd.grad(create_graph=True)`` on the unwrapped module, adds
  it to its task loss and calls one ``backward()``; DDP averages the total gradients. The
  trained objective is therefore the mean over ranks of the per-shard penalties (DDP does not
  synchronise gradients of gradients, and a global Tr(H²) would need the ranks' Hessians).
- **Probes**: ranks do *not* share probes: rank r draws from a generator seeded with
  :func:`rank_seed` ``(seed, r)``, so the ranks' estimates are independent and their average
  has 1/N the variance.
- **Dropout** and other randomness of rank r come from the global generator seeded with
  ``rank_seed(seed, r)`` after the (identical) model initialisation.
- **SAM, NRS, RPR, GNP**: each rank perturbs with its own local gradient / draw (per-rank
  perturbations, as in their papers); only the final gradient is averaged.

:class:`EmulatedRanks` runs the same arithmetic in one process (shard by shard, each with its
rank's random streams, gradients averaged in rank order), which is what the CI test compares a
2-process gloo run against.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...methods import Method
from ...probes import rank_seed
from ...utils import FlatnessError, batch_size

__all__ = [
    "DistContext",
    "launched_by_torchrun",
    "init_distributed",
    "shutdown",
    "rank_seed",
    "shard_bounds",
    "take_shard",
    "wrap_model",
    "EmulatedRanks",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that measures and writes the results."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment of a torchrun / torch.distributed.launch worker is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    The backend is NCCL when CUDA is available (one GPU per local rank), else gloo on CPU.
    """
    import torch.distributed as dist

    if not launched_by_torchrun():
        raise FlatnessError(
            "--ddp needs the environment torchrun sets up (RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR): launch with `torchrun --nproc-per-node N -m flatness run ...`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def shutdown() -> None:
    """Destroy the default process group, if one was initialised."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous shard of ``n`` samples (sizes differ by <= 1)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _slice(t: Any, start: int, stop: int) -> Any:
    if isinstance(t, Tensor):
        if t.layout == torch.sparse_csr:
            crow = t.crow_indices()
            lo, hi = int(crow[start]), int(crow[stop])
            return torch.sparse_csr_tensor(
                crow[start : stop + 1] - lo, t.col_indices()[lo:hi], t.values()[lo:hi],
                size=(stop - start, *t.shape[1:]),
            )
        if t.is_sparse:
            return t.index_select(0, torch.arange(start, stop, device=t.device))
        return t[start:stop]
    if isinstance(t, (tuple, list)):
        return type(t)(_slice(u, start, stop) for u in t)
    if isinstance(t, dict):
        return {k: _slice(v, start, stop) for k, v in t.items()}
    return t


def take_shard(x: Any, y: Any, rank: int, world_size: int) -> tuple[Any, Any]:
    """Rank ``rank``'s contiguous shard of a global mini-batch (dense or sparse inputs)."""
    start, stop = shard_bounds(batch_size(x), rank, world_size)
    return _slice(x, start, stop), _slice(y, start, stop)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` on the context's device (rank 0's weights broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class _HarvestingOptimizer:
    """Stands in for the real optimizer during one emulated rank's step.

    ``zero_grad`` clears the gradients as usual; ``step`` takes the gradients the method has
    produced (the rank's local gradient) instead of updating the weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
        self._optimizer = optimizer
        self._params = list(params)
        self.param_groups = optimizer.param_groups
        self.harvest: list[Tensor | None] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise FlatnessError("EmulatedRanks does not support optimizer closures")
        if self.harvest is not None:
            raise FlatnessError("a method called optimizer.step() twice in one step")
        self.harvest = [None if p.grad is None else p.grad.detach().clone() for p in self._params]


@contextlib.contextmanager
def _rng_stream(state: list[Tensor]) -> Iterator[None]:
    """Run the body on a saved global CPU random state; save the advanced state back."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state[0])
        yield
        state[0] = torch.get_rng_state()


class EmulatedRanks(Method):
    """N ranks of a DDP step, in one process: the reference a DDP run must reproduce.

    Each global batch is split as :func:`take_shard` splits it; shard r is stepped by
    ``methods[r]`` (the method as rank r builds it, e.g. with ``rank_seed(seed, r)`` probes)
    under rank r's global random stream; the ranks' gradients are divided by N and summed in rank
    order (DDP's average), and the real optimizer takes one step.
    """

    name = "emulated-ranks"
    hparam = None

    def __init__(self, methods: Sequence[Method], seeds: Sequence[int]) -> None:
        if not methods or len(methods) != len(seeds):
            raise ValueError("EmulatedRanks needs one method and one seed per rank")
        model = methods[0].model
        if any(m.model is not model for m in methods):
            raise ValueError("the emulated ranks must share one model")
        super().__init__(model, methods[0].loss_fn)
        self.methods = list(methods)
        self._states: list[list[Tensor]] = []
        for s in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                self._states.append([torch.get_rng_state()])

    def step(self, x: Any, y: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One step of every rank on its shard; the ranks' averaged gradients, one optimizer step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        world = len(self.methods)
        total: list[Tensor | None] = [None] * len(params)
        infos: list[dict[str, float]] = []
        for rank, method in enumerate(self.methods):
            xs, ys = take_shard(x, y, rank, world)
            proxy = _HarvestingOptimizer(optimizer, params)
            with _rng_stream(self._states[rank]):
                infos.append(method.step(xs, ys, proxy))  # type: ignore[arg-type]
            if proxy.harvest is None:
                raise FlatnessError(f"method {method.name!r} did not call optimizer.step()")
            for i, g in enumerate(proxy.harvest):
                if g is not None:
                    g = g / world
                    total[i] = g if total[i] is None else total[i] + g
        for p, g in zip(params, total, strict=True):
            p.grad = g
        optimizer.step()
        keys = {k for info in infos for k in info}
        return {k: sum(i[k] for i in infos if k in i) / sum(k in i for i in infos) for k in keys}
