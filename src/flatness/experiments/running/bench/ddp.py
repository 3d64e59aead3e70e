"""``flatness bench ddp``: samples per second of 2 gloo ranks vs 1, in one run.

The paper's CIFAR-100 MLP shape on synthetic data, Adam (fused, as in training), a global
mini-batch of B = 128 split over the ranks (each rank one torch thread), for a plain step and the FA step (M = 5 probes
every 10 steps). Both worlds are started by this command (torch.multiprocessing, gloo on
127.0.0.1), one after the other; ``scaling = samples/s (2 ranks) / samples/s (1 rank)``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from . import platform_facts

__all__ = ["run_ddp_scaling"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, method: str, steps: int, batch: int, quick: bool,
            queue: Any) -> None:
    import torch.distributed as dist

    from ....methods import make_method
    from ....probes import rank_seed
    from ...world.models import mlp
    from ..distributed import DistContext, take_shard, wrap_model
    from . import training_adam

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
        in_dim, hidden, classes = (64, (32, 16), 10) if quick else (3072, (512, 256), 100)
        torch.manual_seed(0)
        model = mlp(in_dim, classes, hidden, dropout=0.3)
        ddp = wrap_model(model, ctx)
        torch.manual_seed(rank_seed(0, rank))
        hp: dict[str, Any] = {"lam": 0.01, "probes": 5, "every": 10, "seed": rank_seed(0, rank)}
        step_method = make_method(method, ddp, nn.CrossEntropyLoss(), **(hp if method == "fa" else {}))
        opt = training_adam(model, 1e-3)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, in_dim, generator=gen)
        y = torch.randint(0, classes, (batch,), generator=gen)
        xs, ys = take_shard(x, y, rank, world)
        for _ in range(10):  # warm-up, one whole FA window
            step_method.step(xs, ys, opt)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step_method.step(xs, ys, opt)
        dist.barrier()
        if rank == 0:
            queue.put(time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def _samples_per_second(world: int, method: str, steps: int, batch: int, quick: bool) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(world, _free_port(), method, steps, batch, quick, queue), nprocs=world,
        join=True, start_method="spawn",
    )
    return steps * batch / queue.get()


def run_ddp_scaling(steps: int = 40, batch: int = 128, quick: bool = False) -> dict[str, object]:
    """Samples/s with 1 and 2 gloo ranks for a plain and an FA step, and their ratios."""
    result: dict[str, object] = {"batch_global": batch, "steps": steps, "threads_per_rank": 1}
    for method in ("none", "fa"):
        label = "plain" if method == "none" else "fa_m5_k10"
        one = _samples_per_second(1, method, steps, batch, quick)
        two = _samples_per_second(2, method, steps, batch, quick)
        result[f"{label}_1rank_samples_per_s"] = one
        result[f"{label}_2rank_samples_per_s"] = two
        result[f"{label}_scaling"] = two / one
    result["cores"] = os.cpu_count()
    result.update({k: v for k, v in platform_facts().items() if k != "threads"})  # ranks: 1 thread each
    return result
