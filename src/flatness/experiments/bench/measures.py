"""``flatness bench measures``: wall time of the flatness measures on the CIFAR-100 MLP.

The issue's targets, on 1,000 CIFAR-100 training examples (3072-512-256-100 MLP, 1.7 M
parameters) and 2 CPU cores:

- λ_max (Lanczos, ``eigsh``, relative tolerance 1e-4) plus Tr(H) by Hutchinson with 100
  Hessian-vector products: under 60 s;
- a 21 × 21 2D loss surface along filter-normalised random directions: under 300 s.

The real CIFAR-100 data is used when it is found in the data directory (``--data-dir``,
``$FLATNESS_DATA``, ``~/.cache/flatness``); otherwise N(0, 1) inputs of the same shape with random
labels, and the output says which (``"data"``). The model is first trained for ``--train-steps``
Adam steps on those examples so that the spectrum looks like a trained network's (the training
time is not part of the figures). Each figure is one timed run; pass/fail compares wall seconds
with the targets. ``*_cpu_seconds`` is the process's CPU time (summed over its threads): on a
busy machine wall time grows with the other load while CPU time / threads stays close to what
a quiet machine's wall time would be.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch
from torch import nn

from ...landscape import surface_2d
from ...measures import hessian_trace, top_eigenvalues
from ..models import mlp

__all__ = ["run_measures_bench"]

TARGET_EIG_TRACE_S = 60.0
TARGET_SURFACE_S = 300.0


def _cifar_subset(examples: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``examples`` CIFAR-100 training images (standardised), or synthetic stand-ins."""
    try:
        from ..tasks import get_task

        splits = get_task("cifar100-mlp").load(data_dir, download=False)
        return splits.x_train[:examples].float(), splits.y_train[:examples].long(), "cifar100"
    except Exception as exc:  # no data here: the timings do not depend on the pixel values
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(examples, 3072, generator=gen)
        y = torch.randint(0, 100, (examples,), generator=gen)
        return x, y, f"synthetic N(0,1) ({type(exc).__name__}: {str(exc)[:80]})"


def run_measures_bench(
    examples: int = 1000,
    matvecs: int = 100,
    grid: int = 21,
    train_steps: int = 50,
    threads: int | None = None,
    data_dir: str | None = None,
    quick: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time λ_max + Tr(H) and a ``grid × grid`` surface; figures and pass/fail in a dict."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if quick:
        gen = torch.Generator().manual_seed(seed)
        x, y, source = torch.randn(examples, 64, generator=gen), torch.randint(0, 10, (examples,), generator=gen), "synthetic (quick)"
        model = mlp(64, 10, (32, 16), dropout=0.3)
    else:
        x, y, source = _cifar_subset(examples, data_dir)
        model = mlp(3072, 100, (512, 256), dropout=0.3)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    batches = list(zip(x.split(1000), y.split(1000)))

    start, cpu = time.perf_counter(), time.process_time()
    spec = top_eigenvalues(model, loss_fn, batches, k=1, seed=seed)
    trace_start = time.perf_counter()
    trace = hessian_trace(model, loss_fn, batches, num_matvecs=matvecs, seed=seed)
    eig_s, trace_s = trace_start - start, time.perf_counter() - trace_start
    eig_trace_cpu = time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    surface = surface_2d(model, loss_fn, batches, num=grid, seed=seed)
    surface_s, surface_cpu = time.perf_counter() - start, time.process_time() - cpu

    return {
        "data": source,
        "examples": int(len(y)),
        "num_params": sum(p.numel() for p in model.parameters()),
        "lambda_max": spec.lambda_max,
        "lambda_max_matvecs": spec.num_matvecs,
        "lambda_max_seconds": eig_s,
        "hessian_trace": trace.value,
        "hessian_trace_stderr": trace.stderr,
        "hessian_trace_matvecs": trace.num_samples,
        "hessian_trace_seconds": trace_s,
        "eig_plus_trace_seconds": eig_s + trace_s,
        "eig_plus_trace_cpu_seconds": eig_trace_cpu,
        "eig_plus_trace_target_seconds": TARGET_EIG_TRACE_S,
        "eig_plus_trace_pass": eig_s + trace_s < TARGET_EIG_TRACE_S,
        "surface_grid": f"{grid}x{grid}",
        "surface_seconds": surface_s,
        "surface_cpu_seconds": surface_cpu,
        "surface_target_seconds": TARGET_SURFACE_S,
        "surface_pass": surface_s < TARGET_SURFACE_S,
        "surface_nonfinite_points": surface.num_nonfinite,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "quick": quick,
    }
